"""The study's tables from its runs' CSV logs: held-out PSNR / SSIM / NIQE at every validation per arm (a PiSA-SR arm's
stage 2 continues its pixel stage's run, whose validations come first) and each arm's mean training losses.

    python experiments/pisasr_csd/table.py outputs/pisasr_csd
"""

from __future__ import annotations

import csv
import sys
from pathlib import Path

ARMS = {"osediff_vsd": [], "csd_0": ["pixel"], "csd_0.02": ["pixel"], "csd_1": ["pixel"]}  # arm: runs it continues
LOSSES = ("train/loss_l2", "train/loss_vsd", "train/loss_csd", "train/loss_regularizer")


def rows(run: Path) -> list[dict[str, str]]:
    """The rows of a run's metrics.csv (one per logged step)."""
    with open(run / "csv" / "metrics.csv") as f:
        return list(csv.DictReader(f))


def validations(runs: list[Path]) -> dict[int, str]:
    """steps done -> 'PSNR / SSIM / NIQE' over the validations of ``runs`` in order."""
    out = {}
    for run in runs:
        for r in rows(run):
            if r.get("val/psnr"):
                out[int(r["step"]) + 1] = f"{float(r['val/psnr']):.2f} / {float(r['val/ssim']):.3f} / {float(r['val/niqe']):.2f}"
    return out


def mean_losses(run: Path) -> dict[str, float]:
    """Each training loss's mean over the run's logged steps."""
    values: dict[str, list[float]] = {}
    for r in rows(run):
        for key in LOSSES:
            if r.get(key):
                values.setdefault(key, []).append(float(r[key]))
    return {k: sum(v) / len(v) for k, v in values.items()}


def main(root: Path) -> None:
    arms = {arm: [root / p for p in parents] + [root / arm] for arm, parents in ARMS.items() if (root / arm / "csv").is_dir()}
    table = {arm: validations(runs) for arm, runs in arms.items()}
    steps = sorted({s for v in table.values() for s in v})
    print("| arm | " + " | ".join(f"step {s}" for s in steps) + " |")
    print("|---|" + "---|" * len(steps))
    for arm, by_step in table.items():
        print(f"| {arm} | " + " | ".join(by_step.get(s, "-") for s in steps) + " |")
    base = next(r for r in rows(next(iter(arms.values()))[0]) if r.get("val/bicubic_psnr"))
    print(f"\nbicubic x4 on the same crops: {float(base['val/bicubic_psnr']):.2f} / {float(base['val/bicubic_ssim']):.3f} / "
          f"{float(base['val/bicubic_niqe']):.2f}")
    print("\n| arm | " + " | ".join(k.removeprefix("train/") for k in LOSSES) + " |")
    print("|---|" + "---|" * len(LOSSES))
    for arm, runs in arms.items():
        means = mean_losses(runs[-1])
        print(f"| {arm} | " + " | ".join(f"{means[k]:.4g}" if k in means else "-" for k in LOSSES) + " |")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
