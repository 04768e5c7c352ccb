"""LoRA files in the layout kohya's sd-scripts write and ComfyUI / diffusers read: per adapted module
``lora_<denoiser folder>_<module path, dots as underscores>.lora_down.weight`` (rank x in [x k x k]),
``.lora_up.weight`` (out x rank [x 1 x 1]) and ``.alpha`` (a scalar; the update is up @ down * alpha / rank).

A module carries at most one LoRA per file: adapters on disjoint modules (OSEDiff's three denoiser groups) share one
file, adapters on the same modules (PiSA-SR's pixel and semantic sets) get one file each. Tensors trained in full
(OSEDiff's input layer) go to their own file with that module's LoRA folded in, and the VAE's LoRA to another:
no standard LoRA loader applies either; ``kohya_readme`` (the card's usage section) says what a loader must do.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import torch
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn

from osediff_lab.exports.loaded import LoadedExport
from osediff_lab.models.lora_files import save_lora_tensors

KOHYA = "kohya-lora"  # the safetensors metadata 'format' of these files
VAE_PREFIX = "lora_vae_"


@dataclass(frozen=True)
class LoraFactor:
    """One adapter on one module: the update is ``scale * up @ down`` (kohya's alpha = scale * rank)."""

    module: str
    adapter: str
    down: torch.Tensor
    up: torch.Tensor
    scale: float

    @property
    def rank(self) -> int:
        return int(self.down.shape[0])


def lora_factors(model: nn.Module) -> list[LoraFactor]:
    """Every (module, adapter) LoRA of ``model``'s PEFT layers, with PEFT's own scale (alpha / rank, or rsLoRA's)."""
    factors = []
    for name, layer in model.named_modules():
        if isinstance(layer, BaseTunerLayer):
            for adapter, down in layer.lora_A.items():
                factors.append(LoraFactor(name, adapter, down.weight.detach().float().cpu(),
                                          layer.lora_B[adapter].weight.detach().float().cpu(), float(layer.scaling[adapter])))
    return factors


def lora_delta(down: torch.Tensor, up: torch.Tensor, scale: float) -> torch.Tensor:
    """The weight update ``scale * up @ down`` shaped as the adapted weight (Linear: out x in; Conv2d with a k x k down
    and a 1 x 1 up: out x in x k x k)."""
    return (up.flatten(1) @ down.flatten(1)).reshape(up.shape[0], *down.shape[1:]) * scale


def kohya_key(prefix: str, module: str) -> str:
    """A module's kohya name: ``prefix`` + its path with dots as underscores."""
    return prefix + module.replace(".", "_")


def kohya_tensors(factors: Iterable[LoraFactor], prefix: str) -> dict[str, torch.Tensor]:
    """The kohya layout of ``factors``, one LoRA per module (a ValueError names a module carrying two)."""
    out: dict[str, torch.Tensor] = {}
    for f in factors:
        key = kohya_key(prefix, f.module)
        if f"{key}.alpha" in out:
            raise ValueError(f"module {f.module} carries two LoRAs in one kohya file ({f.adapter} and another)")
        out |= {f"{key}.lora_down.weight": f.down, f"{key}.lora_up.weight": f.up,
                f"{key}.alpha": torch.tensor(f.scale * f.rank, dtype=torch.float32)}
    return out


def merge_kohya(weights: dict[str, torch.Tensor], lora: dict[str, torch.Tensor], prefix: str,
                strength: float = 1.0) -> dict[str, torch.Tensor]:
    """``weights`` (a state dict: ``<module>.weight`` keys) with a kohya file's updates added at ``strength``, as a
    loader merges them; every LoRA must name a module of ``weights`` (else a KeyError names it)."""
    by_key = {kohya_key(prefix, name.removesuffix(".weight")): name for name in weights if name.endswith(".weight")}
    merged = dict(weights)
    for key in (k.removesuffix(".alpha") for k in lora if k.endswith(".alpha")):
        if key not in by_key:
            raise KeyError(f"{key} names no module of these weights")
        down, up = lora[f"{key}.lora_down.weight"], lora[f"{key}.lora_up.weight"]
        name = by_key[key]
        merged[name] = weights[name] + strength * lora_delta(down, up, float(lora[f"{key}.alpha"]) / down.shape[0])
    return merged


def adapter_sets(factors: list[LoraFactor]) -> dict[str, list[LoraFactor]]:
    """Files' contents: all adapters together when no module carries two (key ``""``), else one file per adapter."""
    modules = [f.module for f in factors]
    if len(set(modules)) == len(modules):
        return {"": factors}
    sets: dict[str, list[LoraFactor]] = defaultdict(list)
    for f in factors:
        sets[f.adapter].append(f)
    return dict(sets)


def trained_layers(model: nn.Module, trained: Iterable[str], factors: list[LoraFactor]) -> dict[str, torch.Tensor]:
    """The tensors of ``model`` trained in full (``trained``: their names in ``model``, e.g. conv_in.base_layer.weight)
    as a plain model names them (conv_in.weight), each weight with its module's LoRA updates folded in."""
    params = dict(model.named_parameters())
    out = {}
    for name in trained:
        module, _, kind = name.replace(".base_layer.", ".").rpartition(".")
        value = params[name].detach().float().cpu()
        if kind == "weight":
            for f in factors:
                if f.module == module:
                    value = value + lora_delta(f.down, f.up, f.scale)
        out[f"{module}.{kind}"] = value
    return out


def full_modules(trained: dict[str, torch.Tensor]) -> set[str]:
    """The modules whose weights a trained-layers file replaces."""
    return {name.rpartition(".")[0] for name in trained}


def write_kohya(loaded: LoadedExport, out: Path) -> tuple[dict[str, list[str]], str]:
    """The denoiser LoRA file(s), the fully trained denoiser tensors and the VAE LoRA into folder ``out``; returns
    {role: file names} (roles: unet_lora, unet_full, vae_lora, vae_full) and the README text on loading them."""
    gen, folder = loaded.generator, loaded.denoiser_folder
    files: dict[str, list[str]] = defaultdict(list)
    for part, prefix in (("unet", f"lora_{folder}_"), ("vae", VAE_PREFIX)):
        model = getattr(gen, part)
        factors = lora_factors(model)
        trained = [k.removeprefix(f"{part}.") for k in loaded.ckpt.state if k.startswith(f"{part}.") and ".lora_" not in k]
        name = folder if part == "unet" else "vae"
        full = trained_layers(model, trained, factors)
        if full:
            files[f"{part}_full"].append(str(save_lora_tensors(full, out / f"{name}_trained_layers.safetensors", "full-tensors").name))
        factors = [f for f in factors if f.module not in full_modules(full)]
        for adapter, group in adapter_sets(factors).items():
            stem = f"{name}_lora" + (f"_{adapter}" if adapter else "")
            path = save_lora_tensors(kohya_tensors(group, prefix), out / f"{stem}.safetensors", KOHYA)
            files[f"{part}_lora"].append(path.name)
    return dict(files), kohya_readme(loaded, dict(files))


def kohya_readme(loaded: LoadedExport, files: dict[str, list[str]]) -> str:
    """What each file holds and what a loader must do with it to reproduce the export."""
    folder = loaded.denoiser_folder
    prefix = f"lora_{folder}_"
    lines = [
        "LoRA files in the kohya / ComfyUI layout.", "",
        f"Exported by osediff-lab from `{loaded.ckpt.path.name}` (method `{(loaded.ckpt.meta.get('method') or {}).get('_target_', 'OSEDiff')}`, "
        f"base `{loaded.ckpt.meta['base_model']['name']}`). This is a **one-step super-resolution** model, not a "
        "text-to-image style LoRA: the image is the VAE decoding of one denoiser call on the VAE latent of the "
        "bicubic-upsampled low-quality image (see the diffusers export, `format=diffusers`, and its script).", "",
        "| file | holds | a loader must |", "|---|---|---|",
    ]
    lora = files.get("unet_lora", [])
    for name in lora:
        lines.append(f"| `{name}` | the {folder}'s LoRA: `{prefix}<module path, dots as underscores>.lora_down.weight` / "
                     "`.lora_up.weight` / `.alpha`, update = up @ down x alpha / rank | load it as a LoRA at strength 1 "
                     f"(ComfyUI `LoraLoaderModelOnly`, diffusers `pipe.load_lora_weights`) |")
    for name in files.get("unet_full", []):
        lines.append(f"| `{name}` | {folder} tensors trained in full (keys as the {folder} names them, e.g. its input "
                     "layer), any LoRA of theirs already folded in | replace those tensors of the base model's "
                     f"{folder} (diffusers: `{folder}.load_state_dict(load_file(...), strict=False)`); the LoRA files "
                     "do not touch them |")
    for name in files.get("vae_lora", []):
        lines.append(f"| `{name}` | the VAE's LoRA (`{VAE_PREFIX}<module path>`, same layout) | merge it into the "
                     "VAE (W += up @ down x alpha / rank; a k x k conv: reshape as out x in x k x k); no standard "
                     "loader applies a VAE LoRA |")
    for name in files.get("vae_full", []):
        lines.append(f"| `{name}` | VAE tensors trained in full | replace those tensors of the VAE |")
    if len(lora) > 1:
        lines += ["", f"Several LoRA sets adapt the same {folder} modules, one file each ({', '.join(lora)}). All of "
                  "them at strength 1 is the model as trained; a subset at strength 1 is that subset alone. The "
                  "method's inference may weigh the sets' *outputs* (PiSA-SR: eps = lambda_pix eps_pix + lambda_sem "
                  "(eps_full - eps_pix), two denoiser calls); a loader's strength weighs the *weights*, which equals "
                  "that only at strengths 0 and 1 (lambda_pix = 1, lambda_sem in {0, 1}). Other lambdas: use the "
                  "project's pipeline (`pipeline.lambda_pix` / `lambda_sem`)."]
    return "\n".join(lines) + "\n"
