"""Inference fast paths, each a ``pipeline.fast.*`` switch in conf/infer.yaml.

Applied after LoRA is merged and the generator is on its device and precision: the attention kernel
(PyTorch's scaled_dot_product_attention or diffusers' plain matmul-softmax processor), fused QKV
projections (one Linear for q, k, v; only on merged weights, since PEFT's adapters wrap q/k/v
separately), channels_last memory layout for the convolutions, and ``torch.compile`` of the UNet and
the VAE encoder/decoder, falling back to eager when the backend is unavailable or fails to compile.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import torch
from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0, FusedAttnProcessor2_0
from omegaconf import DictConfig
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn

from osediff_lab.backbones import backbone_of
from osediff_lab.models.generator import OneStepGenerator

log = logging.getLogger(__name__)

ATTENTION = {"sdpa": AttnProcessor2_0, "plain": AttnProcessor}  # the VAE's; the denoiser's: its backbone's


def fast_path_problems(fast: DictConfig, merge_lora: bool) -> list[str]:
    """Every problem with ``pipeline.fast``, each naming the key."""
    problems = []
    if fast.attention not in ATTENTION:
        problems.append(f"pipeline.fast.attention='{fast.attention}' must be one of {sorted(ATTENTION)}")
    if fast.fuse_qkv and not merge_lora:
        problems.append("pipeline.fast.fuse_qkv=true needs pipeline.merge_lora=true (LoRA wraps q, k, v separately)")
    if fast.fuse_qkv and fast.attention != "sdpa":
        problems.append("pipeline.fast.fuse_qkv=true runs diffusers' fused SDPA processor: set pipeline.fast.attention=sdpa")
    return problems


def set_attention(generator: OneStepGenerator, kind: str) -> None:
    """The same attention kernel in every denoiser and VAE attention layer (the denoiser's processor class for
    that kernel is its backbone's: SD3's joint attention has its own)."""
    generator.vae.set_attn_processor(ATTENTION[kind]())
    backbone_of(generator.unet).set_attention(generator.unet, kind)


def fuse_qkv(generator: OneStepGenerator) -> None:
    """One projection for q, k, v (k, v in cross-attention) in the denoiser and VAE; needs merged LoRA."""
    if any(isinstance(m, BaseTunerLayer) for m in generator.modules()):
        raise ValueError("fuse QKV projections only after LoRA is merged and unloaded (pipeline.merge_lora=true)")
    backbone_of(generator.unet).fuse_qkv(generator.unet)
    generator.vae.fuse_qkv_projections()
    generator.vae.set_attn_processor(FusedAttnProcessor2_0())


def compile_with_fallback(module: nn.Module, mode: str = "default", backend: str | Callable = "inductor") -> bool:
    """Compile ``module.forward`` in place; on any compile failure (now or at the first call) run eager.

    Returns whether the compiled forward was installed. A failure at call time reruns that call eagerly,
    so a genuine error in the model still surfaces, from the eager path.
    """
    eager = module.forward
    try:
        compiled = torch.compile(eager, mode=None if mode == "default" else mode, backend=backend)
    except Exception as exc:  # an unknown or unavailable backend raises here
        log.warning("torch.compile unavailable for %s (%s); running eager", type(module).__name__, exc)
        return False

    def forward(*args: Any, **kwargs: Any) -> Any:
        try:
            return compiled(*args, **kwargs)
        except Exception as exc:  # backend errors (no compiler, no triton, ...) surface at the first call
            log.warning("torch.compile failed for %s (%s: %s); running eager", type(module).__name__, type(exc).__name__, exc)
            module.forward = eager
            return eager(*args, **kwargs)

    module.forward = forward
    return True


def apply_fast_paths(generator: OneStepGenerator, fast: DictConfig) -> None:
    """Apply ``pipeline.fast`` to a generator whose LoRA is merged (when fusing) and that sits on its device."""
    set_attention(generator, fast.attention)
    if fast.fuse_qkv:
        fuse_qkv(generator)
    if fast.channels_last:
        generator.to(memory_format=torch.channels_last)
    if fast.compile:
        for module in (generator.unet, generator.vae.encoder, generator.vae.decoder):
            compile_with_fallback(module, fast.compile_mode, fast.compile_backend)
