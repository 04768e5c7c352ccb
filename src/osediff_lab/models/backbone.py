"""What a method needs from a base model's denoiser, whatever its family: how it is called on a latent with text
conditioning, how its LoRA targets group, its input layer, the latent side multiple, and the VAE's latent
scaling. Each call asks the denoiser's backbone (``osediff_lab.backbones``); the denoiser keeps the attribute
name ``unet`` in the generator for every family, so LoRA file keys stay ``unet.*``.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from diffusers import AutoencoderKL
from torch import nn

from osediff_lab.backbones import backbone_of, family_of
from osediff_lab.backbones.embeds import TextEmbeds, as_embeds

__all__ = ["TextEmbeds", "as_embeds", "denoiser_output", "family_of", "input_layer", "latent_multiple", "latent_shift",
           "lora_groups", "vae_factor"]


def vae_factor(vae: AutoencoderKL) -> int:
    """Pixels per latent cell along a side: 2 ** (number of VAE blocks - 1); 8 for SD's VAEs."""
    return 2 ** (len(vae.config.block_out_channels) - 1)


def latent_shift(vae: AutoencoderKL) -> float:
    """The VAE's latent shift factor (SD3: 0.0609; none, i.e. 0, for SD2.1 and SDXL)."""
    return float(getattr(vae.config, "shift_factor", None) or 0.0)


def latent_multiple(net: nn.Module) -> int:
    """The latent side multiple the denoiser needs (SD3's patch size 2; 1 for UNets, which pad themselves)."""
    return backbone_of(net).latent_multiple(net)


def denoiser_output(net: nn.Module, z_t: torch.Tensor, timestep: torch.Tensor, embeds: TextEmbeds | torch.Tensor,
                    factor: int) -> torch.Tensor:
    """The denoiser's output on the scaled latent ``z_t`` conditioned on ``timestep`` (the schedule's
    ``model_timestep``) and ``embeds``; ``factor`` is the VAE's (SDXL's size ids are in pixels)."""
    return backbone_of(net).denoiser_output(net, z_t, timestep, as_embeds(embeds), factor)


def input_layer(net: nn.Module) -> str:
    """The denoiser's first layer, trained in full by OSEDiff (the UNet's conv_in; SD3's patch embedding)."""
    return backbone_of(net).input_layer(net)


def lora_groups(net: nn.Module, names: Iterable[str]) -> dict[str, list[str]]:
    """OSEDiff's three LoRA groups (encoder, decoder, others) of the denoiser's module ``names``, per its family."""
    return backbone_of(net).lora_groups(net, names)
