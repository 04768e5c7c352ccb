"""Fast paths agree with the plain path: inference switches (pipeline.fast.*) and training memory options.

Tolerances: fp32 reorderings (SDPA, fused QKV, channels_last, compile) 1e-4 on images in [0, 1];
bf16 frozen weights and bf16 LPIPS 5e-2 relative on the losses (bf16 keeps 8 bits of mantissa);
gradient checkpointing recomputes the same fp32 ops, so 1e-5 relative on gradients; 8-bit AdamW
1e-2 mean relative difference of the first three updates, measured, bound 3e-2. Merged LoRA and fp16/bf16 inference are covered in
tests/test_pipeline.py.
"""

from __future__ import annotations

import copy

import pytest
import torch
from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0, FusedAttnProcessor2_0

from helpers import TINY, compose_config
from osediff_lab.checks import config_problems
from osediff_lab.errors import ConfigError
from osediff_lab.pipeline import SRPipeline
from osediff_lab.pipeline.fast import compile_with_fallback
from osediff_lab.train import build_module
from test_pipeline import lq_batch, make_pipeline, tiny_model

pytestmark = pytest.mark.usefixtures("single_thread")

PLAIN = {"merge_lora": True, "fast": {"attention": "plain"}}


@pytest.fixture(scope="module")
def model():
    components, generator, _ = tiny_model()
    return components, generator


@pytest.fixture(scope="module")
def plain(model):
    return make_pipeline(*model, **PLAIN)(lq_batch(24, 24))


def processors(pipe: SRPipeline) -> set[type]:
    gen = pipe.generator
    return {type(p) for m in (gen.unet, gen.vae) for p in m.attn_processors.values()}


def test_sdpa_matches_plain_attention(model, plain):
    pipe = make_pipeline(*model, merge_lora=True, fast={"attention": "sdpa"})
    assert processors(pipe) == {AttnProcessor2_0}
    assert processors(make_pipeline(*model, **PLAIN)) == {AttnProcessor}
    assert (pipe(lq_batch(24, 24)) - plain).abs().max() < 1e-4


def test_fused_qkv_matches_and_needs_merged_lora(model, plain):
    pipe = make_pipeline(*model, merge_lora=True, fast={"fuse_qkv": True})
    assert processors(pipe) == {FusedAttnProcessor2_0}
    fused = [m for m in pipe.generator.unet.modules() if hasattr(m, "to_qkv") or hasattr(m, "to_kv")]
    assert fused  # every attention layer got its fused projection
    assert (pipe(lq_batch(24, 24)) - plain).abs().max() < 1e-4
    with pytest.raises(ConfigError, match="merge_lora"):
        make_pipeline(*model, merge_lora=False, fast={"fuse_qkv": True})


def test_channels_last_matches(model, plain):
    pipe = make_pipeline(*model, merge_lora=True, fast={"attention": "plain", "channels_last": True})
    assert pipe.generator.unet.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
    assert (pipe(lq_batch(24, 24)) - plain).abs().max() < 1e-4


@pytest.mark.slow
def test_compile_traced_matches_and_a_failing_backend_falls_back(model):
    """Dynamo tracing (backend 'eager': no C++ codegen, seconds on CPU) gives the plain result; a backend
    that raises at compile time leaves the eager forward in place with the same result."""
    gen = copy.deepcopy(model[1]).eval()
    z = torch.randn(1, 4, 6, 6, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = gen.vae.decoder(z)
        decoder = gen.vae.decoder
        assert compile_with_fallback(decoder, backend="eager")
        assert (decoder(z) - want).abs().max() < 1e-4

        def broken(gm, example_inputs):
            raise RuntimeError("backend unavailable")

        fresh = copy.deepcopy(model[1]).vae.decoder.eval()
        eager = fresh.forward
        assert compile_with_fallback(fresh, backend=broken)
        assert (fresh(z) - want).abs().max() < 1e-6
        assert fresh.forward == eager  # later calls skip the failed compile
    assert not compile_with_fallback(copy.deepcopy(decoder), backend="no_such_backend")


# ---- training memory options -----------------------------------------------------------------
def tiny_module(overrides: list[str]):
    cfg = compose_config([*TINY, "generator.latent=mode", "method.vsd_weight=0", *overrides])
    assert not config_problems(cfg)
    torch.manual_seed(0)
    module = build_module(cfg)
    with torch.no_grad():
        for p in module.groups["generator"].params:  # trained-looking LoRA (B starts at 0)
            p.add_(torch.randn_like(p) * 0.05)
    return module.train()


def batch(module, size: int = 32) -> dict:
    g = torch.Generator().manual_seed(3)
    hq = torch.rand(2, 3, size, size, generator=g) * 2 - 1
    return module.on_after_batch_transfer({"hq": hq}, 0)


def generator_grads(module, b: dict) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """The generator loss (L2 + LPIPS; VSD is off in ``tiny_module``) and its trainable tensors' gradients."""
    terms, _ = module.method.generator_losses(b, module.encode_text([""] * b["hq"].shape[0]))
    params = module.groups["generator"].params
    grads = torch.autograd.grad(terms["total"], params, allow_unused=True)
    return terms["total"].detach(), [g if g is not None else torch.zeros_like(p) for g, p in zip(grads, params, strict=True)]


def saved_bytes(module, b: dict) -> int:
    """Bytes autograd keeps for the backward of one generator forward."""
    sizes = []

    def pack(t: torch.Tensor) -> torch.Tensor:
        sizes.append(t.numel() * t.element_size())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        module.generator(b["lq_up"], module.encode_text([""] * b["hq"].shape[0]))
    return sum(sizes)


@pytest.mark.slow
def test_gradient_checkpointing_saves_memory_and_keeps_gradients():
    plain = tiny_module([])
    ckpt = tiny_module(["generator.gradient_checkpointing=true"])
    assert ckpt.generator.unet.is_gradient_checkpointing and ckpt.generator.vae.decoder.gradient_checkpointing
    loss_a, grads_a = generator_grads(plain, batch(plain))
    loss_b, grads_b = generator_grads(ckpt, batch(ckpt))
    assert torch.allclose(loss_a, loss_b, rtol=1e-6)
    for a, b in zip(grads_a, grads_b, strict=True):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-7)
    # blocks' activations are recomputed in backward, not stored
    assert saved_bytes(ckpt, batch(ckpt)) < 0.5 * saved_bytes(plain, batch(plain))


@pytest.mark.slow
def test_frozen_bf16_losses_match_fp32():
    ref = tiny_module(["method.vsd_weight=1"])
    lo = tiny_module(["method.vsd_weight=1", "generator.frozen_dtype=bf16", "trainer.precision=bf16-mixed"])
    assert ref.generator.vae.decoder.conv_in.weight.dtype == torch.float32
    assert lo.generator.vae.decoder.conv_in.weight.dtype == torch.bfloat16
    b = batch(ref)
    torch.manual_seed(5)
    terms_ref, _ = ref.method.generator_losses(b, ref.encode_text(["", ""]))
    torch.manual_seed(5)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        terms_lo, _ = lo.method.generator_losses(b, lo.encode_text(["", ""]))
    for key in ("l2", "lpips", "vsd", "total"):
        assert abs(terms_lo[key].float() - terms_ref[key]) <= 5e-2 * terms_ref[key].abs(), key
    terms_lo["total"].backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in lo.groups["generator"].params if p.grad is not None)


@pytest.mark.slow
def test_bf16_lpips_matches_fp32_and_passes_gradients():
    ref = tiny_module([])
    lo = tiny_module(["loss.lpips.dtype=bf16"])
    assert next(lo.method.lpips.parameters()).dtype == torch.bfloat16
    b = batch(ref)
    loss_ref, grads_ref = generator_grads(ref, b)
    loss_lo, grads_lo = generator_grads(lo, b)
    assert abs(loss_lo - loss_ref) <= 5e-2 * loss_ref
    flat_ref, flat_lo = torch.cat([g.flatten() for g in grads_ref]), torch.cat([g.flatten() for g in grads_lo])
    assert torch.nn.functional.cosine_similarity(flat_ref, flat_lo, dim=0) > 0.95
    assert "loss.lpips.dtype" in " ".join(config_problems(compose_config([*TINY, "loss.lpips.dtype=int8"])))


def test_8bit_adamw_first_step_matches_adamw_on_cpu():
    pytest.importorskip("bitsandbytes")
    import bitsandbytes as bnb

    torch.manual_seed(0)
    weight = torch.nn.Parameter(torch.randn(128, 64))  # >= 4096 elements: bitsandbytes keeps 8-bit states
    twin = torch.nn.Parameter(weight.detach().clone())
    grad = torch.randn(128, 64)
    lr = 1e-3
    opt8 = bnb.optim.AdamW8bit([weight], lr=lr, weight_decay=0.01)
    opt32 = torch.optim.AdamW([twin], lr=lr, weight_decay=0.01)
    start = weight.detach().clone()
    for _ in range(3):
        weight.grad, twin.grad = grad.clone(), grad.clone()
        opt8.step()
        opt32.step()
    assert opt8.state[weight]["state1"].dtype == torch.uint8
    moved8, moved32 = weight.detach() - start, twin.detach() - start
    assert (moved8 - moved32).abs().mean() < 0.03 * moved32.abs().mean()  # measured ~1% (quantised moments)
    assert torch.nn.functional.cosine_similarity(moved8.flatten(), moved32.flatten(), dim=0) > 0.99
