"""Prompt strings -> CLIP text embeddings (the UNet's cross-attention context), with a string cache."""

from __future__ import annotations

import torch
from transformers import CLIPTextModel, CLIPTokenizer


@torch.no_grad()
def encode_prompts(tokenizer: CLIPTokenizer, text_encoder: CLIPTextModel, prompts: list[str]) -> torch.Tensor:
    """Last hidden state for each prompt, padded/truncated to the tokenizer's length (77 for SD)."""
    tok = tokenizer(prompts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt")
    return text_encoder(tok.input_ids.to(text_encoder.device))[0]


class PromptEmbedder:
    """Embeddings per prompt string, cached: null, fixed and negative prompts are encoded once, and
    image-dependent prompts (DAPE tags) are encoded only for strings not seen recently."""

    def __init__(self, tokenizer: CLIPTokenizer, text_encoder: CLIPTextModel, max_cached: int) -> None:
        self.tokenizer = tokenizer
        self.text_encoder = text_encoder
        self.max_cached = max_cached
        self._cache: dict[str, torch.Tensor] = {}

    def __call__(self, prompts: list[str]) -> torch.Tensor:
        """(len(prompts), tokens, width) on the text encoder's current device."""
        device = self.text_encoder.device
        missing = [p for p in dict.fromkeys(prompts) if p not in self._cache]
        if missing:
            if len(self._cache) + len(missing) > self.max_cached:
                self._cache.clear()
            self._cache.update(zip(missing, encode_prompts(self.tokenizer, self.text_encoder, missing), strict=True))
        return torch.stack([self._cache[p].to(device) for p in prompts])
