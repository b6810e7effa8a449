"""INT8 accuracy across trained models: does the export meet the bars on more than one model?

    python bench/bench_int8_models.py runs/a.pt runs/b.pt ...   (HAN-S checkpoints, e.g. `han-edge train --seed N`)

Each checkpoint goes through `han-edge export --int8` as a user runs it (``jobs.export_all``: sensitivity
analysis on 512 held-out crops, accuracy on 512 others, rank-1/mAP on the synthetic test set), once per
flavour. Speed is not measured here (see bench_export.py); the rows name the layer groups each export
kept out of INT8, which is what costs speed.

The nearest-neighbour agreement on 512 crops has a sampling error of about 0.01, as large as the
differences it is asked to show, so each file is also scored on ``--extra-sets`` x 2 more sets of 512
crops (people of ``--extra-sets`` further held-out sets, identities 2001 on, never trained, calibrated or
analysed on): the rows carry the mean over the report set and these, and its standard error.

Rank-1 on the synthetic test set's 181 queries moves 0.55 points with every query, so a change of two
queries either way (1.1 points) is what chance gives (sign test in the row). The same FP32/INT8 pair is
therefore also ranked on each further set's own test split (query/ against bounding_box_test/, 120 new
people, ~360 queries each; ``jobs.compare_retrieval``, the code path of `han-edge eval`): the row's
``retrieval_many`` pools their queries, rank-1 and mAP change with standard errors.
"""
from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path
from types import SimpleNamespace

import numpy as np
from common import RESULTS, write_result

from han_edge.data import HELDOUT_SET, load_market_test
from han_edge.evaluate import centred_cosine, neighbour_agreement, sign_test
from han_edge.exporter import load_batch
from han_edge.job_data import heldout_paths
from han_edge.jobs import ExportOptions, compare_retrieval, export_all
from han_edge.onnx_io import ort_session, read_config, run_ort
from han_edge.quantize import file_scoring_session
from han_edge.synthetic import generate

SET_SIZE = 512


def crop_sets(folder: Path, count: int) -> tuple[list[list[str]], list[Path]]:
    """``2 * count`` disjoint sets of 512 crops of people outside every other set, and the ``count`` test-only
    Market layouts (generated under ``folder``) they come from."""
    sets, roots = [], []
    for k in range(count):
        people = HELDOUT_SET["test_ids"]
        root = generate(folder / f"set{k}", **{**HELDOUT_SET, "first_id": 2001 + people * k})
        crops = [str(p) for folder in ("query", "bounding_box_test") for p in sorted((root / folder).glob("*.jpg"))]
        sets += [crops[0::2][:SET_SIZE], crops[1::2][:SET_SIZE]]
        roots.append(root)
    return sets, roots


def scores_on(fp32: Path, int8: Path, batches: list[np.ndarray]) -> dict:
    reference, quantised = ort_session(fp32), file_scoring_session(int8)[0]
    pairs = [(run_ort(reference, b), run_ort(quantised, b)) for b in batches]
    agreement = [neighbour_agreement(a, b) for a, b in pairs]
    return {"sets": len(batches), "neighbour_agreement_mean": float(np.mean(agreement)),
            "neighbour_agreement_se": float(np.std(agreement, ddof=1) / np.sqrt(len(agreement))),
            "neighbour_agreement_sets": agreement,
            "centred_cosine_mean": float(np.mean([centred_cosine(a, b) for a, b in pairs]))}


def retrieval_on(fp32: Path, int8: Path, roots: list[Path]) -> dict:
    """Rank-1/mAP of FP32 and INT8 over the queries of every test layout in ``roots``, pooled, with paired errors."""
    runs = [compare_retrieval(fp32, int8, SimpleNamespace(name=root.name, **dict(zip(
        ("query", "gallery"), load_market_test(root, root.name))))) for root in roots]
    queries = np.array([r["rank1_changed"]["queries"] for r in runs])
    n, weights = int(queries.sum()), queries / queries.sum()
    gained, lost = (sum(r["rank1_changed"][k] for r in runs) for k in ("gained", "lost"))
    delta_map = np.array([r["int8"]["mAP"] - r["fp32"]["mAP"] for r in runs])
    pooled = {f"{model}_{key}": float(sum(w * r[model][key] for w, r in zip(weights, runs)))
              for model in ("fp32", "int8") for key in ("rank1", "mAP")}
    # paired rank-1 difference: (gained - lost) / n; its variance from the discordant queries
    return {"layouts": len(runs), "queries": n, "gained": gained, "lost": lost, **pooled,
            "rank1_delta": (gained - lost) / n, "rank1_delta_se": float(np.sqrt(gained + lost - (gained - lost) ** 2 / n) / n),
            "p_value": sign_test(gained, lost),
            "mAP_delta": float(weights @ delta_map),
            "mAP_delta_se": float(np.std(delta_map, ddof=1) / np.sqrt(len(runs))) if len(runs) > 1 else None,
            "per_layout": [{"queries": int(q), "rank1": [r["fp32"]["rank1"], r["int8"]["rank1"]],
                            "mAP": [r["fp32"]["mAP"], r["int8"]["mAP"]]} for q, r in zip(queries, runs)]}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("checkpoints", nargs="+")
    parser.add_argument("--extra-sets", type=int, default=4, help="further held-out sets (2 x 512 crops each)")
    parser.add_argument("--targets", default="cpu,tensorrt")
    parser.add_argument("--append", action="store_true", help="keep the result file's rows of other models/flavours")
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as scratch:
        extra, layouts = crop_sets(Path(scratch), args.extra_sets)
        for checkpoint in args.checkpoints:
            for target in args.targets.split(","):
                out = Path(scratch) / "export"
                result = export_all(ExportOptions(checkpoint=checkpoint, int8=True, int8_target=target, out_dir=str(out)),
                                    log=lambda *_: None)
                int8 = result["int8"]
                config, _ = read_config(out / "han_small.onnx")
                batches = [load_batch(paths, config) for paths in extra]
                report = load_batch(heldout_paths(SET_SIZE), config)   # the export's own report crops
                rows.append({"source": result["source"], "precision": target, "centred_cosine": int8["centred_cosine"],
                             "neighbour_agreement": int8["neighbour_agreement"],
                             "clear_neighbour_agreement": int8["clear_neighbour_agreement"],
                             "clear_neighbour_share": int8["clear_neighbour_share"],
                             "excluded_groups": int8["excluded_groups"], "finetune": int8["finetune"],
                             "shifted_activations": int8.get("shifted_activations", 0),
                             "many_sets": scores_on(out / "han_small.onnx", Path(int8["path"]), [report, *batches]),
                             "retrieval_many": retrieval_on(out / "han_small.onnx", Path(int8["path"]), layouts),
                             **int8["retrieval"]})
                print(json.dumps(rows[-1]), flush=True)
    if args.append and (RESULTS / "int8_models.json").is_file():
        done = {(r["source"], r["precision"]) for r in rows}
        earlier = json.loads((RESULTS / "int8_models.json").read_text(encoding="utf-8"))["rows"]
        rows = [r for r in earlier if (r["source"], r["precision"]) not in done] + rows
    write_result("int8_models", rows)


if __name__ == "__main__":
    main()
