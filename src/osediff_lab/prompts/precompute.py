"""`python -m osediff_lab.prompts.precompute data=... prompt=llava`: fill the prompt cache for a dataset.

Computes the prompt of every source image of ``data`` (whole files, keyed by content hash and the prompt
settings) so that training with ``prompt.source=hq`` reads them instead of running the captioner. Files that
cannot be read are listed with the reason (printed, and in ``precompute.json`` in the Hydra run folder), the
others are processed; the exit status is 1 when any file failed.
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig

from osediff_lab.data.datamodule import source_files
from osediff_lab.dtypes import resolve_device
from osediff_lab.errors import ConfigError, user_errors
from osediff_lab.io import atomic_write_text
from osediff_lab.paths import CONF_DIR
from osediff_lab.prompts import build_prompt_provider
from osediff_lab.prompts.cache import CachedPrompt
from osediff_lab.resolvers import refuse_renamed_choices

log = logging.getLogger(__name__)


def precompute(cfg: DictConfig, device: str | None = None, progress: bool = True) -> dict:
    """Fill the cache for every file of ``cfg.data``; returns counts (files, cached_before, computed), the
    unreadable files (``failed``: path -> reason) and the cache path."""
    provider = build_prompt_provider(cfg.prompt)
    if not isinstance(provider, CachedPrompt):
        raise ConfigError(f"prompt={cfg.prompt.name} has no cache to fill: set prompt.cache.enabled=true")
    device = device or str(resolve_device())
    stats = provider.fill_files(source_files(cfg.data), device=device, progress=progress)
    return stats | {"cache": str(provider.cache.path)}


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="train")
@user_errors
def main(cfg: DictConfig) -> None:
    stats = precompute(cfg)
    print(f"prompt cache {stats['cache']}: {stats['files']} files, {stats['cached_before']} already cached, "
          f"{stats['computed']} computed, {len(stats['failed'])} unreadable")
    for path, reason in stats["failed"].items():
        print(f"  FAILED {path}: {reason}")
    atomic_write_text(Path(cfg.paths.output_dir) / "precompute.json", json.dumps(stats, indent=2))
    if stats["failed"]:
        sys.exit(1)


if __name__ == "__main__":
    refuse_renamed_choices(sys.argv)  # `prompt=null` is `prompt=none` now: say so, as train does
    main()
