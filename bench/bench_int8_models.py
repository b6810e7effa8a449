"""INT8 accuracy across trained models: does the export meet the bars on more than one model?

    python bench/bench_int8_models.py runs/a.pt runs/b.pt ...   (HAN-S checkpoints, e.g. `han-edge train --seed N`)

Each checkpoint goes through `han-edge export --int8` as a user runs it (``jobs.export_all``: sensitivity
analysis on 512 held-out crops, accuracy on 512 others, rank-1/mAP on the synthetic test set), once per
flavour. Speed is not measured here (see bench_export.py); the rows name the layer groups each export
kept out of INT8, which is what costs speed.
"""
from __future__ import annotations

import argparse
import json
import tempfile

from common import write_result
from han_edge.jobs import ExportOptions, export_all


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("checkpoints", nargs="+")
    args = parser.parse_args()
    rows = []
    for checkpoint in args.checkpoints:
        for target in ("cpu", "tensorrt"):
            with tempfile.TemporaryDirectory() as out:
                result = export_all(ExportOptions(checkpoint=checkpoint, int8=True, int8_target=target, out_dir=out),
                                    log=lambda *_: None)
            int8 = result["int8"]
            rows.append({"source": result["source"], "precision": target, "centred_cosine": int8["centred_cosine"],
                         "neighbour_agreement": int8["neighbour_agreement"],
                         "clear_neighbour_agreement": int8["clear_neighbour_agreement"],
                         "clear_neighbour_share": int8["clear_neighbour_share"],
                         "excluded_groups": int8["excluded_groups"], "finetune": int8["finetune"],
                         **int8["retrieval"]})
            print(json.dumps(rows[-1]), flush=True)
    write_result("int8_models", rows)


if __name__ == "__main__":
    main()
