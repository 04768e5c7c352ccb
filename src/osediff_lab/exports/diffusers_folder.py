"""The diffusers export: the base model's folder with the LoRA merged into the denoiser and the VAE (each part loads
with its own diffusers / transformers class), ``osediff_export.json`` (what the one step does) and ``infer.py``, a
script that reproduces the project's pipeline from that folder with no osediff_lab import.

The one step of any generator is affine in the denoiser's output: z_H = a z_L + b out (epsilon: a = 1 / sqrt(abar),
b = -sqrt(1 - abar) / sqrt(abar); flow: a = 1, b = -sigma; PiSA-SR's residual: a = 1, b = -lambda). ``one_step_map``
reads a, b and the denoiser's timestep off the generator itself, through its own ``inference_denoiser``. With a
size-dependent shift (FLUX.1-dev: ``DynamicShiftFlowSchedule``) sigma follows the latent's token count, so the
script computes sigma as the schedule does and a, b from it (affine in sigma, read at two token counts, checked at a
third). A family's prompt encoding and denoiser call are its ``Backbone.standalone`` pair, pasted by source.
"""

from __future__ import annotations

import dataclasses
import inspect
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from osediff_lab.backbones.base import Backbone
from osediff_lab.backbones.schedules import DynamicShiftFlowSchedule
from osediff_lab.errors import ConfigError
from osediff_lab.exports import standalone_infer
from osediff_lab.exports.loaded import LoadedExport
from osediff_lab.models.backbone import latent_multiple, latent_shift, vae_factor
from osediff_lab.models.components import save_pretrained
from osediff_lab.models.generator import OneStepGenerator

META = "osediff_export.json"
SCRIPT = "infer.py"


Recipe = tuple[Callable[..., tuple[torch.Tensor, torch.Tensor | None]], Callable[..., torch.Tensor]]


def recipe(backbone: Backbone) -> Recipe:
    """(encode_prompt, call_denoiser) of ``backbone``'s family (``Backbone.standalone``, inherited by a variant)."""
    pair = backbone.standalone
    if pair is None:
        raise ConfigError(f"the {backbone.name} backbone has no standalone prompt "
                          "encoding / denoiser call for format=diffusers: give its class a `standalone = (encode_prompt, "
                          "call_denoiser)` pair of plain functions (as osediff_lab/backbones/sd.py does)")
    return pair


def affine_step(generator: OneStepGenerator, lambda_pix: float, lambda_sem: float) -> tuple[float, float, float]:
    """(a, b, t) of the generator's inference step z_H = a z_L + b denoiser(z_L, t) at these weights on its smallest
    latent, read by running its ``inference_denoiser`` with the denoiser replaced by a constant; a ConfigError when the
    step is not affine."""
    channels = int(generator.vae.config.latent_channels)
    side = latent_multiple(generator.unet)
    seen: list[torch.Tensor] = []
    denoise = generator.inference_denoiser(lambda_pix, lambda_sem)

    def step(z_value: float, out_value: float) -> float:
        def constant(z_t: torch.Tensor, t: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
            seen.append(t)
            return torch.full_like(z_t, out_value)

        generator.predict = constant  # this instance only, removed below
        try:
            return float(denoise(torch.full((1, channels, side, side), z_value), None).flatten()[0])
        finally:
            del generator.predict

    a, b, both = step(1.0, 0.0), step(0.0, 1.0), step(1.0, 1.0)
    if abs(both - (a + b)) > 1e-5 * max(1.0, abs(a) + abs(b)):
        raise ConfigError(f"{type(generator).__name__}'s step is not affine in the denoiser's output; format=diffusers "
                          "cannot describe it")
    like = torch.zeros(1, channels, side, side)
    return a, b, generator.schedule.model_timestep(seen[0], like).flatten()[0].item()


def shifted_step(generator: OneStepGenerator, lambda_pix: float, lambda_sem: float) -> dict:
    """The step under a size-dependent shift: the schedule's constants, the unshifted sigma of the generator's
    timestep and a, b as [constant, per sigma], read at the base and max token counts and checked at a third."""
    schedule: DynamicShiftFlowSchedule = generator.schedule
    fixed, probes = schedule.fixed_seq_len, []
    try:
        for tokens in (schedule.base_seq_len, schedule.max_seq_len, (schedule.base_seq_len + schedule.max_seq_len) // 3):
            schedule.fixed_seq_len = tokens  # this schedule only, restored below
            a, b, t = affine_step(generator, lambda_pix, lambda_sem)
            probes.append((t / schedule.num_train_timesteps, a, b))
    finally:
        schedule.fixed_seq_len = fixed
    (s0, a0, b0), (s1, a1, b1), (s2, a2, b2) = probes
    slope_a, slope_b = ((a1 - a0) / (s1 - s0), (b1 - b0) / (s1 - s0)) if s1 != s0 else (0.0, 0.0)
    za, zb = [a0 - slope_a * s0, slope_a], [b0 - slope_b * s0, slope_b]
    if max(abs(za[0] + za[1] * s2 - a2), abs(zb[0] + zb[1] * s2 - b2)) > 1e-5 * max(1.0, abs(a2) + abs(b2)):
        raise ConfigError(f"{type(generator).__name__}'s step is not affine in the shifted sigma; format=diffusers "
                          "cannot describe it")
    return {"num_train_timesteps": schedule.num_train_timesteps,
            "sigma": float(schedule.sigmas[generator.timestep]),
            "base_seq_len": schedule.base_seq_len, "max_seq_len": schedule.max_seq_len,
            "base_shift": schedule.base_shift, "max_shift": schedule.max_shift,
            "patch": schedule.patch, "fixed_seq_len": fixed, "z_coefficient": za, "output_coefficient": zb}


def one_step_map(generator: OneStepGenerator, lambda_pix: float, lambda_sem: float) -> dict:
    """The export's one step: ``timestep``, ``z_coefficient``, ``output_coefficient`` (constants), or, under a
    size-dependent shift, those null and ``dynamic_shift`` (``shifted_step``) for the script to compute them."""
    if isinstance(generator.schedule, DynamicShiftFlowSchedule):
        return {"timestep": None, "z_coefficient": None, "output_coefficient": None,
                "dynamic_shift": shifted_step(generator, lambda_pix, lambda_sem)}
    a, b, t = affine_step(generator, lambda_pix, lambda_sem)
    return {"timestep": t, "z_coefficient": a, "output_coefficient": b, "dynamic_shift": None}


def standalone_script(backbone: Any) -> str:
    """``infer.py``: the standalone module with ``backbone``'s prompt encoding and denoiser call pasted in."""
    encode, call = recipe(backbone)
    parts = [inspect.getsource(standalone_infer).rstrip(), ""]
    for fn, name in ((encode, "encode_prompt"), (call, "call_denoiser")):
        parts += ["", inspect.getsource(fn).replace(f"def {fn.__name__}(", f"def {name}(", 1).rstrip(), ""]
    parts += ["", 'if __name__ == "__main__":', "    main(encode_prompt, call_denoiser)", ""]
    return "\n".join(parts)


def export_settings(loaded: LoadedExport, step: dict, prompt: str) -> dict:
    """``osediff_export.json``: the parts to load, the one-step map and the pipeline's size rule and colour fix."""
    gen, components, o = loaded.generator, loaded.components, loaded.options
    backbone = components.backbone
    parts = [{"tokenizer": p.tokenizer_folder, "tokenizer_class": p.tokenizer, "encoder": p.encoder_folder,
              "encoder_class": p.encoder} for p in backbone.text_parts if getattr(components, p.encoder_folder) is not None]
    return {
        "format": "osediff-lab-diffusers/1",
        "denoiser_folder": backbone.denoiser_folder,
        "denoiser_class": type(gen.unet).__name__,
        "vae_class": type(gen.vae).__name__,
        "text_parts": parts,
        "options": dataclasses.asdict(backbone) if dataclasses.is_dataclass(backbone) else {},
        "scale": int(o.scale or loaded.ckpt.meta["scale"]),
        "process_size": int(o.process_size),
        "pixel_multiple": vae_factor(gen.vae) * latent_multiple(gen.unet),
        "vae_factor": vae_factor(gen.vae),
        "scaling_factor": float(gen.vae.config.scaling_factor),
        "shift_factor": latent_shift(gen.vae),
        "latent": gen.inference_latent if o.latent == "auto" else str(o.latent),
        "seed": int(o.seed),
        "prompt": prompt,
        **step,
        "color_fix": str(o.color_fix),
        "lambda_pix": float(o.lambda_pix),
        "lambda_sem": float(o.lambda_sem),
    }


def default_text(loaded: LoadedExport) -> str:
    """The prompt the script uses unless told: the export's fixed prompt, else the empty one (an image-dependent
    prompt such as DAPE's needs its tagger, which the folder does not hold)."""
    prompt = loaded.ckpt.meta.get("prompt") or {}
    return str(prompt.get("text", "")) if prompt.get("name") == "fixed" else ""


def write_diffusers(loaded: LoadedExport, out: Path) -> dict:
    """Merge the LoRA at ``loaded.options``' lambdas (in place: ``loaded`` is spent) and write the folder; returns
    its settings. Colour fix wavelet is not in the script: adain or none."""
    o = loaded.options
    recipe(loaded.components.backbone)  # a family without a standalone recipe is refused before anything is merged
    if o.color_fix not in ("adain", "none"):
        raise ConfigError(f"pipeline.color_fix={o.color_fix}: the diffusers export's script does adain or none")
    step = one_step_map(loaded.generator, o.lambda_pix, o.lambda_sem)
    if not loaded.generator.merge_adapters(o.lambda_pix, o.lambda_sem):
        raise ConfigError(f"pipeline.lambda_pix={o.lambda_pix} / lambda_sem={o.lambda_sem} need two denoiser calls per "
                          "image, which one merged denoiser cannot do: export at lambda_sem=0 or lambda_pix=lambda_sem")
    settings = export_settings(loaded, step, default_text(loaded))
    save_pretrained(loaded.components, out)
    (out / META).write_text(json.dumps(settings, indent=2))
    (out / SCRIPT).write_text(standalone_script(loaded.components.backbone))
    return settings
