"""Precision where real runs happen: fp16 with a real GradScaler through overflow and recovery, and the skip of a
non-finite step decided on the device (fused AdamW through a GradScaler) with no host read in the training step."""

from __future__ import annotations

import csv
import math
import traceback
from pathlib import Path

import pytest
import torch

from helpers import TINY, compose_config
from osediff_lab.lit.optimization import NonFiniteLossError
from osediff_lab.methods.osediff import REGULARIZER
from osediff_lab.step import GENERATOR
from osediff_lab.train import build_module, run

FAST = [*TINY, "data.crop_size=32", "trainer.log_every_n_steps=1", "callbacks.samples.every_n_steps=0",
        "callbacks.checkpoint.every_n_train_steps=0", "trainer.enable_progress_bar=false"]


def step_rows(run_dir: Path) -> list[dict[str, float]]:
    """The per-step training rows of the CSV log, in order, as floats."""
    with open(run_dir / "csv" / "metrics.csv") as f:
        rows = [r for r in csv.DictReader(f) if r.get("train/loss_total")]
    return [{k: float(v) for k, v in r.items() if v} for r in rows]


@pytest.mark.slow
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


@pytest.mark.slow
def test_fp32_steps_with_finite_gradients_are_never_skipped(tmp_path):
    cfg = compose_config([*FAST, "trainer.max_steps=3"], tmp_path)
    trainer, module, _ = run(cfg)
    rows = step_rows(tmp_path)
    assert trainer.global_step == 3 and len(rows) == 3 and module.grad_scaler() is None
    assert all(r["train/skipped_generator"] == 0 and r["train/skipped_regularizer"] == 0 for r in rows)
    assert all(math.isfinite(r["train/grad_norm_generator"]) for r in rows)


@pytest.mark.slow
def test_the_training_step_never_reads_a_value_back_from_the_device():
    """Fake tensors hold no values, so any host read of a computed tensor (``.item()``, ``bool()``, a branch on
    a value) raises. The whole training step runs on them: generator and regularizer steps, clipping, the
    fused finiteness check and the skip (fused AdamW through the scale-1 GradScaler). So on a GPU the step never
    waits for the device; the skip counts are read by ``SkipCounter.report``, at log steps only."""
    from osediff_lab.memory import predict_training_memory

    cfg = compose_config([*TINY, "data.crop_size=32", "data.batch_size=1"])
    assert cfg.optim.fused and cfg.trainer.precision in (32, "32", "32-true")
    prediction = predict_training_memory(cfg, steps=2)
    assert prediction.peak > prediction.static


def adam_state(opt: torch.optim.Optimizer) -> list[torch.Tensor]:
    """Every tensor of the optimiser's state (moments and step counts), copied, in a fixed order."""
    return [v.clone() for s in opt.state_dict()["state"].values() for _, v in sorted(s.items())]


@pytest.mark.parametrize("fused", [True, False])
def test_a_nonfinite_step_leaves_weights_and_adam_state_as_they_were(fused):
    """fp32 without a trainer (the path benchmarks time): a NaN generator loss skips the generator's step
    (weights, both moments and the step count unchanged, bit for bit) and not the regularizer's; the counts
    stay tensors until ``report``, which warns and stops at ``optim.max_consecutive_bad_steps``."""
    module = build_module(compose_config([*TINY, "data.crop_size=32", "data.batch_size=1", f"optim.fused={fused}"])).train()
    optimizers = module.build_optimizers()
    hq = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1

    def step() -> dict:
        return module.optimize_batch(module.on_after_batch_transfer({"hq": hq.clone()}, 0), optimizers, prompts=[""])

    step()  # a good step creates the Adam state
    groups = {name: [p.detach().clone() for p in group.params] for name, group in module.groups.items()}
    states = {name: adam_state(opt) for name, opt in optimizers.items()}
    good = module.method.generator_losses

    def nan_total(batch, embeds):
        terms, state = good(batch, embeds)
        return terms | {"total": terms["total"] * float("nan")}, state

    module.method.generator_losses = nan_total
    logs = step()
    assert isinstance(logs["train/skipped_generator"], torch.Tensor)
    assert float(logs["train/skipped_generator"]) == 1 and float(logs["train/skipped_regularizer"]) == 0
    same = [torch.equal(a, b) for a, b in zip(groups[GENERATOR], module.groups[GENERATOR].params, strict=True)]
    assert all(same) and all(torch.equal(a, b) for a, b in zip(states[GENERATOR], adam_state(optimizers[GENERATOR]), strict=True))
    assert not all(torch.equal(a, b) for a, b in zip(groups[REGULARIZER], module.groups[REGULARIZER].params, strict=True))
    assert not all(torch.equal(a, b) for a, b in zip(states[REGULARIZER], adam_state(optimizers[REGULARIZER]), strict=True))
    module.skips.limit = 2
    module.skips.report(1)  # one skipped step in a row: a warning, no stop
    step()
    with pytest.raises(NonFiniteLossError, match="2 consecutive non-finite steps"):
        module.skips.report(2)


def test_fused_adamw_by_default_and_not_for_a_tensor_listed_twice():
    """The release lists conv_in's LoRA twice, and its AdamW then steps those tensors twice in a row; one fused
    launch would read their moments once for both entries, so such a group keeps the foreach AdamW. Truth: the
    same tensor stepped by two AdamW steps on its own (bias corrections of steps 1 and 2)."""
    from osediff_lab.step import GroupSettings, ParamGroup, build_optimizer

    w, twice = torch.nn.Parameter(torch.ones(3)), torch.nn.Parameter(torch.full((2,), 2.0))
    settings = GroupSettings(lr=0.1, betas=(0.9, 0.999), weight_decay=0.01, eps=1e-8)
    adamw = {"_target_": "torch.optim.AdamW"}
    opts = {GENERATOR: build_optimizer(ParamGroup([w, twice, twice], settings), adamw),
            REGULARIZER: build_optimizer(ParamGroup([w], settings), adamw)}
    assert not opts[GENERATOR].param_groups[0]["fused"] and opts[REGULARIZER].param_groups[0]["fused"]
    alone = torch.nn.Parameter(twice.detach().clone())
    reference = torch.optim.AdamW([alone], lr=0.1, betas=(0.9, 0.999), weight_decay=0.01, eps=1e-8, foreach=False)
    twice.grad, alone.grad, w.grad = torch.full((2,), 0.5), torch.full((2,), 0.5), torch.ones(3)
    opts[GENERATOR].step()
    reference.step()
    reference.step()
    torch.testing.assert_close(twice.detach(), alone.detach(), rtol=0, atol=1e-7)


@pytest.mark.slow
def test_the_lightning_loop_reads_no_tensor_between_log_steps(tmp_path, monkeypatch):
    """The real loop around the step (Lightning, the module's logging, every callback of a run: run statistics,
    the preemption check, progress, checkpoints) reads no tensor value back while a batch trains, unless it is a
    log step: each such read is a host-device sync on a GPU. Counted at the Python level (``.item()``,
    ``float()``, ``bool()``, ...) from the start of the first batch to the end of the one before the last (which
    prints the final progress line), none of them a log step."""
    import pytorch_lightning as pl

    import osediff_lab.train as train

    reads: list[str] = []

    class Window(pl.Callback):
        active = False

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            Window.active = trainer.global_step < trainer.max_steps - 1  # the last batch prints the final line

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            Window.active = False  # the last callback: every other one has run

    def counted(name):
        original = getattr(torch.Tensor, name)

        def read(self, *args, **kwargs):
            if Window.active:
                reads.append(f"{name}: {''.join(traceback.format_stack(limit=12)[:-1])}")
            return original(self, *args, **kwargs)

        return read

    for name in ("item", "tolist", "__bool__", "__float__", "__int__", "__index__"):
        monkeypatch.setattr(torch.Tensor, name, counted(name))
    build = train.build_callbacks
    monkeypatch.setattr(train, "build_callbacks", lambda *a: (lambda cbs, s: ([*cbs, Window()], s))(*build(*a)))
    cfg = compose_config([*TINY, "data.crop_size=32", "trainer.max_steps=4", "trainer.log_every_n_steps=50",
                          "callbacks.samples.every_n_steps=0", "callbacks.checkpoint.every_n_train_steps=0"], tmp_path)
    trainer, _, _ = run(cfg)
    assert trainer.global_step == 4
    assert reads == [], f"{len(reads)} reads while batches trained, the first:\n{reads[0]}"


@pytest.mark.slow
@pytest.mark.parametrize("precision", ["bf16-mixed", "64"])
def test_every_offered_precision_steps_through_the_modules_update(precision, tmp_path):
    """bf16-mixed and 64-true (fp32 and fp16 above): Lightning's step runs the module's plain-torch update
    (osediff_lab.step), so the generator's LoRA moves and no step is skipped."""
    from osediff_lab.lit.precision import ModuleStep

    cfg = compose_config([*FAST, "trainer.max_steps=2", f"trainer.precision={precision}"], tmp_path)
    trainer, module, _ = run(cfg)
    assert isinstance(trainer.precision_plugin, ModuleStep) and trainer.global_step == 2
    rows = step_rows(tmp_path)
    assert all(r["train/skipped_generator"] == 0 and math.isfinite(r["train/grad_norm_generator"]) for r in rows)
    assert any(k.endswith("lora_B.default_encoder.weight") and v.abs().sum() > 0
               for k, v in module.generator_state_dict().items())
