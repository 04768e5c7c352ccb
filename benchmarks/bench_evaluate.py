"""Throughput of the evaluate command for PSNR + SSIM + NIQE on the RealSR pairs (CPU by default).

SR images are the bicubic-upsampled LR (written once to a temporary folder, not timed); NIQE's parameter
file comes from ../shared/weights. `python benchmarks/bench_evaluate.py [--limit N] [--device cpu|cuda]`;
prints numbers, asserts nothing.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

import torch
from omegaconf import OmegaConf
from PIL import Image

from osediff_lab.evaluate import evaluate_folders
from osediff_lab.metrics import metric_defs
from osediff_lab.paths import CONF_DIR
from osediff_lab.weights import MANIFEST, expected_path

SHARED = Path(__file__).resolve().parents[2] / "shared"
REALSR = SHARED / "data" / "realsr"
NIQE_MAT = SHARED / "weights" / "niqe_modelparameters.mat"


def prepare(root: Path, limit: int | None) -> tuple[Path, Path, Path]:
    """SR folder (bicubic x4 of LR), GT folder (the HR files) and a weights cache holding NIQE's parameters."""
    sr, gt, cache = root / "sr", root / "gt", root / "weights"
    sr.mkdir()
    gt.mkdir()
    for lr in sorted((REALSR / "LR").glob("*.png"))[:limit]:
        im = Image.open(lr).convert("RGB")
        im.resize((im.width * 4, im.height * 4), Image.BICUBIC).save(sr / lr.name)
        shutil.copy(REALSR / "HR" / lr.name, gt / lr.name)
    dest = expected_path(MANIFEST["niqe"], cache)
    dest.parent.mkdir(parents=True)
    shutil.copy(NIQE_MAT, dest)
    return sr, gt, cache


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--limit", type=int, default=None, help="first N pairs (default: all 100)")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    if not (REALSR / "LR").is_dir() or not NIQE_MAT.is_file():
        print(f"skipped: needs {REALSR} and {NIQE_MAT}")
        return
    names = ["psnr", "ssim", "niqe"]
    defs = metric_defs(OmegaConf.load(CONF_DIR / "metric_defs" / "paper.yaml"), names)
    with tempfile.TemporaryDirectory() as tmp:
        sr, gt, cache = prepare(Path(tmp), args.limit)
        start = time.perf_counter()
        summary = evaluate_folders(sr, gt, defs, cache, Path(tmp) / "out", device=args.device, progress=False)
        wall = time.perf_counter() - start
    n = summary["count"]
    print(f"evaluate {'+'.join(names)} on {n} RealSR pairs ({args.device}, {torch.get_num_threads()} threads)")
    print(f"  wall {wall:.1f} s   {n / wall:.2f} images/s   {1000 * wall / n:.0f} ms/image")
    print("  means: " + ", ".join(f"{m} {summary['metrics'][m]['value']:.4f}" for m in names))


if __name__ == "__main__":
    main()
