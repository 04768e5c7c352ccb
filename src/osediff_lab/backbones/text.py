"""The prompt-encoding part of the backbone interface: ``TextEncoders``, the frozen module each backbone
subclasses (which encoders, which hidden states, how they combine into ``TextEmbeds``)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from osediff_lab.backbones.embeds import TextEmbeds

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase


def token_ids(tokenizer: PreTrainedTokenizerBase, prompts: list[str], max_length: int | None = None) -> torch.Tensor:
    """Token ids padded/truncated to ``max_length`` (default: the tokenizer's, 77 for CLIP)."""
    length = max_length or tokenizer.model_max_length
    return tokenizer(prompts, padding="max_length", max_length=length, truncation=True, return_tensors="pt").input_ids


class TextEncoders(nn.Module):
    """A base model's prompt encoders as one frozen module: ``self(prompts) -> TextEmbeds`` without gradients, the
    backbone's subclass saying how (``encode``). ``tokenizers[i]`` feeds ``encoders[i]``, in diffusers' order."""

    def __init__(self, tokenizers: list[PreTrainedTokenizerBase], encoders: list[nn.Module]) -> None:
        super().__init__()
        if len(tokenizers) != len(encoders):
            raise ValueError(f"one tokenizer per text encoder, got {len(tokenizers)} and {len(encoders)}")
        self.tokenizers = tokenizers
        self.encoders = nn.ModuleList(encoders)

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    def run(self, index: int, prompts: list[str], max_length: int | None = None, **kwargs: Any) -> Any:
        """Encoder ``index``'s output on the prompts' token ids (padded to ``max_length``, default the tokenizer's)."""
        ids = token_ids(self.tokenizers[index], prompts, max_length).to(self.device)
        return self.encoders[index](ids, **kwargs)

    @torch.no_grad()
    def forward(self, prompts: list[str]) -> TextEmbeds:
        return self.encode(prompts)

    def encode(self, prompts: list[str]) -> TextEmbeds:
        """The conditioning of ``prompts``: which hidden states of which encoders, and how they combine."""
        raise NotImplementedError(f"{type(self).__name__} must say how its encoders condition the denoiser")
