"""Prompt providers: turn a batch of images into one text prompt per image."""

from __future__ import annotations

from typing import Protocol

import torch
from omegaconf import DictConfig

from osediff_lab.errors import ConfigError


class PromptProvider(Protocol):
    """Maps a batch of LQ images (and, in training, their HQ originals), both in [0, 1], to prompts."""

    def __call__(self, lq: torch.Tensor, hq: torch.Tensor | None = None) -> list[str]: ...


class NullPrompt:
    """The empty prompt for every image (the paper's 'null' ablation arm)."""

    def __call__(self, lq: torch.Tensor, hq: torch.Tensor | None = None) -> list[str]:
        return [""] * lq.shape[0]


class FixedPrompt:
    """One fixed string from config for every image."""

    def __init__(self, text: str) -> None:
        self.text = text

    def __call__(self, lq: torch.Tensor, hq: torch.Tensor | None = None) -> list[str]:
        return [self.text] * lq.shape[0]


def build_prompt_provider(cfg: DictConfig | None) -> PromptProvider:
    """The provider named by ``cfg.name``; no prompt config at all means the null prompt."""
    name = "null" if cfg is None else cfg.name
    if name == "null":
        return NullPrompt()
    if name == "fixed":
        return FixedPrompt(str(cfg.text))
    raise ConfigError(f"prompt.name '{name}' is not available; choose prompt=null or prompt=fixed")
