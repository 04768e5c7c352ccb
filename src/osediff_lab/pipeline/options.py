"""Pipeline options: defaults from conf/infer.yaml (the single source of truth), checked before use."""

from __future__ import annotations

from typing import Any

from omegaconf import DictConfig, OmegaConf

from osediff_lab.dtypes import DTYPES
from osediff_lab.errors import ConfigError
from osediff_lab.paths import CONF_DIR
from osediff_lab.pipeline.colorfix import COLOR_FIXES
from osediff_lab.pipeline.fast import fast_path_problems

UPSAMPLERS = ("auto", "torch", "pillow")
LATENTS = ("auto", "mode", "sample")  # auto: the generator's inference_latent (OSEDiff: mode, PiSA-SR: sample)


def default_options() -> DictConfig:
    """The ``pipeline`` section of conf/infer.yaml."""
    return OmegaConf.load(CONF_DIR / "infer.yaml").pipeline


def make_options(cfg: DictConfig | dict | None = None, **overrides: Any) -> DictConfig:
    """Defaults, then ``cfg``, then keyword overrides (e.g. ``merge_lora=False``); validated."""
    options = OmegaConf.merge(default_options(), cfg or {}, overrides)
    problems = option_problems(options)
    if problems:
        raise ConfigError("pipeline options cannot run:\n  - " + "\n  - ".join(problems))
    return options


def option_problems(o: DictConfig) -> list[str]:
    """Every problem, each naming the ``pipeline.*`` key."""
    problems = []
    if o.color_fix not in COLOR_FIXES:
        problems.append(f"pipeline.color_fix='{o.color_fix}' must be one of {sorted(COLOR_FIXES)}")
    if o.latent not in LATENTS:
        problems.append(f"pipeline.latent='{o.latent}' must be one of {list(LATENTS)}")
    if o.precision not in ("auto", *DTYPES):
        problems.append(f"pipeline.precision='{o.precision}' must be auto, {', '.join(DTYPES)}")
    lt = o.latent_tiling
    if not 0 <= lt.overlap < lt.tile:
        problems.append(f"pipeline.latent_tiling: need 0 <= overlap ({lt.overlap}) < tile ({lt.tile})")
    if lt.sigma <= 0:
        problems.append(f"pipeline.latent_tiling.sigma={lt.sigma} must be > 0")
    vt = o.vae_tiling
    if min(vt.encoder_tile, vt.decoder_tile) < 1 or not 0 <= vt.overlap < 1:
        problems.append("pipeline.vae_tiling: tiles must be >= 1 latent px and overlap in [0, 1)")
    if o.scale is not None and o.scale < 1:
        problems.append(f"pipeline.scale={o.scale} must be >= 1")
    if o.upsampler not in UPSAMPLERS:
        problems.append(f"pipeline.upsampler='{o.upsampler}' must be one of {list(UPSAMPLERS)}")
    if o.process_size < 1:
        problems.append(f"pipeline.process_size={o.process_size} must be >= 1")
    problems.extend(fast_path_problems(o.fast, o.merge_lora))
    return problems
