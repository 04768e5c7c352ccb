"""Prompt conditioning as every backbone returns it (``TextEmbeds``) and every method passes it on."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch


def _rows(items: list[torch.Tensor | None], what: str) -> torch.Tensor | None:
    """The items concatenated on rows (all None: None; some None: an error naming ``what``)."""
    if all(item is None for item in items):
        return None
    if any(item is None for item in items):
        raise ValueError(f"cannot concatenate embeddings with and without a {what}")
    return torch.cat(items)


@dataclass(frozen=True)
class TextEmbeds:
    """Prompt conditioning, one row per prompt: per-token ``hidden`` states (B, tokens, width) and, for backbones
    with a pooled text vector (SDXL, SD3, FLUX), ``pooled`` (B, width). ``guidance`` (B,), the guidance value a
    guidance-distilled denoiser (FLUX.1-dev) is conditioned on, per row; None: its backbone's default
    (``model.guidance``). Tensor-like where the methods need it (device, batch, detach)."""

    hidden: torch.Tensor
    pooled: torch.Tensor | None = None
    guidance: torch.Tensor | None = None

    def __len__(self) -> int:
        return self.hidden.shape[0]

    def _map(self, fn) -> TextEmbeds:
        return TextEmbeds(fn(self.hidden), *(None if x is None else fn(x) for x in (self.pooled, self.guidance)))

    def to(self, *args, **kwargs) -> TextEmbeds:
        return self._map(lambda x: x.to(*args, **kwargs))

    def detach(self) -> TextEmbeds:
        return self._map(torch.Tensor.detach)

    def __getitem__(self, index: int | slice | torch.Tensor) -> TextEmbeds:
        """Rows ``index`` (an int keeps its batch dimension of 1)."""
        if isinstance(index, int):
            index = slice(index, index + 1)
        return self._map(lambda x: x[index])

    def expand(self, batch: int) -> TextEmbeds:
        """A one-row embedding repeated ``batch`` times (a view, as ``Tensor.expand``)."""
        guidance = None if self.guidance is None else self.guidance.expand(batch)
        pooled = None if self.pooled is None else self.pooled.expand(batch, -1)
        return TextEmbeds(self.hidden.expand(batch, -1, -1), pooled, guidance)

    def with_guidance(self, value: float) -> TextEmbeds:
        """These rows conditioned on the guidance value ``value`` (a guidance-distilled denoiser's input)."""
        return TextEmbeds(self.hidden, self.pooled, torch.full((len(self),), float(value), device=self.hidden.device))

    @staticmethod
    def cat(items: Iterable[TextEmbeds]) -> TextEmbeds:
        """Rows of every item, in order (all with or all without a pooled vector, and a guidance value)."""
        items = list(items)
        return TextEmbeds(torch.cat([e.hidden for e in items]), _rows([e.pooled for e in items], "pooled vector"),
                          _rows([e.guidance for e in items], "guidance value"))


def as_embeds(embeds: TextEmbeds | torch.Tensor) -> TextEmbeds:
    """``embeds`` as TextEmbeds; a bare tensor is SD2.1-style hidden states without a pooled vector."""
    return embeds if isinstance(embeds, TextEmbeds) else TextEmbeds(embeds)
