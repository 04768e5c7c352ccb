"""Super-resolve images with an osediff-lab export in diffusers format, with diffusers and transformers alone.

Usage: python infer.py <export folder> <LQ image> <SR image> [--prompt TEXT]. The folder holds the base model's
parts with the LoRA merged in (the denoiser and VAE load with their own diffusers classes) and osediff_export.json:
the one-step map z_H = a z_L + b denoiser(z_L, t) (a, b, t constants, or under FLUX.1-dev's size-dependent shift
computed from the latent's size), the input size rule and the colour fix of the project's pipeline.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import diffusers
import numpy as np
import torch
import torch.nn.functional as F
import transformers
from PIL import Image


def load_folder(folder: str | Path) -> tuple[dict, torch.nn.Module, torch.nn.Module, list, list]:
    """(the export's settings, denoiser, VAE, tokenizers, text encoders), each by its own library class."""
    folder = Path(folder)
    meta = json.loads((folder / "osediff_export.json").read_text())
    net = getattr(diffusers, meta["denoiser_class"]).from_pretrained(folder / meta["denoiser_folder"]).eval()
    vae = getattr(diffusers, meta["vae_class"]).from_pretrained(folder / "vae").eval()
    tokenizers = [getattr(transformers, p["tokenizer_class"]).from_pretrained(folder / p["tokenizer"]) for p in meta["text_parts"]]
    encoders = [getattr(transformers, p["encoder_class"]).from_pretrained(folder / p["encoder"]).eval() for p in meta["text_parts"]]
    return meta, net, vae, tokenizers, encoders


def resize(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Bicubic resize, antialiased when shrinking."""
    shrink = size[0] < x.shape[-2] or size[1] < x.shape[-1]
    return F.interpolate(x, size=size, mode="bicubic", align_corners=False, antialias=shrink)


def one_step(meta: dict, z: torch.Tensor) -> tuple[float, float, float]:
    """(a, b, t) of z_H = a z + b denoiser(z, t) on the latent z: the export's constants, or under a size-dependent
    shift sigma = exp(mu) / (exp(mu) + 1 / s - 1), mu on the line through (base tokens, base shift) and (max tokens,
    max shift) at z's count of patch x patch tokens (or the fixed count), t = sigma N, a and b affine in sigma."""
    shift = meta["dynamic_shift"]
    if shift is None:
        return meta["z_coefficient"], meta["output_coefficient"], meta["timestep"]
    tokens = shift["fixed_seq_len"] or (z.shape[-2] // shift["patch"]) * (z.shape[-1] // shift["patch"])
    slope = (shift["max_shift"] - shift["base_shift"]) / (shift["max_seq_len"] - shift["base_seq_len"])
    mu = shift["base_shift"] + slope * (tokens - shift["base_seq_len"])
    sigma = math.exp(mu) / (math.exp(mu) + 1 / shift["sigma"] - 1)
    (a0, a1), (b0, b1) = shift["z_coefficient"], shift["output_coefficient"]
    return a0 + a1 * sigma, b0 + b1 * sigma, sigma * shift["num_train_timesteps"]


@torch.no_grad()
def super_resolve(folder: str | Path, lq: torch.Tensor, encode_prompt, call_denoiser, prompt: str | None = None) -> torch.Tensor:
    """LQ batch (B, 3, h, w) in [0, 1] -> SR batch (B, 3, scale h, scale w) in [0, 1]."""
    meta, net, vae, tokenizers, encoders = load_folder(folder)
    scale, multiple = meta["scale"], meta["pixel_multiple"]
    out = (lq.shape[-2] * scale, lq.shape[-1] * scale)
    factor = max(1.0, meta["process_size"] / (scale * min(lq.shape[-2:])))  # small inputs are enlarged, then shrunk
    work = (max(1, round(out[0] * factor)), max(1, round(out[1] * factor)))
    x = resize(lq, work).clamp(0, 1) if work != tuple(lq.shape[-2:]) else lq
    pad_h, pad_w = -work[0] % multiple, -work[1] % multiple
    mode = "reflect" if pad_h < work[0] and pad_w < work[1] else "replicate"
    padded = F.pad(x, (0, pad_w, 0, pad_h), mode=mode) if pad_h or pad_w else x
    posterior = vae.encode(padded * 2 - 1).latent_dist
    seeded = torch.Generator().manual_seed(meta["seed"])
    z = posterior.sample(generator=seeded) if meta["latent"] == "sample" else posterior.mode()
    z = (z - meta["shift_factor"]) * meta["scaling_factor"]
    hidden, pooled = encode_prompt(tokenizers, encoders, [meta["prompt"] if prompt is None else prompt] * len(lq), net, meta["options"])
    a, b, timestep = one_step(meta, z)
    t = torch.full((len(lq),), timestep)
    z_h = a * z + b * call_denoiser(net, z, t, hidden, pooled, meta["vae_factor"], meta["options"])
    sr = (vae.decode(z_h / meta["scaling_factor"] + meta["shift_factor"]).sample.clamp(-1, 1) + 1) / 2
    sr = sr[..., : work[0], : work[1]].float()
    if meta["color_fix"] == "adain":  # the LQ's per-channel mean and std
        dims = (-2, -1)
        sr = (sr - sr.mean(dims, keepdim=True)) / sr.std(dims, keepdim=True, unbiased=False).clamp_min(1e-5) \
            * x.std(dims, keepdim=True, unbiased=False) + x.mean(dims, keepdim=True)
    return (resize(sr, out) if work != out else sr).clamp(0, 1)


def main(encode_prompt, call_denoiser, argv: list[str] | None = None) -> None:
    """The command line: one LQ image in, its SR image out."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder")
    parser.add_argument("lq")
    parser.add_argument("sr")
    parser.add_argument("--prompt", default=None)
    args = parser.parse_args(argv)
    lq = torch.from_numpy(np.array(Image.open(args.lq).convert("RGB"))).permute(2, 0, 1)[None].float() / 255
    sr = super_resolve(args.folder, lq, encode_prompt, call_denoiser, args.prompt)[0]
    Image.fromarray((sr * 255).round().byte().permute(1, 2, 0).numpy()).save(args.sr)
