"""The training-memory prediction (osediff_lab.memory): the tracker on a hand-worked sequence, the fake-tensor
replay against the same step on real tensors, and the memory options' effect at SD2.1 size."""

from __future__ import annotations

import json

import pytest
import torch

from helpers import TINY, compose_config
from osediff_lab.errors import ConfigError
from osediff_lab.memory import PeakTensorBytes, predict_training_memory, training_step
from osediff_lab.train import build_module

pytestmark = pytest.mark.usefixtures("single_thread")


def test_tracker_peak_by_hand():
    with PeakTensorBytes() as tracker:
        a = torch.empty(1024)  # 4 KiB
        b = torch.empty(2048)  # + 8 KiB = 12 KiB
        view = a.view(32, 32)  # shares a's storage: nothing new
        del a, view  # freed: -4 KiB
        c = torch.empty(4096)  # + 16 KiB = 24 KiB, the peak
        del c
        d = torch.empty(512)  # 8 + 2 KiB: below the peak
    assert tracker.peak == (2048 + 4096) * 4
    assert b.numel() + d.numel() == 2560
    weight = torch.zeros(1024)
    with PeakTensorBytes([weight]) as tracker:
        weight.add_(1)  # in place on a tensor that existed before: nothing new
        weight.view(32, 32).t()  # views of it (F.linear transposes weights): nothing new
        weight.mul(2)  # a temporary of 4 KiB
    assert tracker.peak == 1024 * 4


def tiny_cfg(*overrides: str):
    return compose_config([*TINY, "data.crop_size=64", "data.batch_size=2", *overrides])


GAN_METHODS = {"osediff": [], "hypir": ["method=hypir", "discriminator=convnext_tiny", "generator.lora.unet_rank=4",
                                          "generator.lora.unet_alpha=4"], "osediff_gan": ["method=osediff_gan"]}


@pytest.mark.slow
@pytest.mark.parametrize("method", list(GAN_METHODS))
def test_fake_replay_predicts_the_real_steps_peak(method):
    """OSEDiff and the adversarial methods (their discriminator's update included) on their tiny twins."""
    cfg = tiny_cfg(*GAN_METHODS[method])
    predicted = predict_training_memory(cfg)
    torch.manual_seed(0)
    module = build_module(cfg).train()
    tensors = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in [*module.parameters(), *module.buffers()]}
    hq = torch.rand(2, 3, 64, 64) * 2 - 1
    step = training_step(module, hq)
    with PeakTensorBytes([*module.parameters(), *module.buffers()]) as tracker:
        step()
        step()
    assert predicted.static == sum(tensors.values())  # shared tensors (the frozen UNet) counted once
    assert predicted.peak == pytest.approx(predicted.static + tracker.peak, rel=0.01)
    assert predicted.activations > 0


def test_predicted_and_benchmarked_step_is_the_training_step():
    """memory and the benchmarks replay SRModule.optimize_batch: its regularizer steps per generator step,
    its clipping and its non-finite skip, not a copy of the step without them."""
    torch.manual_seed(0)
    module = build_module(tiny_cfg("method.optim.regularizer.updates=2", "optim.grad_clip=1e-6")).train()
    built = []
    build = module.build_optimizers
    module.build_optimizers = lambda: built.append(build()) or built[0]
    step = training_step(module, torch.rand(2, 3, 64, 64) * 2 - 1)
    step()
    opt_g, opt_r = built[0]["generator"], built[0]["regularizer"]
    assert {int(s["step"]) for s in opt_g.state.values()} == {1} and {int(s["step"]) for s in opt_r.state.values()} == {2}
    after_clip = [p.grad.norm() for p in module.groups["generator"].params if p.grad is not None]
    assert torch.stack(after_clip).norm() <= 1e-6 * 1.01  # clipped by optim.grad_clip
    before = {n: p.detach().clone() for n, p in module.trained_state_dict().items()}
    build_losses = module.method.generator_losses
    module.method.generator_losses = lambda batch, embeds: _nan_terms(build_losses(batch, embeds))
    step()
    moved = [n for n, p in module.trained_state_dict().items() if n.startswith("method.generator.") and not torch.equal(p, before[n])]
    assert moved == [], "a NaN generator loss must skip the generator update"


def _nan_terms(out):
    terms, z_h = out
    return terms | {"total": terms["total"] * float("nan")}, z_h


@pytest.mark.slow
def test_memory_options_shrink_the_sd21_prediction():
    """At SD2.1 size on fake tensors (seconds, no memory): 384 px keeps the test quick."""
    base = ["model=sd21_shape", "data.crop_size=384", "data.batch_size=1", "loss.lpips.pretrained=false",
            "generator.share_base=false"]
    plain = predict_training_memory(compose_config(base), steps=1)
    shared = predict_training_memory(compose_config([*base, "generator.share_base=true"]), steps=1)
    assert 3.0 * 2**30 < plain.static - shared.static < 3.4 * 2**30  # one fp32 SD2.1 UNet (866M parameters) less
    ckpt = predict_training_memory(compose_config([*base, "generator.gradient_checkpointing=true"]), steps=1)
    bf16 = predict_training_memory(compose_config([*base, "generator.frozen_dtype=bf16", "trainer.precision=bf16-mixed"]), steps=1)
    assert plain.static > 8 * 2**30  # two fp32 UNets (generator + frozen/regularizer), VAE, text encoder, VGG
    assert ckpt.static == plain.static and ckpt.activations < 0.6 * plain.activations
    assert bf16.static < 0.55 * plain.static  # frozen weights at 2 bytes; LoRA and LPIPS stay fp32


def test_prediction_rejects_configs_it_cannot_replay():
    with pytest.raises(ConfigError, match="use_8bit"):
        predict_training_memory(tiny_cfg("optim.use_8bit=true"))
    with pytest.raises(ConfigError, match="frozen_dtype"):
        predict_training_memory(tiny_cfg("generator.frozen_dtype=bf16"))


@pytest.mark.slow
def test_memory_cli_prints_the_prediction(tmp_path):
    import subprocess
    import sys

    proc = subprocess.run(
        [sys.executable, "-m", "osediff_lab.memory", "data.crop_size=64", "data.batch_size=2", f"paths.output_root={tmp_path}"],
        capture_output=True, text=True, timeout=300, check=False,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    want = predict_training_memory(tiny_cfg("loss.lpips.net=vgg"))  # the CLI's defaults: tiny, VGG LPIPS
    assert f"predicted peak tensor memory {want.peak / 2**30:.2f} GiB" in proc.stdout
    saved = json.loads(next(tmp_path.rglob("memory.json")).read_text())
    assert saved == {"static_bytes": want.static, "peak_bytes": want.peak}
