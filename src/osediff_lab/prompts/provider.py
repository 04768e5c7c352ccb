"""The prompt provider interface and the providers that need no model: null and fixed prompts."""

from __future__ import annotations

from typing import Protocol

import torch


class PromptProvider(Protocol):
    """Maps a batch of LQ images (and, in training, their HQ originals), both in [0, 1], to prompts.

    ``paths`` optionally names the source file of each image in ``lq``, so cached prompts can be keyed by file.
    """

    def __call__(self, lq: torch.Tensor, hq: torch.Tensor | None = None, paths: list[str] | None = None) -> list[str]: ...


class NullPrompt:
    """The empty prompt for every image (the paper's 'null' ablation arm)."""

    def __call__(self, lq: torch.Tensor, hq: torch.Tensor | None = None, paths: list[str] | None = None) -> list[str]:
        return [""] * lq.shape[0]


class FixedPrompt:
    """One fixed string from config for every image."""

    def __init__(self, text: str) -> None:
        self.text = text

    def __call__(self, lq: torch.Tensor, hq: torch.Tensor | None = None, paths: list[str] | None = None) -> list[str]:
        return [self.text] * lq.shape[0]
