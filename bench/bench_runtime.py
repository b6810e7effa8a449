"""`han-edge bench` on CPU for all three variants: FP32 and INT8 (CPU flavour) ONNX, batch 1 and 32,
gallery sizes 1e3 and 1e5 (exact search). Weights are fresh: speed does not depend on training."""
from __future__ import annotations

import tempfile
from pathlib import Path

from common import write_result
from han_edge.bench import run_bench
from han_edge.exporter import export_fp32, load_batch
from han_edge.job_data import calibration_paths, heldout_paths, load_torch_model
from han_edge.quantize import export_int8


def main() -> None:
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for variant in ("small", "medium", "large"):
            model, config, _ = load_torch_model(variant, None)
            fp32 = export_fp32(model, config, Path(tmp) / f"han_{variant}.onnx")
            int8 = Path(tmp) / f"han_{variant}.int8-cpu.onnx"
            export_int8(fp32, int8, load_batch(calibration_paths(None, 64), config),
                        load_batch(heldout_paths(16), config), flavour="cpu", exclude=[])
            for path in (fp32, int8):
                for gallery_size in (1000, 100000):
                    result = run_bench(path, [1, 32], iters=10, gallery_size=gallery_size)
                    for row in result["rows"]:
                        rows.append({"variant": variant, "precision": result["precision"],
                                     "gallery_size": gallery_size, **row})
                        print(f"{variant:6s} {result['precision']:8s} gallery {gallery_size:6d} batch {row['batch']:2d} "
                              f"{row['stage']:11s} p50 {row['p50_ms']:8.2f} ms  {row['images_per_s']:8.1f} img/s")
    write_result("runtime", rows, backend="onnxruntime/CPU")


if __name__ == "__main__":
    main()
