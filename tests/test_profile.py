import json

from typer.testing import CliRunner

from han_edge.cli import app


def test_profile_flops_json_matches_table1():
    result = CliRunner().invoke(app, ["profile", "flops", "--json"])
    assert result.exit_code == 0, result.output
    rows = {r["variant"]: r for r in json.loads(result.output)}
    assert set(rows) == {"small", "medium", "large"}
    for r in rows.values():
        assert r["flops"] == 2 * r["macs"]
        assert abs(r["flops"] / r["paper_flops"] - 1) < 0.05
        assert 1e6 < r["params"] < 5e6
    assert rows["small"]["flops"] < rows["medium"]["flops"] < rows["large"]["flops"]
    # Strides change cost, not parameters.
    assert rows["small"]["params"] == rows["large"]["params"]


def test_cost_table_shows_rank1_only_for_the_file_the_eval_scored(fresh_onnx, tmp_path):
    from han_edge.formats import model_digest
    from han_edge.onnx_io import load_onnx, save_onnx, set_metadata
    from han_edge.profile import cost_table

    _, scored = fresh_onnx
    other = load_onnx(scored)
    set_metadata(other, {"han_edge.note": "other weights, same variant and precision"})
    other_path = save_onnx(other, tmp_path / "other.onnx")
    report = {"rank1": 0.5, "variant": "small", "precision": "fp32", "model_digest": model_digest(scored)}
    rows = cost_table([scored, other_path], batch=1, iters=1, eval_result=report)
    assert [row["rank1"] for row in rows] == [0.5, None]     # was 0.5 for both: matched on variant and precision
