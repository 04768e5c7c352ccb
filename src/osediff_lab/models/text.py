"""Prompt strings -> text conditioning for the denoiser (``TextEmbeds``), per base-model family, with a string cache.

``sd``: one CLIP encoder's last hidden state (SD2.1). ``sdxl``: two CLIP encoders' penultimate hidden states
concatenated on the width, pooled = the second (projection) encoder's text embedding. ``sd3``: CLIP-L and
CLIP-G penultimate states concatenated and zero-padded to the transformer's joint width, then T5's tokens
appended (zeros when T5 is not loaded, as diffusers does); pooled = both CLIP projections concatenated.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers import CLIPTextModel, CLIPTokenizer, PreTrainedTokenizerBase

from osediff_lab.models.backbone import FAMILIES, TextEmbeds


def token_ids(tokenizer: PreTrainedTokenizerBase, prompts: list[str], max_length: int | None = None) -> torch.Tensor:
    """Token ids padded/truncated to ``max_length`` (default: the tokenizer's, 77 for CLIP)."""
    length = max_length or tokenizer.model_max_length
    return tokenizer(prompts, padding="max_length", max_length=length, truncation=True, return_tensors="pt").input_ids


@torch.no_grad()
def encode_prompts(tokenizer: CLIPTokenizer, text_encoder: CLIPTextModel, prompts: list[str]) -> torch.Tensor:
    """Last hidden state for each prompt, padded/truncated to the tokenizer's length (SD2.1's conditioning)."""
    return text_encoder(token_ids(tokenizer, prompts).to(text_encoder.device))[0]


class TextEncoders(nn.Module):
    """A base model's prompt encoders as one frozen module: ``self(prompts) -> TextEmbeds``.

    ``clip`` are the CLIP encoders in diffusers' order (text_encoder, text_encoder_2), ``t5`` SD3's optional
    third; ``joint_width`` is SD3's transformer ``joint_attention_dim`` and ``t5_max_length`` its T5 token count.
    """

    def __init__(self, family: str, tokenizers: list[PreTrainedTokenizerBase], clip: list[nn.Module],
                 t5: nn.Module | None = None, t5_tokenizer: PreTrainedTokenizerBase | None = None,
                 joint_width: int | None = None, t5_max_length: int = 256) -> None:
        super().__init__()
        if family not in FAMILIES:
            raise ValueError(f"unknown base-model family '{family}'; one of {FAMILIES}")
        expected = {"sd": 1, "sdxl": 2, "sd3": 2}[family]
        if len(clip) != expected or len(tokenizers) != expected:
            raise ValueError(f"family '{family}' needs {expected} CLIP encoder(s) and tokenizer(s), got {len(clip)}/{len(tokenizers)}")
        self.family = family
        self.tokenizers = tokenizers
        self.clip = nn.ModuleList(clip)
        self.t5 = t5
        self.t5_tokenizer = t5_tokenizer
        self.joint_width = joint_width
        self.t5_max_length = t5_max_length

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    @torch.no_grad()
    def forward(self, prompts: list[str]) -> TextEmbeds:
        device = self.device
        if self.family == "sd":
            return TextEmbeds(self.clip[0](token_ids(self.tokenizers[0], prompts).to(device))[0])
        hidden, pooled = [], []
        for tokenizer, encoder in zip(self.tokenizers, self.clip, strict=True):
            out = encoder(token_ids(tokenizer, prompts).to(device), output_hidden_states=True)
            hidden.append(out.hidden_states[-2])
            pooled.append(out[0])  # CLIPTextModelWithProjection: text_embeds; CLIPTextModel: unused here
        if self.family == "sdxl":
            return TextEmbeds(torch.cat(hidden, dim=-1), pooled[-1])
        clip_states = torch.cat(hidden, dim=-1)
        clip_states = F.pad(clip_states, (0, self.joint_width - clip_states.shape[-1]))
        if self.t5 is None:
            t5_states = clip_states.new_zeros(len(prompts), self.t5_max_length, self.joint_width)
        else:
            t5_states = self.t5(token_ids(self.t5_tokenizer, prompts, self.t5_max_length).to(device))[0].to(clip_states.dtype)
        return TextEmbeds(torch.cat([clip_states, t5_states], dim=-2), torch.cat(pooled, dim=-1))


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
