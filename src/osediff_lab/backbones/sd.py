"""SD2.1 and SD-Turbo (family ``sd``): a UNet2DConditionModel conditioned on one CLIP text encoder's last hidden
state, trained by epsilon or v-prediction; OSEDiff's LoRA groups are the UNet's down blocks, up blocks and the
rest, with conv_in trained in full. Folder: tokenizer/, text_encoder/, vae/, unet/, scheduler/."""

from __future__ import annotations

from collections.abc import Collection, Iterable
from typing import Any

import torch
from torch import nn

from osediff_lab.backbones.base import Backbone, Components, Release, TextPart, clip_files, common_files
from osediff_lab.backbones.embeds import TextEmbeds
from osediff_lab.backbones.text import TextEncoders

SD_TURBO_LICENCE = (
    "Stability AI Non-Commercial Research Community License: accept it on https://huggingface.co/stabilityai/sd-turbo "
    "before downloading; research and non-commercial use only"
)


class SDText(TextEncoders):
    """SD2.1's conditioning: the CLIP encoder's last hidden state, no pooled vector."""

    def encode(self, prompts: list[str]) -> TextEmbeds:
        return TextEmbeds(self.run(0, prompts)[0])


def unet_lora_groups(names: Iterable[str]) -> dict[str, list[str]]:
    """A UNet's modules as OSEDiff groups them: encoder (down blocks, conv_in), decoder (up blocks, conv_out),
    others (the mid block, time and added embeddings)."""
    groups: dict[str, list[str]] = {"encoder": [], "decoder": [], "others": []}
    for name in names:
        if name.startswith("down_blocks") or name == "conv_in":
            groups["encoder"].append(name)
        elif name.startswith("up_blocks") or name == "conv_out":
            groups["decoder"].append(name)
        else:
            groups["others"].append(name)
    return groups


def sd_encode_prompt(tokenizers: list, encoders: list[nn.Module], prompts: list[str], net: nn.Module,
                     options: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor | None]:
    """SD2.1, standalone (``Backbone.standalone``): the CLIP encoder's last hidden state; no pooled vector."""
    tok = tokenizers[0]
    ids = tok(prompts, padding="max_length", max_length=tok.model_max_length, truncation=True, return_tensors="pt").input_ids
    return encoders[0](ids)[0], None


def sd_call_denoiser(net: nn.Module, z: torch.Tensor, t: torch.Tensor, hidden: torch.Tensor, pooled: torch.Tensor | None,
                     factor: int, options: dict[str, Any]) -> torch.Tensor:
    """SD2.1, standalone: the UNet on the scaled latent, conditioned on the hidden states."""
    return net(z, t, encoder_hidden_states=hidden).sample


class SDBackbone(Backbone):
    """SD2.1 / SD-Turbo; also the fallback for a denoiser no other backbone recognises (a UNet called with
    hidden states alone)."""

    name = "sd"
    denoiser_folder = "unet"
    denoiser_class = "UNet2DConditionModel"
    text_parts = (TextPart("", "CLIPTokenizer", "CLIPTextModel"),)
    schedule_note = "UNets train by epsilon or v_prediction, not by rectified flow (FlowMatchEulerDiscreteScheduler)"
    releases = (
        Release("sd21_base", "SD2.1-base", "sd21", "stable-diffusion-2-1-base", "stabilityai/stable-diffusion-2-1-base"),
        Release("sd_turbo", "SD-Turbo", "sd_turbo", "sd-turbo", "stabilityai/sd-turbo", SD_TURBO_LICENCE),
    )
    # sizes are the Hub's (informational)
    folder_files = (*common_files("unet", "UNet", 3460, 335), *clip_files("text_encoder", "OpenCLIP-H text encoder", 1360))
    standalone = (sd_encode_prompt, sd_call_denoiser)

    @classmethod
    def recognises(cls, parts: Collection[str], denoiser_class: str | None) -> bool:
        return "unet" in parts and "text_encoder_2" not in parts

    @classmethod
    def recognises_denoiser(cls, net: nn.Module) -> bool:
        return True

    def text_encoders(self, c: Components) -> TextEncoders:
        return SDText([c.tokenizer], [c.text_encoder])

    def denoiser_output(self, net: nn.Module, z_t: torch.Tensor, timestep: torch.Tensor, embeds: TextEmbeds,
                        factor: int) -> torch.Tensor:
        return net(z_t, timestep, encoder_hidden_states=embeds.hidden.to(z_t.dtype)).sample

    def lora_groups(self, net: nn.Module, names: Iterable[str]) -> dict[str, list[str]]:
        return unet_lora_groups(names)

    def input_layer(self, net: nn.Module) -> str:
        return "conv_in"

    def feature_points(self, net: nn.Module) -> dict[str, tuple[nn.Module, int]]:
        """``down.<i>`` (down block i's output) and ``mid`` (the bottleneck, DMD2's choice)."""
        widths = list(net.config.block_out_channels)
        return {f"down.{i}": (block, widths[i]) for i, block in enumerate(net.down_blocks)} | {"mid": (net.mid_block, widths[-1])}

    def conditioning_problems(self, c: Components) -> list[str]:
        width, cross = int(c.text_encoder.config.hidden_size), c.denoiser.config.cross_attention_dim
        return [] if cross == width else [f"UNet cross_attention_dim {cross} != text encoder width {width}"]
