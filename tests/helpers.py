"""Test helpers: compose the train config as the CLI would, locate ../shared."""

from __future__ import annotations

import os
from pathlib import Path

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
