"""A family's prompt encoding and denoiser call as plain functions (torch and the loaded diffusers / transformers
models only, no osediff_lab), whose source an export pastes into the inference script of a diffusers folder
(``osediff_lab.exports.diffusers_folder``). Each pair reproduces the backbone's ``text_encoders`` and
``denoiser_output``; a backbone without its own pair runs the first one found along its class's bases (a variant
of SD runs SD's), and a family with none cannot be exported to a standalone script (the error says where to add it).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from osediff_lab.errors import ConfigError

Recipe = tuple[Callable[..., tuple[torch.Tensor, torch.Tensor | None]], Callable[..., torch.Tensor]]


def sd_encode_prompt(tokenizers: list, encoders: list[nn.Module], prompts: list[str], net: nn.Module,
                     options: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor | None]:
    """SD2.1: the CLIP encoder's last hidden state; no pooled vector."""
    tok = tokenizers[0]
    ids = tok(prompts, padding="max_length", max_length=tok.model_max_length, truncation=True, return_tensors="pt").input_ids
    return encoders[0](ids)[0], None


def sd_call_denoiser(net: nn.Module, z: torch.Tensor, t: torch.Tensor, hidden: torch.Tensor, pooled: torch.Tensor | None,
                     factor: int) -> torch.Tensor:
    """SD2.1: the UNet on the scaled latent, conditioned on the hidden states."""
    return net(z, t, encoder_hidden_states=hidden).sample


def sdxl_encode_prompt(tokenizers: list, encoders: list[nn.Module], prompts: list[str], net: nn.Module,
                       options: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor | None]:
    """SDXL: both CLIPs' penultimate hidden states concatenated; pooled = the second one's text embedding."""
    outs = [enc(tok(prompts, padding="max_length", max_length=tok.model_max_length, truncation=True,
                    return_tensors="pt").input_ids, output_hidden_states=True) for tok, enc in zip(tokenizers, encoders, strict=True)]
    return torch.cat([out.hidden_states[-2] for out in outs], dim=-1), outs[-1][0]


def sdxl_call_denoiser(net: nn.Module, z: torch.Tensor, t: torch.Tensor, hidden: torch.Tensor, pooled: torch.Tensor | None,
                       factor: int) -> torch.Tensor:
    """SDXL: the UNet with the pooled embedding and the time ids of an uncropped image of the latent's size."""
    h, w = z.shape[-2] * factor, z.shape[-1] * factor
    ids = torch.tensor([h, w, 0, 0, h, w], dtype=z.dtype).expand(z.shape[0], -1)
    return net(z, t, encoder_hidden_states=hidden, added_cond_kwargs={"text_embeds": pooled, "time_ids": ids}).sample


def sd3_encode_prompt(tokenizers: list, encoders: list[nn.Module], prompts: list[str], net: nn.Module,
                      options: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor | None]:
    """SD3: CLIP-L and CLIP-G penultimate states zero-padded to the joint width, then T5's tokens (zeros without T5);
    pooled = both CLIP projections."""
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
                      factor: int) -> torch.Tensor:
    """SD3: the MMDiT on the scaled latent, with the joint text tokens and the pooled projection."""
    return net(hidden_states=z, timestep=t, encoder_hidden_states=hidden, pooled_projections=pooled).sample


RECIPES: dict[str, Recipe] = {
    "sd": (sd_encode_prompt, sd_call_denoiser),
    "sdxl": (sdxl_encode_prompt, sdxl_call_denoiser),
    "sd3": (sd3_encode_prompt, sd3_call_denoiser),
}


def recipe(backbone: Any) -> Recipe:
    """(encode_prompt, call_denoiser) of ``backbone``'s family, or of the nearest family it derives from."""
    for cls in type(backbone).__mro__:
        name = vars(cls).get("name")
        if name in RECIPES:
            return RECIPES[name]
    raise ConfigError(f"the {getattr(backbone, 'name', type(backbone).__name__)} backbone has no standalone prompt "
                      "encoding / denoiser call for format=diffusers: add a pair to RECIPES in "
                      "osediff_lab/backbones/standalone.py")
