"""What a method needs from a base model's denoiser, whatever the architecture: its family, how it is called
on a latent with text conditioning, how its LoRA targets group, and the VAE's latent scaling.

Three families share one code path: ``sd`` (SD2.1, SD-Turbo: UNet2DConditionModel on CLIP hidden states),
``sdxl`` (UNet2DConditionModel with ``added_cond_kwargs``: a pooled text embedding and size/crop time ids)
and ``sd3`` (SD3Transformer2DModel: joint attention over CLIP + T5 tokens and a pooled projection). The
denoiser keeps the attribute name ``unet`` in the generator for every family, so LoRA file keys stay
``unet.*``.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch
from diffusers import AutoencoderKL, SD3Transformer2DModel
from torch import nn

from osediff_lab.dtypes import host_to_device

FAMILIES = ("sd", "sdxl", "sd3")


@dataclass(frozen=True)
class TextEmbeds:
    """Prompt conditioning, one row per prompt: per-token ``hidden`` states (B, tokens, width) and, for SDXL
    and SD3, a ``pooled`` vector (B, width). Tensor-like where the methods need it (device, batch, detach)."""

    hidden: torch.Tensor
    pooled: torch.Tensor | None = None

    def __len__(self) -> int:
        return self.hidden.shape[0]

    def to(self, *args, **kwargs) -> TextEmbeds:
        pooled = None if self.pooled is None else self.pooled.to(*args, **kwargs)
        return TextEmbeds(self.hidden.to(*args, **kwargs), pooled)

    def detach(self) -> TextEmbeds:
        return TextEmbeds(self.hidden.detach(), None if self.pooled is None else self.pooled.detach())

    def __getitem__(self, index: int | slice | torch.Tensor) -> TextEmbeds:
        """Rows ``index`` (an int keeps its batch dimension of 1)."""
        if isinstance(index, int):
            index = slice(index, index + 1)
        return TextEmbeds(self.hidden[index], None if self.pooled is None else self.pooled[index])

    def expand(self, batch: int) -> TextEmbeds:
        """A one-row embedding repeated ``batch`` times (a view, as ``Tensor.expand``)."""
        pooled = None if self.pooled is None else self.pooled.expand(batch, -1)
        return TextEmbeds(self.hidden.expand(batch, -1, -1), pooled)

    @staticmethod
    def cat(items: Iterable[TextEmbeds]) -> TextEmbeds:
        """Rows of every item, in order (all with or all without a pooled vector)."""
        items = list(items)
        pooled = [e.pooled for e in items]
        if any(p is None for p in pooled) and not all(p is None for p in pooled):
            raise ValueError("cannot concatenate embeddings with and without a pooled vector")
        return TextEmbeds(torch.cat([e.hidden for e in items]), None if pooled[0] is None else torch.cat(pooled))


def family_of(net: nn.Module) -> str:
    """'sd3' for an SD3Transformer2DModel, 'sdxl' for a UNet with SDXL's text_time added conditions, else 'sd'."""
    if isinstance(net, SD3Transformer2DModel):
        return "sd3"
    if getattr(net.config, "addition_embed_type", None) == "text_time":
        return "sdxl"
    return "sd"


def vae_factor(vae: AutoencoderKL) -> int:
    """Pixels per latent cell along a side: 2 ** (number of VAE blocks - 1); 8 for SD's VAEs."""
    return 2 ** (len(vae.config.block_out_channels) - 1)


def latent_multiple(net: nn.Module) -> int:
    """The latent side multiple the denoiser needs: SD3's patch size (2); 1 for UNets, which pad themselves."""
    return int(net.config.patch_size) if family_of(net) == "sd3" else 1


def latent_shift(vae: AutoencoderKL) -> float:
    """The VAE's latent shift factor (SD3: 0.0609; none, i.e. 0, for SD2.1 and SDXL)."""
    return float(getattr(vae.config, "shift_factor", None) or 0.0)


def size_time_ids(latent: torch.Tensor, factor: int) -> torch.Tensor:
    """SDXL's micro-conditioning for an uncropped image of the latent's pixel size: (original h, w, crop top,
    left, target h, w) per sample, in the latent's dtype."""
    h, w = latent.shape[-2] * factor, latent.shape[-1] * factor
    ids = host_to_device(torch.tensor([h, w, 0, 0, h, w]), latent.device, latent.dtype)
    return ids.expand(latent.shape[0], -1)


def as_embeds(embeds: TextEmbeds | torch.Tensor) -> TextEmbeds:
    """``embeds`` as TextEmbeds; a bare tensor is SD2.1-style hidden states without a pooled vector."""
    return embeds if isinstance(embeds, TextEmbeds) else TextEmbeds(embeds)


def denoiser_output(net: nn.Module, z_t: torch.Tensor, timestep: torch.Tensor, embeds: TextEmbeds | torch.Tensor,
                    factor: int) -> torch.Tensor:
    """The denoiser's output on the scaled latent ``z_t`` conditioned on ``timestep`` (the schedule's
    ``model_timestep``) and ``embeds``; ``factor`` is the VAE's (SDXL's size ids are in pixels)."""
    embeds = as_embeds(embeds)
    hidden = embeds.hidden.to(z_t.dtype)
    family = family_of(net)
    if family == "sd3":
        return net(hidden_states=z_t, timestep=timestep, encoder_hidden_states=hidden,
                   pooled_projections=embeds.pooled.to(z_t.dtype)).sample
    if family == "sdxl":
        added = {"text_embeds": embeds.pooled.to(z_t.dtype), "time_ids": size_time_ids(z_t, factor)}
        return net(z_t, timestep, encoder_hidden_states=hidden, added_cond_kwargs=added).sample
    return net(z_t, timestep, encoder_hidden_states=hidden).sample


def input_layer(net: nn.Module) -> str:
    """The denoiser's first layer, trained in full by OSEDiff (the UNet's conv_in; SD3's patch embedding)."""
    return "pos_embed.proj" if family_of(net) == "sd3" else "conv_in"


def lora_groups(net: nn.Module, names: Iterable[str]) -> dict[str, list[str]]:
    """OSEDiff's three LoRA groups for any denoiser: encoder (UNet down blocks and conv_in; the first half of
    SD3's transformer blocks and its patch embedding), decoder (up blocks and conv_out; the second half and
    proj_out) and others (the mid block; the embedders and the output norm)."""
    groups: dict[str, list[str]] = {"encoder": [], "decoder": [], "others": []}
    if family_of(net) == "sd3":
        half = len(net.transformer_blocks) // 2
        for name in names:
            parts = name.split(".")
            if name == "pos_embed.proj" or (parts[0] == "transformer_blocks" and int(parts[1]) < half):
                groups["encoder"].append(name)
            elif name == "proj_out" or parts[0] == "transformer_blocks":
                groups["decoder"].append(name)
            else:
                groups["others"].append(name)
        return groups
    for name in names:
        if name.startswith("down_blocks") or name == "conv_in":
            groups["encoder"].append(name)
        elif name.startswith("up_blocks") or name == "conv_out":
            groups["decoder"].append(name)
        else:
            groups["others"].append(name)
    return groups
