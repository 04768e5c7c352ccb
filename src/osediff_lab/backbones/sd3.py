"""Stable Diffusion 3 (family ``sd3``): an SD3Transformer2DModel (MMDiT) trained by rectified flow, with joint
attention over CLIP-L + CLIP-G tokens (penultimate states concatenated, zero-padded to the joint width) followed
by T5's tokens (zeros when T5 is not loaded, as diffusers' StableDiffusion3Pipeline does), and a pooled
projection of both CLIPs' text embeddings. The latent is cut into 2 x 2 patches inside the transformer, so its
sides must be even. Folder: tokenizer(_2)/, text_encoder(_2)/, vae/, transformer/ (class SD3Transformer2DModel),
scheduler/, optionally tokenizer_3/ + text_encoder_3/ (T5-XXL)."""

from __future__ import annotations

from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from osediff_lab.backbones.base import (
    Backbone,
    Components,
    Release,
    TextPart,
    clip_files,
    common_files,
    library_class,
    t5_files,
    token_map,
    token_points,
)
from osediff_lab.backbones.embeds import TextEmbeds
from osediff_lab.backbones.text import TextEncoders

SD3_LICENCE = (
    "Stability AI Community License (gated): accept it on https://huggingface.co/stabilityai/stable-diffusion-3-medium-diffusers "
    "and log in (HF token) before downloading; free below USD 1M annual revenue, an enterprise licence above"
)


class SD3Text(TextEncoders):
    """CLIP-L and CLIP-G penultimate states, concatenated and zero-padded to ``joint_width``, then T5's
    ``t5_max_length`` tokens (the third encoder; zeros without it); pooled = both CLIP projections concatenated."""

    def __init__(self, tokenizers: list, encoders: list[nn.Module], joint_width: int, t5_max_length: int) -> None:
        super().__init__(tokenizers, encoders)
        self.joint_width = joint_width
        self.t5_max_length = t5_max_length

    def encode(self, prompts: list[str]) -> TextEmbeds:
        hidden, pooled = [], []
        for i in range(2):
            out = self.run(i, prompts, output_hidden_states=True)
            hidden.append(out.hidden_states[-2])
            pooled.append(out[0])  # CLIPTextModelWithProjection: text_embeds
        clip_states = torch.cat(hidden, dim=-1)
        clip_states = F.pad(clip_states, (0, self.joint_width - clip_states.shape[-1]))
        if len(self.encoders) == 2:
            t5_states = clip_states.new_zeros(len(prompts), self.t5_max_length, self.joint_width)
        else:
            t5_states = self.run(2, prompts, self.t5_max_length)[0].to(clip_states.dtype)
        return TextEmbeds(torch.cat([clip_states, t5_states], dim=-2), torch.cat(pooled, dim=-1))


def sd3_encode_prompt(tokenizers: list, encoders: list[nn.Module], prompts: list[str], net: nn.Module,
                      options: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor | None]:
    """SD3, standalone (``Backbone.standalone``): CLIP-L and CLIP-G penultimate states zero-padded to the joint width,
    then T5's tokens (zeros without T5); pooled = both CLIP projections."""
    hidden, pooled = [], []
    for tok, enc in zip(tokenizers[:2], encoders[:2], strict=True):
        out = enc(tok(prompts, padding="max_length", max_length=tok.model_max_length, truncation=True,
                      return_tensors="pt").input_ids, output_hidden_states=True)
        hidden.append(out.hidden_states[-2])
        pooled.append(out[0])
    width, length = int(net.config.joint_attention_dim), int(options["t5_max_length"])
    clip = torch.nn.functional.pad(torch.cat(hidden, dim=-1), (0, width - sum(h.shape[-1] for h in hidden)))
    if len(encoders) > 2:
        ids = tokenizers[2](prompts, padding="max_length", max_length=length, truncation=True, return_tensors="pt").input_ids
        t5 = encoders[2](ids)[0].to(clip.dtype)
    else:
        t5 = clip.new_zeros(len(prompts), length, width)
    return torch.cat([clip, t5], dim=-2), torch.cat(pooled, dim=-1)


def sd3_call_denoiser(net: nn.Module, z: torch.Tensor, t: torch.Tensor, hidden: torch.Tensor, pooled: torch.Tensor | None,
                      factor: int, options: dict[str, Any]) -> torch.Tensor:
    """SD3, standalone: the MMDiT on the scaled latent, with the joint text tokens and the pooled projection."""
    return net(hidden_states=z, timestep=t, encoder_hidden_states=hidden, pooled_projections=pooled).sample


@dataclass(frozen=True)
class SD3Backbone(Backbone):
    """SD3-medium and transformers of its layout. ``load_t5=false`` (model.load_t5) leaves T5-XXL, the memory hog,
    out of a loaded folder; ``t5_max_length`` (model.t5_max_length) is T5's token count (a random twin's is its
    ``arch.text_encoder_3.max_length``)."""

    load_t5: bool = True
    t5_max_length: int = 256

    name = "sd3"
    denoiser_folder = "transformer"
    denoiser_class = "SD3Transformer2DModel"
    text_parts = (TextPart("", "CLIPTokenizer", "CLIPTextModelWithProjection"),
                  TextPart("_2", "CLIPTokenizer", "CLIPTextModelWithProjection"),
                  TextPart("_3", "T5TokenizerFast", "T5EncoderModel", optional=True))
    rectified_flow = True
    schedule_note = "SD3's transformer trains by rectified flow (FlowMatchEulerDiscreteScheduler), not by epsilon or v_prediction"
    attention = {"sdpa": "JointAttnProcessor2_0"}  # diffusers has no plain joint-attention processor
    fused_attention = "FusedJointAttnProcessor2_0"
    releases = (Release("sd3_medium", "SD3-medium", "sd3", "stable-diffusion-3-medium-diffusers",
                        "stabilityai/stable-diffusion-3-medium-diffusers", SD3_LICENCE),)
    # sizes are the Hub's (informational); T5 is two shards and an index
    folder_files = (*common_files("transformer", "MMDiT transformer", 4170, 168),
                    *clip_files("text_encoder", "CLIP ViT-L text encoder (with projection)", 247),
                    *clip_files("text_encoder_2", "OpenCLIP-bigG text encoder (with projection)", 1390),
                    *t5_files("text_encoder_3", "T5-XXL encoder config (optional: model.load_t5)"))
    standalone = (sd3_encode_prompt, sd3_call_denoiser)

    @classmethod
    def recognises(cls, parts: Collection[str], denoiser_class: str | None) -> bool:
        """A transformer/ of SD3's class (or of no recorded class): a FLUX folder names FluxTransformer2DModel."""
        return "transformer" in parts and denoiser_class in (None, cls.denoiser_class)

    @classmethod
    def recognises_arch(cls, arch: Mapping[str, Any]) -> bool:
        """A transformer section without FLUX's single-stream blocks (``num_single_layers``)."""
        return "num_single_layers" not in (arch.get("transformer") or {}) and super().recognises_arch(arch)

    @classmethod
    def recognises_denoiser(cls, net: nn.Module) -> bool:
        return isinstance(net, library_class("diffusers", cls.denoiser_class))

    def wants(self, part: TextPart, path: Path) -> bool:
        return super().wants(part, path) and (not part.optional or self.load_t5)

    def build_random(self, arch: Mapping[str, Any]) -> Components:
        t5 = arch.get("text_encoder_3") or {}
        return Backbone.build_random(replace(self, t5_max_length=int(t5.get("max_length", self.t5_max_length))), arch)

    def text_encoders(self, c: Components) -> TextEncoders:
        tokenizers, encoders = [c.tokenizer, c.tokenizer_2], [c.text_encoder, c.text_encoder_2]
        if c.text_encoder_3 is not None:
            tokenizers.append(c.tokenizer_3)
            encoders.append(c.text_encoder_3)
        return SD3Text(tokenizers, encoders, int(c.denoiser.config.joint_attention_dim), self.t5_max_length)

    def denoiser_output(self, net: nn.Module, z_t: torch.Tensor, timestep: torch.Tensor, embeds: TextEmbeds,
                        factor: int) -> torch.Tensor:
        return net(hidden_states=z_t, timestep=timestep, encoder_hidden_states=embeds.hidden.to(z_t.dtype),
                   pooled_projections=embeds.pooled.to(z_t.dtype)).sample

    def lora_groups(self, net: nn.Module, names: Iterable[str]) -> dict[str, list[str]]:
        """encoder: the first half of the transformer blocks and the patch embedding; decoder: the second half
        and proj_out; others: the embedders and the output norm."""
        groups: dict[str, list[str]] = {"encoder": [], "decoder": [], "others": []}
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

    def input_layer(self, net: nn.Module) -> str:
        return "pos_embed.proj"

    def latent_multiple(self, net: nn.Module) -> int:
        return int(net.config.patch_size)

    def feature_points(self, net: nn.Module) -> dict[str, tuple[nn.Module, int]]:
        """``block.<i>`` (joint block i's image tokens) and ``mid`` (the middle block's)."""
        return token_points(net.transformer_blocks, int(net.config.num_attention_heads * net.config.attention_head_dim))

    def feature_map(self, output: Any, z_t: torch.Tensor, net: nn.Module) -> torch.Tensor:
        return token_map(output[1], z_t, int(net.config.patch_size))  # a joint block gives (text, image) tokens

    def conditioning_problems(self, c: Components) -> list[str]:
        net, problems = c.denoiser.config, []
        widths = [int(m.config.hidden_size) for m in (c.text_encoder, c.text_encoder_2)]
        pooled = sum(int(m.config.projection_dim) for m in (c.text_encoder, c.text_encoder_2))
        if sum(widths) > net.joint_attention_dim:
            problems.append(f"CLIP widths {widths} exceed the transformer's joint_attention_dim {net.joint_attention_dim}")
        if net.pooled_projection_dim != pooled:
            problems.append(f"transformer pooled_projection_dim {net.pooled_projection_dim} != CLIP projections' sum {pooled}")
        if c.text_encoder_3 is not None and c.text_encoder_3.config.d_model != net.joint_attention_dim:
            problems.append(f"T5 width {c.text_encoder_3.config.d_model} != joint_attention_dim {net.joint_attention_dim}")
        return problems
