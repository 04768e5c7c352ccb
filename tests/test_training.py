"""End-to-end training on the tiny preset: what changes, determinism, checkpoints and resume."""

from __future__ import annotations

import csv
import math
from pathlib import Path

import pytest
import torch

from helpers import TINY, compose_config
from osediff_lab.train import build_module, run

FAST = [*TINY, "trainer.max_steps=2", "trainer.log_every_n_steps=1", "callbacks.samples.every_n_steps=0",
        "callbacks.checkpoint.every_n_train_steps=1"]


def logged_losses(run_dir: Path) -> list[float]:
    with open(run_dir / "csv" / "metrics.csv") as f:
        return [float(r["train/loss_total"]) for r in csv.DictReader(f) if r.get("train/loss_total")]


@pytest.mark.slow
def test_step_changes_only_trainable_tensors(tmp_path):
    cfg = compose_config(FAST, tmp_path)
    torch.manual_seed(cfg.seed)
    before = {n: p.detach().clone() for n, p in build_module(cfg).named_parameters()}
    trainer, module, _ = run(cfg)
    trained = set(module.trained_names)
    assert trainer.global_step == 2  # counts generator steps, whatever the regularizer does
    changed = {n for n, p in module.named_parameters() if not torch.equal(p.detach(), before[n])}
    assert changed, "nothing was trained"
    assert changed <= trained, f"frozen tensors changed: {sorted(changed - trained)[:5]}"
    assert any(n.startswith("method.reg_unet.") for n in changed) and any(n.startswith("method.generator.") for n in changed)
    for n, p in module.named_parameters():
        if n not in trained:
            assert p.grad is None, f"frozen {n} received a gradient"
    assert not any(p.requires_grad for p in module.text_encoders.parameters())
    # every LoRA layer took part: each lora_B (zero at init) has moved away from zero
    untouched = [n for n, p in module.named_parameters() if ".lora_B." in n and torch.count_nonzero(p) == 0]
    assert not untouched, f"LoRA layers that never received a gradient: {untouched[:5]}"


@pytest.mark.slow
def test_same_seed_same_losses(tmp_path):
    a = run(compose_config(FAST, tmp_path / "a"))[2]
    b = run(compose_config(FAST, tmp_path / "b"))[2]
    la, lb = logged_losses(Path(a["run_dir"])), logged_losses(Path(b["run_dir"]))
    assert len(la) == 2 and la == lb


@pytest.mark.slow
def test_reg_steps_per_gen_step(tmp_path):
    trainer, module, _ = run(compose_config([*FAST, "method.optim.regularizer.updates=3"], tmp_path))
    assert trainer.global_step == 2
    opt_g, opt_r = trainer.optimizers
    steps = lambda opt: max(int(s["step"]) for s in opt.state.values())  # noqa: E731
    assert steps(opt_g) == 2 and steps(opt_r) == 6


@pytest.mark.slow
def test_checkpoint_holds_only_trained_tensors_and_resumes(tmp_path):
    cfg = compose_config(FAST, tmp_path / "first")
    trainer, module, summary = run(cfg)
    ckpt_path = Path(summary["checkpoint_dir"]) / "last.ckpt"
    ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=False)
    assert set(ckpt["state_dict"]) == set(module.trained_names)
    assert ckpt["global_step"] == 2 and len(ckpt["optimizer_states"]) == 2 and len(ckpt["lr_schedulers"]) == 2

    resumed_cfg = compose_config([*FAST, "trainer.max_steps=3", f"ckpt_path={ckpt_path}"], tmp_path / "second")
    torch.manual_seed(123)  # a different init: everything trained must come from the checkpoint
    trainer2, module2, _ = run(resumed_cfg)
    assert trainer2.global_step == 3
    first_state = trainer2.optimizers[0].state
    assert all(int(s["step"]) == 3 for s in first_state.values())
    restored = torch.load(ckpt_path, map_location="cpu", weights_only=False)
    # resume started from the saved weights: the one extra step moved them only slightly
    for name, value in restored["state_dict"].items():
        now = dict(module2.named_parameters())[name].detach()
        assert (now - value).abs().max() < 0.05, name


@pytest.mark.slow
def test_demo_runs_end_to_end(tmp_path, monkeypatch):
    """The demo experiment (W&B offline, sample grids, LoRA export) with a reduced step count."""
    monkeypatch.setenv("WANDB_MODE", "offline")
    cfg = compose_config(["+experiment=demo", "trainer.max_steps=4", "callbacks.samples.every_n_steps=2",
                          "callbacks.checkpoint.every_n_train_steps=2", "data.crop_size=64"], tmp_path)
    summary = run(cfg)[2]
    run_dir = Path(summary["run_dir"])
    assert (run_dir / "config.yaml").is_file()
    assert list((run_dir / "wandb").glob("offline-run-*")), "no offline W&B run folder"
    grids = sorted((run_dir / "samples").glob("step_*.png"))
    assert [g.name for g in grids] == ["step_000002.png", "step_000004.png"]
    assert Path(summary["lora"]).stat().st_size > 0 and Path(summary["lora_sidecar"]).is_file()
    assert (run_dir / "summary.json").is_file()


@pytest.mark.slow
def test_image_space_vsd_trains_and_differs_from_latent(tmp_path):
    a = run(compose_config([*FAST, "method.vsd_space=image"], tmp_path / "image"))[2]
    b = run(compose_config(FAST, tmp_path / "latent"))[2]
    la, lb = logged_losses(Path(a["run_dir"])), logged_losses(Path(b["run_dir"]))
    assert len(la) == 2 and all(map(math.isfinite, la))
    assert la[0] != lb[0]  # VSD computed on E(x_H) instead of z_H


def test_x_l_is_added_except_for_validation_batches():
    import pytorch_lightning as pl
    from pytorch_lightning.trainer.states import RunningStage

    module = build_module(compose_config(TINY))
    hq = torch.rand(1, 3, 64, 64) * 2 - 1
    assert module.on_after_batch_transfer({"hq": hq}, 0)["lq_up"].shape == hq.shape  # no trainer: a plain step
    module.trainer = pl.Trainer(logger=False, enable_checkpointing=False, enable_progress_bar=False)
    for stage, wanted in ((RunningStage.TRAINING, True), (RunningStage.VALIDATING, False),
                          (RunningStage.SANITY_CHECKING, False), (None, True)):  # None: after fit, e.g. benchmarks
        module.trainer.state.stage = stage
        assert ("lq_up" in module.on_after_batch_transfer({"hq": hq}, 0)) is wanted, stage
