"""generator.frozen_dtype=fp8_e4m3: the frozen denoiser's Linear / Conv2d weights in e4m3 with per-channel scales,
error-bounded against fp32 and bf16 storage, LoRA trainable on top, one copy for a shared base, predicted smaller."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from helpers import TINY, compose_config
from osediff_lab.memory import predict_training_memory, training_step
from osediff_lab.models.frozen import FP8, FP8Conv2d, FP8Weight, quantize_fp8, store_fp8
from osediff_lab.train import build_module

pytestmark = pytest.mark.usefixtures("single_thread")
FP8_REL = 2.0**-4  # e4m3: three mantissa bits, round to nearest
BF16_REL = 2.0**-8


def test_quantized_weights_within_e4m3_rounding():
    w = torch.randn(64, 48) * torch.logspace(-3, 1, 64)[:, None]  # channels of very different magnitudes
    values, scale = quantize_fp8(w)
    assert values.dtype == FP8 and scale.shape == (64, 1) and values.element_size() == 1
    error = (values.float() * scale - w).abs()
    subnormal_step = 2.0**-9 * scale  # e4m3's smallest step, per channel
    assert torch.all(error <= FP8_REL * w.abs() + subnormal_step / 2 + 1e-12)
    torch.testing.assert_close((values.float() * scale).abs().amax(dim=1), w.abs().amax(dim=1))  # each channel's max kept
    bf16_error = (w.bfloat16().float() - w).abs()
    assert torch.all(bf16_error <= BF16_REL * w.abs())
    assert error.mean() > bf16_error.mean()  # 8 bits cost precision: the bound is e4m3's, not bf16's


@pytest.mark.parametrize("layer", [nn.Linear(32, 24), nn.Conv2d(8, 16, 3, padding=1, stride=2)])
def test_fp8_layers_against_fp32_and_bf16(layer):
    x = torch.randn(4, 32) if isinstance(layer, nn.Linear) else torch.randn(2, 8, 12, 12)
    with torch.no_grad():
        want = layer(x)
        got = store_fp8_copy(layer)(x)
        bf16 = layer.to(torch.bfloat16)(x.bfloat16()).float()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            autocast = store_fp8_copy(layer.float())(x)
    rel = lambda a: ((a.float() - want).norm() / want.norm()).item()  # noqa: E731
    assert rel(got) < FP8_REL and rel(bf16) < 4 * BF16_REL
    assert autocast.dtype == torch.bfloat16 and rel(autocast) < FP8_REL + 4 * BF16_REL


@pytest.mark.parametrize("layer", [nn.Linear(32, 24), nn.Conv2d(8, 16, 3, padding=1, stride=2)])
def test_fp8_layers_input_gradient_from_the_8_bit_weight(layer):
    """backward dequantises the saved 8-bit weight again: the input's gradient is that of the dequantised layer,
    and the graph holds no full-precision copy of the weight."""
    x = (torch.randn(4, 32) if isinstance(layer, nn.Linear) else torch.randn(2, 8, 12, 12)).requires_grad_(True)
    fp8 = store_fp8_copy(layer)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        out = fp8(x)
    assert {t.dtype for t in saved} == {FP8, torch.float32} and sum(t.numel() for t in saved if t.dtype == FP8) == fp8.weight_fp8.numel()
    (grad,) = torch.autograd.grad(out.square().sum(), x)
    weight, bias = fp8.dequantized(torch.float32)
    x_ref = x.detach().requires_grad_(True)
    ref = fp8.apply_weight(x_ref, weight, bias)
    (want,) = torch.autograd.grad(ref.square().sum(), x_ref)
    torch.testing.assert_close(out, ref)
    torch.testing.assert_close(grad, want)


def store_fp8_copy(layer: nn.Module) -> nn.Module:
    holder = nn.Sequential(layer).requires_grad_(False)
    assert store_fp8(holder) == 1
    return holder[0]


def fp8_cfg(frozen: str = "fp8_e4m3", *extra: str):
    return compose_config([*TINY, f"generator.frozen_dtype={frozen}", "trainer.precision=bf16-mixed", *extra])


@pytest.mark.slow
def test_fp8_base_trains_lora_on_top_with_one_copy_of_the_shared_base():
    torch.manual_seed(0)
    module = build_module(fp8_cfg()).train()
    gen, reg = module.method.generator.unet, module.method.reg_unet
    gen_fp8 = {id(m) for m in gen.modules() if isinstance(m, FP8Weight)}
    reg_fp8 = {id(m) for m in reg.modules() if isinstance(m, FP8Weight)}
    reg_conv_in = id(reg.get_submodule("conv_in").get_base_layer())
    assert gen_fp8 and reg_fp8 - gen_fp8 == {reg_conv_in}  # one 8-bit copy of the shared base; the generator's own conv_in
    assert not any(isinstance(m, FP8Weight) for m in module.method.generator.vae.modules())
    assert not isinstance(gen.get_submodule("conv_in").get_base_layer(), FP8Conv2d)  # trained in full: fp32
    lora = {n: p.detach().clone() for n, p in gen.named_parameters() if ".lora_" in n and p.requires_grad}
    frozen = {n: b.clone() for n, b in gen.named_buffers() if n.endswith("weight_fp8")}
    assert lora and frozen and all(p.dtype == torch.float32 for p in lora.values())
    training_step(module, torch.rand(2, 3, 64, 64) * 2 - 1)()
    after = dict(gen.named_parameters())
    assert any(not torch.equal(after[n], v) for n, v in lora.items())  # LoRA learns on the 8-bit base
    assert all(torch.equal(b, frozen[n]) for n, b in gen.named_buffers() if n in frozen)


@pytest.mark.slow
def test_fp8_generator_output_close_to_bf16_storage():
    outputs = {}
    for frozen in ("fp32", "bf16", "fp8_e4m3"):
        torch.manual_seed(0)
        cfg = fp8_cfg(frozen) if frozen != "fp32" else compose_config(TINY)
        module = build_module(cfg).eval()
        x = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(1)) * 2 - 1
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=frozen != "fp32"):
            outputs[frozen] = module.method.generator.denoise(module.method.generator.encode(x), module.encode_text([""])).float()
    rel = {k: ((v - outputs["fp32"]).norm() / outputs["fp32"].norm()).item() for k, v in outputs.items() if k != "fp32"}
    assert rel["bf16"] < 0.02 and rel["fp8_e4m3"] < 0.1, rel


@pytest.mark.slow
def test_fp8_prediction_smaller_than_bf16():
    bf16 = predict_training_memory(fp8_cfg("bf16"), steps=1)
    fp8 = predict_training_memory(fp8_cfg("fp8_e4m3"), steps=1)
    assert fp8.static < bf16.static and fp8.peak < bf16.peak
