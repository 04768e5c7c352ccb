"""Prompt strings -> text conditioning for the denoiser (``TextEmbeds``), with a string cache.

``TextEncoders`` (``backbones.text``) is the frozen module each backbone's prompt encoding subclasses;
``PromptEmbedder`` caches its output per prompt string; ``encode_prompts`` is SD2.1's encoding of one CLIP.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from osediff_lab.backbones.embeds import TextEmbeds
from osediff_lab.backbones.text import TextEncoders, token_ids

if TYPE_CHECKING:
    from transformers import CLIPTextModel, CLIPTokenizer


@torch.no_grad()
def encode_prompts(tokenizer: CLIPTokenizer, text_encoder: CLIPTextModel, prompts: list[str]) -> torch.Tensor:
    """Last hidden state for each prompt, padded/truncated to the tokenizer's length (SD2.1's conditioning)."""
    return text_encoder(token_ids(tokenizer, prompts).to(text_encoder.device))[0]


class PromptEmbedder:
    """Embeddings per prompt string, cached: null, fixed and negative prompts are encoded once, and
    image-dependent prompts (DAPE tags) are encoded only for strings not seen recently."""

    def __init__(self, text_encoders: TextEncoders, max_cached: int) -> None:
        self.text_encoders = text_encoders
        self.max_cached = max_cached
        self._cache: dict[str, TextEmbeds] = {}

    def __call__(self, prompts: list[str]) -> TextEmbeds:
        """One row per prompt on the text encoders' current device."""
        device = self.text_encoders.device
        missing = [p for p in dict.fromkeys(prompts) if p not in self._cache]
        if missing:
            if len(self._cache) + len(missing) > self.max_cached:
                self._cache.clear()
            encoded = self.text_encoders(missing)
            self._cache.update((p, encoded[i]) for i, p in enumerate(missing))
        return TextEmbeds.cat(self._cache[p].to(device) for p in prompts)
