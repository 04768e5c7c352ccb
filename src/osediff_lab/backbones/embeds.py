"""Prompt conditioning as every backbone returns it (``TextEmbeds``) and every method passes it on."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class TextEmbeds:
    """Prompt conditioning, one row per prompt: per-token ``hidden`` states (B, tokens, width) and, for backbones
    with a pooled text vector (SDXL, SD3), ``pooled`` (B, width). Tensor-like where the methods need it (device,
    batch, detach)."""

    hidden: torch.Tensor
    pooled: torch.Tensor | None = None

    def __len__(self) -> int:
        return self.hidden.shape[0]

    def to(self, *args, **kwargs) -> TextEmbeds:
        pooled = None if self.pooled is None else self.pooled.to(*args, **kwargs)
        return TextEmbeds(self.hidden.to(*args, **kwargs), pooled)

    def detach(self) -> TextEmbeds:
        return TextEmbeds(self.hidden.detach(), None if self.pooled is None else self.pooled.detach())

    def __getitem__(self, index: int | slice | torch.Tensor) -> TextEmbeds:
        """Rows ``index`` (an int keeps its batch dimension of 1)."""
        if isinstance(index, int):
            index = slice(index, index + 1)
        return TextEmbeds(self.hidden[index], None if self.pooled is None else self.pooled[index])

    def expand(self, batch: int) -> TextEmbeds:
        """A one-row embedding repeated ``batch`` times (a view, as ``Tensor.expand``)."""
        pooled = None if self.pooled is None else self.pooled.expand(batch, -1)
        return TextEmbeds(self.hidden.expand(batch, -1, -1), pooled)

    @staticmethod
    def cat(items: Iterable[TextEmbeds]) -> TextEmbeds:
        """Rows of every item, in order (all with or all without a pooled vector)."""
        items = list(items)
        pooled = [e.pooled for e in items]
        if any(p is None for p in pooled) and not all(p is None for p in pooled):
            raise ValueError("cannot concatenate embeddings with and without a pooled vector")
        return TextEmbeds(torch.cat([e.hidden for e in items]), None if pooled[0] is None else torch.cat(pooled))


def as_embeds(embeds: TextEmbeds | torch.Tensor) -> TextEmbeds:
    """``embeds`` as TextEmbeds; a bare tensor is SD2.1-style hidden states without a pooled vector."""
    return embeds if isinstance(embeds, TextEmbeds) else TextEmbeds(embeds)
