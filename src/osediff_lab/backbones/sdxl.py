"""SDXL (family ``sdxl``): SD's UNet with added conditions. Two CLIP encoders' penultimate hidden states
concatenated on the width; the pooled embedding is the second (projection) encoder's text embedding, given to
the UNet with size/crop time ids (``text_time``). Folder: SD's plus tokenizer_2/ and text_encoder_2/."""

from __future__ import annotations

from collections.abc import Collection
from typing import Any

import torch
from torch import nn

from osediff_lab.backbones.base import Components, Release, TextPart, clip_files, common_files
from osediff_lab.backbones.embeds import TextEmbeds
from osediff_lab.backbones.sd import SDBackbone
from osediff_lab.backbones.text import TextEncoders
from osediff_lab.dtypes import host_to_device

SDXL_LICENCE = (
    "CreativeML Open RAIL++-M (not gated; its use restrictions apply): "
    "https://huggingface.co/stabilityai/stable-diffusion-xl-base-1.0/blob/main/LICENSE.md"
)


def size_time_ids(latent: torch.Tensor, factor: int) -> torch.Tensor:
    """SDXL's micro-conditioning for an uncropped image of the latent's pixel size: (original h, w, crop top,
    left, target h, w) per sample, in the latent's dtype."""
    h, w = latent.shape[-2] * factor, latent.shape[-1] * factor
    ids = host_to_device(torch.tensor([h, w, 0, 0, h, w]), latent.device, latent.dtype)
    return ids.expand(latent.shape[0], -1)


class SDXLText(TextEncoders):
    """Both CLIPs' penultimate hidden states concatenated; pooled = the projection encoder's text embedding."""

    def encode(self, prompts: list[str]) -> TextEmbeds:
        outs = [self.run(i, prompts, output_hidden_states=True) for i in range(len(self.encoders))]
        return TextEmbeds(torch.cat([out.hidden_states[-2] for out in outs], dim=-1), outs[-1][0])


def sdxl_encode_prompt(tokenizers: list, encoders: list[nn.Module], prompts: list[str], net: nn.Module,
                       options: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor | None]:
    """SDXL, standalone (``Backbone.standalone``): both CLIPs' penultimate hidden states concatenated; pooled = the
    second one's text embedding."""
    outs = [enc(tok(prompts, padding="max_length", max_length=tok.model_max_length, truncation=True,
                    return_tensors="pt").input_ids, output_hidden_states=True) for tok, enc in zip(tokenizers, encoders, strict=True)]
    return torch.cat([out.hidden_states[-2] for out in outs], dim=-1), outs[-1][0]


def sdxl_call_denoiser(net: nn.Module, z: torch.Tensor, t: torch.Tensor, hidden: torch.Tensor, pooled: torch.Tensor | None,
                       factor: int, options: dict[str, Any]) -> torch.Tensor:
    """SDXL, standalone: the UNet with the pooled embedding and the time ids of an uncropped image of the latent's size."""
    h, w = z.shape[-2] * factor, z.shape[-1] * factor
    ids = torch.tensor([h, w, 0, 0, h, w], dtype=z.dtype).expand(z.shape[0], -1)
    return net(z, t, encoder_hidden_states=hidden, added_cond_kwargs={"text_embeds": pooled, "time_ids": ids}).sample


class SDXLBackbone(SDBackbone):
    """SDXL-base-1.0 and UNets of its layout."""

    name = "sdxl"
    text_parts = (TextPart("", "CLIPTokenizer", "CLIPTextModel"), TextPart("_2", "CLIPTokenizer", "CLIPTextModelWithProjection"))
    releases = (Release("sdxl_base", "SDXL-base-1.0", "sdxl", "stable-diffusion-xl-base-1.0",
                        "stabilityai/stable-diffusion-xl-base-1.0", SDXL_LICENCE),)
    folder_files = (*common_files("unet", "UNet", 10270, 335), *clip_files("text_encoder", "CLIP ViT-L text encoder", 492),
                    *clip_files("text_encoder_2", "OpenCLIP-bigG text encoder (with projection)", 2780))
    standalone = (sdxl_encode_prompt, sdxl_call_denoiser)

    @classmethod
    def recognises(cls, parts: Collection[str], denoiser_class: str | None) -> bool:
        return "unet" in parts and "text_encoder_2" in parts

    @classmethod
    def recognises_denoiser(cls, net: nn.Module) -> bool:
        return getattr(getattr(net, "config", None), "addition_embed_type", None) == "text_time"

    def text_encoders(self, c: Components) -> TextEncoders:
        return SDXLText([c.tokenizer, c.tokenizer_2], [c.text_encoder, c.text_encoder_2])

    def denoiser_output(self, net: nn.Module, z_t: torch.Tensor, timestep: torch.Tensor, embeds: TextEmbeds,
                        factor: int) -> torch.Tensor:
        added = {"text_embeds": embeds.pooled.to(z_t.dtype), "time_ids": size_time_ids(z_t, factor)}
        return net(z_t, timestep, encoder_hidden_states=embeds.hidden.to(z_t.dtype), added_cond_kwargs=added).sample

    def conditioning_problems(self, c: Components) -> list[str]:
        unet, problems = c.denoiser.config, []
        widths = [int(m.config.hidden_size) for m in (c.text_encoder, c.text_encoder_2)]
        pooled = int(c.text_encoder_2.config.projection_dim)
        if unet.cross_attention_dim != sum(widths):
            problems.append(f"UNet cross_attention_dim {unet.cross_attention_dim} != the two text encoders' widths {widths}")
        if unet.projection_class_embeddings_input_dim != 6 * unet.addition_time_embed_dim + pooled:
            problems.append(f"UNet projection_class_embeddings_input_dim {unet.projection_class_embeddings_input_dim} != "
                            f"6 time ids x {unet.addition_time_embed_dim} + pooled width {pooled}")
        return problems
