"""Mixed precision where real runs happen: fp16 with a real GradScaler through overflow and recovery."""

from __future__ import annotations

import csv
import math
from pathlib import Path

import torch

from helpers import TINY, compose_config
from osediff_lab.train import run

FAST = [*TINY, "data.crop_size=32", "trainer.log_every_n_steps=1", "callbacks.samples.every_n_steps=0",
        "callbacks.checkpoint.every_n_train_steps=0", "trainer.enable_progress_bar=false"]


def step_rows(run_dir: Path) -> list[dict[str, float]]:
    """The per-step training rows of the CSV log, in order, as floats."""
    with open(run_dir / "csv" / "metrics.csv") as f:
        rows = [r for r in csv.DictReader(f) if r.get("train/loss_total")]
    return [{k: float(v) for k, v in r.items() if v} for r in rows]


def test_fp16_overflow_halves_the_loss_scale_skips_and_recovers(tmp_path):
    """Start the GradScaler far too high: every overflowing optimiser step is skipped and halves the scale
    (backoff 0.5), and once the scale fits, the updates go through. max_steps counts generator steps, skipped
    ones included (as the release counts them)."""
    init = 2.0**20
    steps = 9
    cfg = compose_config([*FAST, f"trainer.max_steps={steps}", "trainer.precision=16-mixed",
                          f"optim.grad_scaler.init_scale={init}", "optim.max_consecutive_bad_steps=40"], tmp_path)
    trainer, module, _ = run(cfg)
    rows = step_rows(tmp_path)
    scales = [init] + [r["train/loss_scale"] for r in rows]
    skips = [r["train/skipped_generator"] + r["train/skipped_regularizer"] for r in rows]
    for before, after, skipped in zip(scales[:-1], scales[1:], skips, strict=True):
        assert after == before * 0.5**skipped, (before, after, skipped)  # growth_interval 2000: no growth here
    assert sum(skips) >= 2, "the initial scale was meant to overflow"
    assert rows[0]["train/skipped_generator"] == rows[0]["train/skipped_regularizer"] == 1.0  # both overflow at 2^20
    assert len(rows) == steps == trainer.global_step and sum(r["train/skipped_generator"] == 0 for r in rows) >= 2
    assert rows[-1]["train/skipped_generator"] == 0 and scales[-1] < init
    assert module.grad_scaler() is not None and module.grad_scaler().get_scale() == scales[-1]
    trained = module.generator_state_dict()
    assert all(torch.isfinite(v).all() for v in trained.values())
    assert any(k.endswith("lora_B.default_encoder.weight") and v.abs().sum() > 0 for k, v in trained.items()), \
        "no generator update went through"


def test_fp32_steps_with_finite_gradients_are_never_skipped(tmp_path):
    cfg = compose_config([*FAST, "trainer.max_steps=3"], tmp_path)
    trainer, module, _ = run(cfg)
    rows = step_rows(tmp_path)
    assert trainer.global_step == 3 and len(rows) == 3 and module.grad_scaler() is None
    assert all(r["train/skipped_generator"] == 0 and r["train/skipped_regularizer"] == 0 for r in rows)
    assert all(math.isfinite(r["train/grad_norm_generator"]) for r in rows)
