"""FLUX.1 (family ``flux``): a FluxTransformer2DModel (19 double-stream + 38 single-stream blocks) trained by
rectified flow, conditioned on T5-XXL's token states and CLIP-L's pooled output, on a 16-channel VAE latent cut into
2 x 2 patches (packed to 64 channels per token, with (0, row, column) position ids; the text's ids are zeros), as
diffusers' FluxPipeline calls it (``pipeline_flux.py``: ``_pack_latents``, ``_prepare_latent_image_ids``,
``encode_prompt``, the transformer call with ``timestep / 1000``). FLUX.1-dev is guidance-distilled: its transformer
takes the guidance value as an input (``guidance_embeds``), ``model.guidance`` in every call and the CFG value in the
real score of score distillation (``Backbone.guidance_distilled``); FLUX.1-schnell has no guidance input. FLUX.1-dev's
scheduler shifts sigma by the image size (``use_dynamic_shifting``): the schedule computes mu from the token count of
the latent it is applied to (``backbones.schedules.DynamicShiftFlowSchedule``). Folder: tokenizer/ + text_encoder/
(CLIP-L), tokenizer_2/ + text_encoder_2/ (T5-XXL), vae/, transformer/ (class FluxTransformer2DModel), scheduler/."""

from __future__ import annotations

import importlib
from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from osediff_lab.backbones.base import (
    Backbone,
    Components,
    Release,
    TextPart,
    clip_files,
    library_class,
    t5_files,
    token_map,
    token_points,
)
from osediff_lab.backbones.embeds import TextEmbeds
from osediff_lab.backbones.text import TextEncoders
from osediff_lab.errors import ConfigError

if TYPE_CHECKING:
    from diffusers import SchedulerMixin

    from osediff_lab.backbones.schedules import NoiseSchedule

PACK = 2  # FluxPipeline packs 2 x 2 latent cells into one token (pipeline_flux.py _pack_latents)
TIMESTEP_SCALE = 1000.0  # FluxPipeline passes timestep / 1000; the transformer multiplies it back (transformer_flux.py)
FLUX_DEV_LICENCE = (
    "FLUX.1 [dev] Non-Commercial License (gated): accept it on https://huggingface.co/black-forest-labs/FLUX.1-dev and "
    "log in (HF token) before downloading; non-commercial use only, outputs excepted as the licence states"
)
FLUX_SCHNELL_LICENCE = "Apache-2.0 (not gated): https://huggingface.co/black-forest-labs/FLUX.1-schnell"


def pack_latents(z: torch.Tensor) -> torch.Tensor:
    """(B, C, h, w) -> (B, h/2 * w/2, 4C): each 2 x 2 patch one token, its channels C-major then row, column."""
    b, c, h, w = z.shape
    return z.reshape(b, c, h // PACK, PACK, w // PACK, PACK).permute(0, 2, 4, 1, 3, 5).reshape(b, (h // PACK) * (w // PACK), c * PACK * PACK)


def unpack_latents(tokens: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """The inverse of ``pack_latents`` for a latent of ``h`` x ``w`` cells."""
    b, _, width = tokens.shape
    c = width // (PACK * PACK)
    return tokens.reshape(b, h // PACK, w // PACK, c, PACK, PACK).permute(0, 3, 1, 4, 2, 5).reshape(b, c, h, w)


def image_ids(rows: int, cols: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """(rows * cols, 3) position ids of the packed tokens in row-major order: (0, row, column)."""
    r, c = torch.meshgrid(torch.arange(rows, device=device), torch.arange(cols, device=device), indexing="ij")
    return torch.stack([torch.zeros_like(r), r, c], dim=-1).reshape(rows * cols, 3).to(dtype)


def flux_encode_prompt(tokenizers: list, encoders: list[nn.Module], prompts: list[str], net: nn.Module,
                       options: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor | None]:
    """FLUX, standalone (``Backbone.standalone``): T5's last hidden states over ``t5_max_length`` tokens; pooled =
    CLIP-L's pooled output."""
    clip, t5 = tokenizers
    ids = clip(prompts, padding="max_length", max_length=clip.model_max_length, truncation=True, return_tensors="pt").input_ids
    pooled = encoders[0](ids).pooler_output
    ids = t5(prompts, padding="max_length", max_length=int(options["t5_max_length"]), truncation=True,
             return_tensors="pt").input_ids
    return encoders[1](ids)[0].to(pooled.dtype), pooled


def flux_call_denoiser(net: nn.Module, z: torch.Tensor, t: torch.Tensor, hidden: torch.Tensor, pooled: torch.Tensor | None,
                       factor: int, options: dict[str, Any]) -> torch.Tensor:
    """FLUX, standalone: the latent packed into 2 x 2-patch tokens with (0, row, column) ids (the text's ids zeros),
    the timestep / 1000, the guidance value when the transformer embeds one; the output unpacked."""
    b, c, h, w = z.shape
    tokens = z.reshape(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(b, (h // 2) * (w // 2), c * 4)
    rows, cols = torch.meshgrid(torch.arange(h // 2), torch.arange(w // 2), indexing="ij")
    img_ids = torch.stack([torch.zeros_like(rows), rows, cols], dim=-1).reshape(-1, 3).to(z.dtype)
    guidance = torch.full((b,), float(options["guidance"])) if net.config.guidance_embeds else None
    out = net(hidden_states=tokens, timestep=t / 1000, guidance=guidance, pooled_projections=pooled,
              encoder_hidden_states=hidden, txt_ids=hidden.new_zeros(hidden.shape[1], 3), img_ids=img_ids).sample
    return out.reshape(b, h // 2, w // 2, c, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(b, c, h, w)


class FluxText(TextEncoders):
    """T5's last hidden states over ``t5_max_length`` tokens (the token sequence) and CLIP-L's pooled output (the
    pooled vector), as FluxPipeline.encode_prompt with one prompt for both encoders."""

    def __init__(self, tokenizers: list, encoders: list[nn.Module], t5_max_length: int) -> None:
        super().__init__(tokenizers, encoders)
        self.t5_max_length = t5_max_length

    def encode(self, prompts: list[str]) -> TextEmbeds:
        pooled = self.run(0, prompts).pooler_output
        hidden = self.run(1, prompts, self.t5_max_length)[0]
        return TextEmbeds(hidden.to(pooled.dtype), pooled)


@dataclass(frozen=True)
class FluxBackbone(Backbone):
    """FLUX.1-dev / -schnell and transformers of their layout. ``guidance`` (model.guidance): the guidance value of a
    guidance-distilled transformer's calls (null for one without guidance embedding, schnell); ``t5_max_length``
    (model.t5_max_length): T5's token count (a random twin's is its ``arch.text_encoder_2.max_length``);
    ``shift_image_seq_len`` (model.shift_image_seq_len): with a size-dependent shift, the token count mu is computed
    at (null: the latent's own, as FluxPipeline does)."""

    guidance: float | None = None
    t5_max_length: int = 512
    shift_image_seq_len: int | None = None

    name = "flux"
    denoiser_folder = "transformer"
    denoiser_class = "FluxTransformer2DModel"
    text_parts = (TextPart("", "CLIPTokenizer", "CLIPTextModel"), TextPart("_2", "T5TokenizerFast", "T5EncoderModel"))
    rectified_flow = True
    schedule_note = "FLUX's transformer trains by rectified flow (FlowMatchEulerDiscreteScheduler), not by epsilon or v_prediction"
    attention = {"sdpa": "FluxAttnProcessor"}  # diffusers' one processor for FLUX attention (fused or not)
    fused_attention = "FluxAttnProcessor"
    releases = (Release("flux_dev", "FLUX.1-dev", "flux_dev", "FLUX.1-dev", "black-forest-labs/FLUX.1-dev", FLUX_DEV_LICENCE),
                Release("flux_schnell", "FLUX.1-schnell", "flux_schnell", "FLUX.1-schnell", "black-forest-labs/FLUX.1-schnell",
                        FLUX_SCHNELL_LICENCE))
    # the Hub's diffusers folders of both releases (sizes informational, bf16): transformer in three shards, T5 in two
    folder_files = (("model_index", "model_index.json", "pipeline index", None),
                    ("scheduler", "scheduler/scheduler_config.json", "scheduler config (class, dynamic shift)", None),
                    ("transformer_config", "transformer/config.json", "FLUX transformer config", None),
                    ("transformer_index", "transformer/diffusion_pytorch_model.safetensors.index.json", "FLUX transformer shard index", None),
                    *((f"transformer_{i}", f"transformer/diffusion_pytorch_model-0000{i}-of-00003.safetensors",
                       f"FLUX transformer, shard {i}", mb) for i, mb in ((1, 9980), (2, 9950), (3, 3870))),
                    ("vae_config", "vae/config.json", "VAE config", None),
                    ("vae", "vae/diffusion_pytorch_model.safetensors", "VAE (16 channels)", 168),
                    *clip_files("text_encoder", "CLIP ViT-L text encoder", 246),
                    *t5_files("text_encoder_2", "T5-XXL encoder config"))
    standalone = (flux_encode_prompt, flux_call_denoiser)

    @classmethod
    def recognises(cls, parts: Collection[str], denoiser_class: str | None) -> bool:
        """A transformer/ whose config names FluxTransformer2DModel (SD3's names its own class or none)."""
        return "transformer" in parts and denoiser_class == cls.denoiser_class

    @classmethod
    def recognises_arch(cls, arch: Mapping[str, Any]) -> bool:
        """A transformer section with single-stream blocks (``num_single_layers``), which SD3's has not."""
        return "num_single_layers" in (arch.get("transformer") or {})

    @classmethod
    def recognises_denoiser(cls, net: nn.Module) -> bool:
        return isinstance(net, library_class("diffusers", cls.denoiser_class))

    def build_random(self, arch: Mapping[str, Any]) -> Components:
        t5 = arch.get("text_encoder_2") or {}
        return Backbone.build_random(replace(self, t5_max_length=int(t5.get("max_length", self.t5_max_length))), arch)

    def text_encoders(self, c: Components) -> TextEncoders:
        return FluxText([c.tokenizer, c.tokenizer_2], [c.text_encoder, c.text_encoder_2], self.t5_max_length)

    def schedule(self, scheduler: SchedulerMixin) -> NoiseSchedule:
        """A size-dependent shift (``use_dynamic_shifting``, FLUX.1-dev) from the scheduler's base/max token counts
        and shifts at the latent's packed token count (or ``shift_image_seq_len``); else the fixed-shift flow."""
        from osediff_lab.backbones.schedules import DynamicShiftFlowSchedule

        c = scheduler.config
        if not c.get("use_dynamic_shifting", False):
            return super().schedule(scheduler)
        return DynamicShiftFlowSchedule(int(c.num_train_timesteps), int(c.base_image_seq_len), int(c.max_image_seq_len),
                                        float(c.base_shift), float(c.max_shift), PACK, self.shift_image_seq_len)

    def guidance_distilled(self, net: nn.Module) -> bool:
        """FLUX.1-dev's transformer embeds the guidance value (``guidance_embeds``); schnell's does not."""
        return bool(net.config.guidance_embeds)

    def denoiser_output(self, net: nn.Module, z_t: torch.Tensor, timestep: torch.Tensor, embeds: TextEmbeds,
                        factor: int) -> torch.Tensor:
        b, _, h, w = z_t.shape
        guidance = None
        if self.guidance_distilled(net):
            if embeds.guidance is None and self.guidance is None:
                raise ConfigError("this FLUX transformer is guidance-distilled (guidance_embeds): set model.guidance")
            guidance = embeds.guidance if embeds.guidance is not None else torch.full((b,), float(self.guidance))
            guidance = guidance.to(z_t.device, torch.float32)
        hidden = embeds.hidden.to(z_t.dtype)
        out = net(hidden_states=pack_latents(z_t), timestep=timestep.expand(b) / TIMESTEP_SCALE, guidance=guidance,
                  pooled_projections=embeds.pooled.to(z_t.dtype), encoder_hidden_states=hidden,
                  txt_ids=hidden.new_zeros(hidden.shape[1], 3), img_ids=image_ids(h // PACK, w // PACK, z_t.device, z_t.dtype)).sample
        return unpack_latents(out, h, w)

    def denoiser_channels(self, net: nn.Module) -> tuple[int, int]:
        """The latent channels before packing: a quarter of the transformer's token width."""
        cfg = net.config
        return int(cfg.in_channels) // (PACK * PACK), int(cfg.out_channels or cfg.in_channels) // (PACK * PACK)

    def lora_groups(self, net: nn.Module, names: Iterable[str]) -> dict[str, list[str]]:
        """encoder: the double-stream blocks (``transformer_blocks``) and the input layer; decoder: the single-stream
        blocks (``single_transformer_blocks``) and proj_out; others: the embedders and the output norm."""
        groups: dict[str, list[str]] = {"encoder": [], "decoder": [], "others": []}
        for name in names:
            first = name.split(".")[0]
            if first in ("transformer_blocks", "x_embedder"):
                groups["encoder"].append(name)
            elif first in ("single_transformer_blocks", "proj_out"):
                groups["decoder"].append(name)
            else:
                groups["others"].append(name)
        return groups

    def input_layer(self, net: nn.Module) -> str:
        return "x_embedder"

    def latent_multiple(self, net: nn.Module) -> int:
        return PACK

    def feature_points(self, net: nn.Module) -> dict[str, tuple[nn.Module, int]]:
        """``block.<i>``: the image tokens after block i, double-stream blocks first, then single-stream; ``mid``:
        the middle one's."""
        width = int(net.config.num_attention_heads * net.config.attention_head_dim)
        return token_points([*net.transformer_blocks, *net.single_transformer_blocks], width)

    def feature_map(self, output: Any, z_t: torch.Tensor, net: nn.Module) -> torch.Tensor:
        return token_map(output[1], z_t, PACK)  # both kinds of block give (text, image) tokens

    def processor(self, name: str) -> Any:
        """A new attention processor of diffusers' FLUX transformer module, of class ``name``."""
        return getattr(importlib.import_module("diffusers.models.transformers.transformer_flux"), name)()

    def conditioning_problems(self, c: Components) -> list[str]:
        net, problems = c.denoiser.config, []
        pooled, width = int(c.text_encoder.config.hidden_size), int(c.text_encoder_2.config.d_model)
        if net.pooled_projection_dim != pooled:
            problems.append(f"transformer pooled_projection_dim {net.pooled_projection_dim} != CLIP width {pooled}")
        if net.joint_attention_dim != width:
            problems.append(f"transformer joint_attention_dim {net.joint_attention_dim} != T5 width {width}")
        if net.guidance_embeds and self.guidance is None:
            problems.append("the transformer is guidance-distilled (guidance_embeds, FLUX.1-dev): set model.guidance "
                            "(its guidance value in every call but the real score's)")
        if not net.guidance_embeds and self.guidance is not None:
            problems.append(f"model.guidance={self.guidance}, but the transformer has no guidance embedding "
                            "(FLUX.1-schnell): set model.guidance=null")
        return problems
