"""The loop's plug-in points, exercised from this file alone: a method with three parameter groups (one updated
twice per generator step with betas (0, 0.99)) trains, resumes bit-identically, exports and re-imports; gradient
accumulation equals one larger batch (one process and two gloo ranks, fp16's scaler once per step); EMA equals
a hand-computed average of the recorded weights, survives a resume bit for bit, and is exported beside the
live weights."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest
import pytorch_lightning as pl
import torch
import torch.multiprocessing as mp
import torch.nn.functional as F
from omegaconf import DictConfig, OmegaConf, open_dict
from safetensors.torch import load_file
from torch import nn

from helpers import TINY, compose_config
from osediff_lab.ema import EMA
from osediff_lab.errors import ConfigError
from osediff_lab.methods.base import GENERATOR, Method, ParamGroup, weighted_total
from osediff_lab.models.osediff import build_generator
from osediff_lab.train import build_module, run

# ---- a method defined here, not in src/ -----------------------------------------------------------------------

CRITIC, AUX = "critic", "aux"


class ThreeGroupMethod(Method):
    """L2 + a critic's score on x_H; the critic learns real vs fake (hinge), twice per generator step; ``aux``
    tracks the mean of z_H. Toy math, real plumbing: any number of named groups with their own settings."""

    groups = (GENERATOR, CRITIC, AUX)
    export_stem = "three_group_lora"

    def __init__(self, components, encode_text, lpips, generator: DictConfig, optim: dict, adv_weight: float) -> None:
        gen, targets = build_generator(components, generator)
        super().__init__(gen, targets, encode_text, lpips, optim)
        self.critic = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.SiLU(), nn.Conv2d(4, 1, 3, padding=1))
        self.aux = nn.Parameter(torch.zeros(1))
        self.weights = {"l2": 1.0, "adv": adv_weight}

    def param_groups(self) -> dict[str, ParamGroup]:
        trained = [p for p in self.generator.parameters() if p.requires_grad]
        return {GENERATOR: self.group(GENERATOR, trained), CRITIC: self.group(CRITIC, list(self.critic.parameters())),
                AUX: self.group(AUX, [self.aux])}

    def generator_losses(self, batch: dict[str, Any], embeds) -> tuple[dict[str, torch.Tensor], Any]:
        x_h, z_h = self.generator(batch["lq_up"], embeds)
        terms = {"l2": F.mse_loss(x_h.float(), batch["hq"].float()), "adv": -self.critic(x_h).mean()}
        return weighted_total(terms, self.weights), (x_h.detach(), batch["hq"], z_h.detach())

    def group_loss(self, name: str, state: Any, embeds) -> torch.Tensor:
        x_h, hq, z_h = state
        if name == CRITIC:
            return F.relu(1 - self.critic(hq)).mean() + F.relu(1 + self.critic(x_h)).mean()
        return (self.aux - z_h.mean()).pow(2).sum()


def three_group_config(tmp_path: Path, *overrides: str) -> DictConfig:
    cfg = compose_config([*TINY, "data.crop_size=32", "trainer.log_every_n_steps=1", "callbacks.samples.every_n_steps=0",
                          "trainer.enable_progress_bar=false", "callbacks.checkpoint.every_n_train_steps=1", *overrides],
                         tmp_path)
    with open_dict(cfg):
        cfg.method = OmegaConf.create({
            "_target_": f"{__name__}.ThreeGroupMethod", "generator": OmegaConf.to_container(cfg.generator), "adv_weight": 0.1,
            "optim": {GENERATOR: {"lr": 1e-3}, CRITIC: {"lr": 2e-3, "betas": [0.0, 0.99], "updates": 2, "weight_decay": 0.0},
                      AUX: {"lr": 1e-2}},
        })
    return cfg


@pytest.mark.slow
def test_a_method_with_three_groups_trains_resumes_exports_and_reimports(tmp_path):
    straight, _ = tmp_path / "straight", tmp_path / "resumed"
    trainer, module, summary = run(three_group_config(straight, "trainer.max_steps=3"))
    optimizers = dict(zip(module.groups, trainer.optimizers, strict=True))
    critic_opt = optimizers[CRITIC]
    assert critic_opt.param_groups[0]["betas"] == (0.0, 0.99) and critic_opt.param_groups[0]["lr"] == 2e-3
    steps = {name: {int(s["step"]) for s in opt.state.values()} for name, opt in optimizers.items()}
    assert steps == {GENERATOR: {3}, CRITIC: {6}, AUX: {3}}, "the critic is updated twice per generator step"
    assert trainer.global_step == 3, "global_step counts generator steps only"

    # resume: 2 steps, then the same command to 3, equals 3 straight (every group and optimiser state)
    resumed = tmp_path / "resumed"
    run(three_group_config(resumed, "trainer.max_steps=2"))
    _, module2, summary2 = run(three_group_config(resumed, "trainer.max_steps=3"))
    a, b = module.trained_state_dict(), module2.trained_state_dict()
    assert set(a) == set(b) and any(k.startswith("method.critic.") for k in a)
    assert all(torch.equal(a[k], b[k]) for k in a), "resume is not bit-identical"

    # export under the method's own name, re-import through the pipeline
    lora = Path(summary["lora"])
    assert lora.name == "three_group_lora.safetensors" and json.loads(lora.with_suffix(".json").read_text())["method"]["_target_"].endswith("ThreeGroupMethod")
    from osediff_lab.pipeline import SRPipeline

    pipe = SRPipeline.from_checkpoint(lora, options={"device": "cpu", "precision": "fp32", "merge_lora": False})
    loaded = dict(pipe.generator.named_parameters())
    exported = module.generator_state_dict()
    assert all(torch.equal(loaded[k].detach(), v.detach()) for k, v in exported.items())


def test_a_group_the_method_does_not_define_is_rejected_before_building(tmp_path):
    cfg = three_group_config(tmp_path)
    with open_dict(cfg):
        cfg.method.optim.pop(AUX)
    from osediff_lab.checks import validate_config

    with pytest.raises(ConfigError, match="method.optim.aux is missing"):
        validate_config(cfg)


# ---- gradient accumulation ------------------------------------------------------------------------------------

ACCUM = [*TINY, "data.crop_size=32", "method=osediff_no_vsd", "method.lpips_weight=0", "generator.latent=mode", "optim.grad_clip=0"]


def generator_grads(module) -> list[torch.Tensor]:
    return [p.grad.detach().clone() if p.grad is not None else torch.zeros_like(p) for p in module.groups[GENERATOR].params]


def accumulated_grads(module, hq: torch.Tensor, micro: int) -> list[torch.Tensor]:
    """The generator's gradient after one optimiser step of ``hq`` cut into ``micro`` micro-batches (the step
    leaves the gradients in place; no clipping)."""
    module.accumulate = micro
    module.batches_trained = 0
    optimizers = module.build_optimizers()
    for chunk in hq.chunk(micro):
        batch = module.on_after_batch_transfer({"hq": chunk.clone(), "lq": F.interpolate(chunk, scale_factor=0.25, mode="area")}, 0)
        module.optimize_batch(batch, optimizers, prompts=[""] * chunk.shape[0])
    assert module.batches_trained == micro
    return generator_grads(module)


def test_two_micro_batches_of_two_give_the_gradient_of_one_batch_of_four(tmp_path):
    module = build_module(compose_config(ACCUM, tmp_path)).train()
    start = {n: p.detach().clone() for n, p in module.trained_state_dict().items()}
    hq = torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1
    whole = accumulated_grads(module, hq, 1)
    with torch.no_grad():
        for n, p in module.trained_state_dict().items():
            p.copy_(start[n])
    parts = accumulated_grads(module, hq, 2)
    assert any(g.abs().sum() > 0 for g in whole)
    for a, b in zip(whole, parts, strict=True):
        torch.testing.assert_close(b, a, rtol=0, atol=1e-6)


def test_regularizer_steps_once_per_accumulated_step(tmp_path):
    module = build_module(compose_config([*ACCUM, "optim.accumulate_grad_batches=2"], tmp_path)).train()
    optimizers = module.build_optimizers()
    hq = torch.rand(2, 3, 32, 32) * 2 - 1
    counts = []
    for _ in range(4):
        module.optimize_batch(module.on_after_batch_transfer({"hq": hq.clone()}, 0), optimizers, prompts=[""] * 2)
        counts.append({name: max([int(s["step"]) for s in opt.state.values()] or [0]) for name, opt in optimizers.items()})
    assert counts == [{"generator": 0, "regularizer": 0}, {"generator": 1, "regularizer": 1},
                      {"generator": 1, "regularizer": 1}, {"generator": 2, "regularizer": 2}]


def test_fp16_scaler_backs_off_once_per_accumulated_step(tmp_path):
    """An overflowing scale: nothing happens to it at the first micro-batch; at the second, every group's update
    is skipped and halves it once (the loop's rule without accumulation too)."""
    init = 2.0**20  # overflows fp16 (tests/test_precision.py)
    module = build_module(compose_config([*ACCUM, "trainer.precision=16-mixed", "optim.accumulate_grad_batches=2",
                                          f"optim.grad_scaler.init_scale={init}"], tmp_path)).train()
    optimizers = module.build_optimizers()
    hq = torch.rand(2, 3, 32, 32) * 2 - 1

    def micro_batch() -> dict:
        with torch.autocast("cpu", dtype=torch.float16):  # what trainer.precision=16-mixed runs the step under
            return module.optimize_batch(module.on_after_batch_transfer({"hq": hq.clone()}, 0), optimizers, prompts=[""] * 2)

    logs = micro_batch()
    assert module.grad_scaler().get_scale() == init and "train/skipped_generator" not in logs
    logs = micro_batch()
    skipped = float(logs["train/skipped_generator"]) + float(logs["train/skipped_regularizer"])
    assert skipped == 2 and module.grad_scaler().get_scale() == init * 0.5**skipped


def _rank_grads(rank: int, world: int, port: int, out: str, run_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world)
    try:
        torch.set_num_threads(1)
        torch.manual_seed(0)  # the same random base and LoRA init as the single process below
        module = build_module(compose_config(ACCUM, Path(run_dir))).train()
        hq = torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1
        grads = accumulated_grads(module, hq[2 * rank: 2 * rank + 2], 2)  # this rank's half, one sample a micro-batch
        if rank == 0:
            torch.save(grads, out)
    finally:
        torch.distributed.destroy_process_group()


@pytest.mark.slow
def test_accumulation_on_two_gloo_ranks_gives_the_gradient_of_the_whole_batch(tmp_path):
    """Two ranks x two micro-batches of one sample: after the step's all-reduce, the gradient of the batch of 4 on
    one process (every process builds the random base and LoRA from the same seed)."""
    out = tmp_path / "rank0.pt"
    mp.spawn(_rank_grads, args=(2, 29517, str(out), str(tmp_path)), nprocs=2, join=True)
    torch.manual_seed(0)
    module = build_module(compose_config(ACCUM, tmp_path)).train()
    hq = torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1
    whole = accumulated_grads(module, hq, 1)
    for a, b in zip(whole, torch.load(out), strict=True):
        torch.testing.assert_close(b, a, rtol=0, atol=1e-6)


# ---- EMA ------------------------------------------------------------------------------------------------------


class Recorder(pl.Callback):
    """Records the generator's trained tensors at the start and after every optimiser step."""

    def __init__(self) -> None:
        self.seen: list[dict[str, torch.Tensor]] = []

    def on_fit_start(self, trainer, pl_module) -> None:
        self.seen = [{k: v.detach().clone() for k, v in pl_module.ema_tensors().items()}]

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.seen.append({k: v.detach().clone() for k, v in pl_module.ema_tensors().items()})


EMA_RUN = [*TINY, "data.crop_size=32", "callbacks=ema", "callbacks.ema.decay=0.9", "trainer.log_every_n_steps=1",
           "callbacks.samples.every_n_steps=0", "trainer.enable_progress_bar=false",
           "callbacks.checkpoint.every_n_train_steps=1", f"+callbacks.recorder._target_={__name__}.Recorder"]


@pytest.mark.slow
def test_ema_is_the_hand_computed_average_and_both_exports_are_written(tmp_path):
    trainer, module, summary = run(compose_config([*EMA_RUN, "trainer.max_steps=3"], tmp_path))
    seen = next(c for c in trainer.callbacks if isinstance(c, Recorder)).seen
    assert len(seen) == 4
    expected = dict(seen[0])
    for weights in seen[1:]:
        expected = {k: 0.9 * expected[k] + 0.1 * weights[k] for k in expected}
    ema = load_file(summary["lora_ema"])
    live = load_file(summary["lora"])
    for k, v in expected.items():
        torch.testing.assert_close(ema[k], v, rtol=0, atol=1e-6)
        assert torch.equal(live[k], seen[-1][k])
    moved = [k for k in expected if not torch.equal(seen[-1][k], seen[0][k])]
    assert moved and any(not torch.allclose(ema[k], live[k]) for k in moved)
    sidecars = [json.loads(Path(p).with_suffix(".json").read_text()) for p in (summary["lora"], summary["lora_ema"])]
    assert sidecars[0]["weights"] == "live" and sidecars[1]["weights"] == "ema" and sidecars[1]["ema"]["updates"] == 3


@pytest.mark.slow
def test_ema_resumes_bit_identically(tmp_path):
    _, _, straight = run(compose_config([*EMA_RUN, "trainer.max_steps=4"], tmp_path / "a"))
    run(compose_config([*EMA_RUN, "trainer.max_steps=2"], tmp_path / "b"))
    _, _, resumed = run(compose_config([*EMA_RUN, "trainer.max_steps=4"], tmp_path / "b"))
    a, b = load_file(straight["lora_ema"]), load_file(resumed["lora_ema"])
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)


def test_ema_warmup_and_cpu_shadow_follow_the_formula():
    """decay_n = min(d, (1 + n) / (w + n)) at the n-th update; the shadow may live on the CPU."""
    w = {"x": torch.zeros(2)}
    ema = EMA(w, decay=0.99, warmup=10, device="cpu")
    values, shadow = [torch.full((2,), float(i)) for i in range(1, 6)], torch.zeros(2)
    for n, v in enumerate(values, start=1):
        d = min(0.99, (1 + n) / (10 + n))
        shadow = d * shadow + (1 - d) * v
        ema.update({"x": v})
        torch.testing.assert_close(ema.shadow["x"], shadow, rtol=0, atol=1e-7)
    live = torch.nn.Parameter(torch.full((2,), 7.0))
    with ema.swapped({"x": live}):
        assert torch.equal(live.detach(), ema.shadow["x"])
    assert torch.equal(live.detach(), torch.full((2,), 7.0))


@pytest.mark.slow
def test_accumulated_training_resumes_bit_identically(tmp_path):
    """optim.accumulate_grad_batches=2 under the trainer: max_steps counts optimiser steps (two batches each), and
    a run stopped at step 2 and resumed to 3 equals a straight run (checkpoints fall between accumulated steps)."""
    common = [*ACCUM, "optim.accumulate_grad_batches=2", "trainer.log_every_n_steps=1", "callbacks.samples.every_n_steps=0",
              "trainer.enable_progress_bar=false", "callbacks.checkpoint.every_n_train_steps=1"]
    trainer, module, _ = run(compose_config([*common, "trainer.max_steps=3"], tmp_path / "a"))
    assert trainer.global_step == 3 and module.batches_trained == 6
    run(compose_config([*common, "trainer.max_steps=2"], tmp_path / "b"))
    _, resumed, _ = run(compose_config([*common, "trainer.max_steps=3"], tmp_path / "b"))
    a, b = module.trained_state_dict(), resumed.trained_state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


# ---- training-health telemetry -----------------------------------------------------------------------------------


def test_health_rules_by_hand():
    """Each rule on a hand-made stream: a term 50x another for 300 steps, D accuracy 0.995 for 500 steps, a
    regularizer loss that doubles; a ratio that breaks in between restarts its count."""
    from osediff_lab.lit.health import HealthRules

    rules = HealthRules(term_ratio=40, term_ratio_steps=300, d_accuracy=0.99, d_accuracy_steps=500, rising_window=2,
                        rising_ratio=1.5, groups=("regularizer",))
    raised = []
    for step in range(0, 700, 100):
        vsd = 1.0 if step == 100 else 50.0  # the ratio breaks at step 100: the count restarts at 200
        raised += rules.observe(step, {"train/grad_zh_vsd": vsd, "train/grad_zh_l2": 1.0, "train/d_accuracy": 0.995,
                                       "train/loss_regularizer": 1.0 if step < 200 else 2.0})
    assert "VSD gradient is 50x L2's at z_H since step 200" in raised
    assert any(m.startswith("D accuracy >= 0.99 for 500 steps since step 0") for m in raised)
    assert any(m.startswith("regularizer loss rising") for m in raised)
    assert len(raised) == 3 and not rules.observe(700, {"train/grad_zh_vsd": 50.0, "train/grad_zh_l2": 1.0})


def test_term_gradients_are_the_gradient_of_each_weighted_term_at_z_h(tmp_path):
    """Truth: autograd of weight x term with respect to z_H, one term at a time, on a fresh forward."""
    module = build_module(compose_config([*TINY, "data.crop_size=32", "method.vsd_weight=0.5", "generator.latent=mode"],
                                         tmp_path)).train()
    hq = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1
    batch = module.on_after_batch_transfer({"hq": hq}, 0)
    embeds = module.encode_text([""] * 2)
    torch.manual_seed(1)
    terms, _ = module.method.generator_losses(batch, embeds)
    norms = module.term_gradients(terms)
    assert set(norms) == {"train/grad_zh_l2", "train/grad_zh_lpips", "train/grad_zh_vsd"}
    z_h = module.method.outputs["z_h"]
    for term, weight in (("l2", 1.0), ("lpips", 2.0), ("vsd", 0.5)):
        (grad,) = torch.autograd.grad(terms[term] * weight, z_h, retain_graph=True)
        torch.testing.assert_close(norms[f"train/grad_zh_{term}"], grad.norm())


TELEMETRY = [*TINY, "data.crop_size=32", "trainer.log_every_n_steps=1", "callbacks.samples.every_n_steps=0",
             "trainer.enable_progress_bar=false", "callbacks.checkpoint.every_n_train_steps=0",
             "health.warnings.term_ratio_steps=2"]


@pytest.mark.slow
def test_an_overweighted_vsd_is_named_and_a_healthy_run_is_not(tmp_path):
    """method.vsd_weight=50: the VSD term's gradient dwarfs L2's at z_H and the run's summary says so; the same run
    at the demo's VSD weight raises nothing."""
    _, _, broken = run(compose_config([*TELEMETRY, "trainer.max_steps=4", "method.vsd_weight=50", "method.lpips_weight=0"],
                                      tmp_path / "broken"))
    assert any(m.startswith("VSD gradient is") and "L2's at z_H since step 0" in m for m in broken["health"]["warnings"])
    assert broken["health"]["last"]["train/grad_zh_vsd"] > 40 * broken["health"]["last"]["train/grad_zh_l2"]
    assert "train/grad_norm_unet.conv_out" in broken["health"]["last"]
    _, _, healthy = run(compose_config([*TELEMETRY, "trainer.max_steps=4", "method.vsd_weight=0.02", "method.lpips_weight=0"],
                                       tmp_path / "healthy"))
    assert healthy["health"]["warnings"] == []


@pytest.mark.slow
def test_discriminator_accuracy_by_hand_and_logged_for_a_gan_run(tmp_path):
    """d_accuracy: the share of real logits > 0 and fake logits < 0, averaged over levels and the two sides (what the
    'no signal' rule reads); a HYPIR run logs it with each term's gradient at z_H, the GAN's included."""
    from osediff_lab.discriminators.losses import accuracy

    real = [torch.tensor([1.0, -1.0, 2.0, 3.0]), torch.tensor([0.5, 0.5])]  # 3/4 and 2/2 right
    fake = [torch.tensor([-1.0, 1.0, 1.0, 1.0]), torch.tensor([-0.5, -2.0])]  # 1/4 and 2/2 right
    assert float(accuracy(real, fake)) == (0.75 + 1.0 + 0.25 + 1.0) / 4
    gan = [*TELEMETRY, "method=hypir", "discriminator=convnext_tiny", "generator.lora.unet_rank=8",
           "generator.lora.unet_alpha=8", "trainer.max_steps=2", "data.crop_size=64"]
    _, _, summary = run(compose_config(gan, tmp_path))
    last = summary["health"]["last"]
    assert 0 <= last["train/d_accuracy"] <= 1 and {"train/grad_zh_gan", "train/grad_zh_l2"} <= set(last)
