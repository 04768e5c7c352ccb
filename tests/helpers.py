"""Test helpers: compose the train config as the CLI would, locate ../shared, the epsilon schedule by hand."""

from __future__ import annotations

import os
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from omegaconf import DictConfig, open_dict

from osediff_lab import resolvers  # noqa: F401  (registers ${asset:...} and ${run_id:...} before composing)
from osediff_lab.paths import CONF_DIR

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
SHARED = Path(__file__).resolve().parents[1].parent / "shared"
REALSR = SHARED / "data" / "realsr"


def compose_config(overrides: list[str] | None = None, run_dir: Path | None = None) -> DictConfig:
    """The composed train config (as the CLI would build it) with ``paths.output_dir`` set to ``run_dir``."""
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose(config_name="train", overrides=list(overrides or []), return_hydra_config=False)
    with open_dict(cfg):
        cfg.paths.output_dir = str(run_dir) if run_dir else "unused"
    return cfg


TINY = ["model=tiny", "data=demo", "logger=csv", "loss.lpips.pretrained=false", "loss.lpips.net=alex", "data.crop_size=64", "data.batch_size=2"]


def _abar(alphas_cumprod: torch.Tensor, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """abar_t in fp32 on ``like``'s device, one per sample, shaped to broadcast against ``like``."""
    return alphas_cumprod.to(like.device)[t.to(like.device).long()].float().reshape(-1, *([1] * (like.dim() - 1)))


def x0_from_eps(z_t: torch.Tensor, eps: torch.Tensor, t: torch.Tensor, alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """Clean-latent estimate of an epsilon-prediction model, by hand: (z_t - sqrt(1 - abar_t) eps) / sqrt(abar_t)."""
    abar = _abar(alphas_cumprod, t, z_t)
    return ((z_t.float() - (1.0 - abar).sqrt() * eps.float()) / abar.sqrt()).to(z_t.dtype)


def add_noise(z0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor, alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """Forward diffusion q(z_t | z_0) by hand: sqrt(abar_t) z0 + sqrt(1 - abar_t) noise."""
    abar = _abar(alphas_cumprod, t, z0)
    return (abar.sqrt() * z0.float() + (1.0 - abar).sqrt() * noise.float()).to(z0.dtype)
