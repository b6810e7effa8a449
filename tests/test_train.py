import json

import pytest
import torch
from typer.testing import CliRunner

from han_edge.checkpoint import load_checkpoint
from han_edge.cli import app
from han_edge.data import load_dataset
from han_edge.errors import HanEdgeError
from han_edge.train import TrainOptions, branch_loss, make_optimizer, random_erase, train


def tiny_subset(n=64):
    data = load_dataset("synthetic", None)
    items = [it for it in data.train if it[1] < 8][:n]
    return items, len({pid for _, pid, _ in items})


def test_resume_continues_exactly(tmp_path, synthetic_root):
    items, classes = tiny_subset()
    options = TrainOptions(epochs=2, flip=True, random_erasing=True)
    train(items, classes, tmp_path / "straight.pt", options=options)
    train(items, classes, tmp_path / "first.pt", options=TrainOptions(epochs=1, flip=True, random_erasing=True))
    ck = load_checkpoint(tmp_path / "first.pt")
    assert ck["epoch"] == 1 and ck["config"]["variant"] == "small" and "optimizer" in ck
    train(items, classes, tmp_path / "first.pt", options=options, resume=tmp_path / "first.pt")
    a = load_checkpoint(tmp_path / "straight.pt")["state_dict"]
    b = load_checkpoint(tmp_path / "first.pt")["state_dict"]
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=1e-6)
    before = (tmp_path / "first.pt").read_bytes()
    with pytest.raises(HanEdgeError, match="has trained 2 epochs, the whole --epochs 2 budget"):   # was "wrote", unwritten
        train(items, classes, tmp_path / "again.pt", options=options, resume=tmp_path / "first.pt")
    assert not (tmp_path / "again.pt").exists() and (tmp_path / "first.pt").read_bytes() == before
    state = load_checkpoint(tmp_path / "first.pt")
    del state["num_classes"]
    torch.save(state, tmp_path / "nonc.pt")
    with pytest.raises(HanEdgeError, match=r"cannot be resumed: it holds no training state \(num_classes\)"):   # KeyError
        train(items, classes, tmp_path / "again.pt", options=TrainOptions(epochs=3), resume=tmp_path / "nonc.pt")


def test_schedule_matches_section4_fractions():
    from han_edge.model import build_model

    _, scheduler = make_optimizer(build_model("small", 3), TrainOptions(epochs=300))
    assert sorted(scheduler.milestones) == [100, 200, 250]
    optimizer, _ = make_optimizer(build_model("small", 3), TrainOptions())
    group = optimizer.param_groups[0]
    assert (group["lr"], group["momentum"], group["weight_decay"]) == (3e-2, 0.9, 5e-4)


def test_loss_is_sum_of_branch_cross_entropies():
    out = {"global_logits": torch.tensor([[2.0, 0.0]]), "local_logits": torch.tensor([[0.0, 1.0]])}
    expected = torch.nn.functional.cross_entropy(out["global_logits"], torch.tensor([0])) + \
        torch.nn.functional.cross_entropy(out["local_logits"], torch.tensor([0]))
    assert torch.isclose(branch_loss(out, torch.tensor([0])), expected)


def test_random_erasing_changes_one_rectangle():
    torch.manual_seed(0)
    x = torch.zeros(3, 160, 64)
    changed = [random_erase(x, p=1.0) for _ in range(5)]
    for y in changed:
        mask = (y != 0).any(0)
        rows, cols = mask.any(1).nonzero(), mask.any(0).nonzero()
        assert 0 < mask.sum() < 160 * 64
        assert mask.sum() == (rows.max() - rows.min() + 1) * (cols.max() - cols.min() + 1)


def test_checkpoint_is_data_only(tmp_path):
    import pickle

    evil = tmp_path / "evil.pt"

    class Boom:
        def __reduce__(self):
            return (print, ("pwned",))
    with open(evil, "wb") as f:
        pickle.dump({"format": "han-edge-checkpoint", "x": Boom()}, f)
    with pytest.raises(HanEdgeError, match="cannot be read"):
        load_checkpoint(evil)
    with pytest.raises(HanEdgeError, match="not found"):
        load_checkpoint(tmp_path / "missing.pt")


def test_train_refuses_too_few_images(tmp_path, synthetic_root):
    items, classes = tiny_subset(10)
    with pytest.raises(HanEdgeError, match="need at least one batch"):
        train(items, classes, tmp_path / "x.pt")


@pytest.mark.slow
def test_cli_eval_trained_beats_untrained(tmp_path, trained_checkpoint):
    runner = CliRunner()
    result = runner.invoke(app, ["eval", "--checkpoint", str(trained_checkpoint), "--json", str(tmp_path / "t.json")])
    assert result.exit_code == 0, result.output
    trained = json.loads((tmp_path / "t.json").read_text())
    assert set(trained) >= {"rank1", "rank5", "rank10", "mAP", "num_query"}
    assert 0 <= trained["rank1"] <= trained["rank5"] <= trained["rank10"] <= 1
    # the same code on fresh weights of the same variant
    from han_edge.checkpoint import save_checkpoint
    from han_edge.model import build_model
    torch.manual_seed(0)
    fresh = build_model("small")
    save_checkpoint(tmp_path / "fresh.pt", fresh, fresh.config, epoch=0)
    result = runner.invoke(app, ["eval", "--checkpoint", str(tmp_path / "fresh.pt"), "--json", str(tmp_path / "u.json")])
    assert result.exit_code == 0, result.output
    untrained = json.loads((tmp_path / "u.json").read_text())
    assert trained["mAP"] > untrained["mAP"] + 0.05
    result = runner.invoke(app, ["eval", "--checkpoint", str(trained_checkpoint), "--rerank", "--multi-query",
                                 "--json", str(tmp_path / "rr.json")])
    assert result.exit_code == 0, result.output
    assert 0 < json.loads((tmp_path / "rr.json").read_text())["mAP"] <= 1


def test_visualize_writes_png(tmp_path, trained_checkpoint, synthetic_root):
    import cv2

    image = next((synthetic_root / "query").glob("*.jpg"))
    result = CliRunner().invoke(app, ["visualize", "--checkpoint", str(trained_checkpoint), "--image", str(image),
                                      "--out", str(tmp_path / "att.png")])
    assert result.exit_code == 0, result.output
    picture = cv2.imread(str(tmp_path / "att.png"))
    assert picture.shape[0] == 160 * 3 + 8 and picture.shape[1] == 4 * (64 * 3 + 8)
