"""RAM's image-to-tag decoder (Query2Label): BERT layers that keep only cross-attention and the feed-forward.

The tag embeddings are the queries and all image tokens the keys/values (no mask). Output/feed-forward
sublayers are transformers' Bert modules; the cross-attention core is a few lines here because its keys and
values come from the narrower image width and carry DAPE's LoRA, which transformers' Bert attention cannot.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers import BertConfig
from transformers.models.bert.modeling_bert import BertIntermediate, BertOutput, BertSelfOutput

from osediff_lab.prompts.lora_layers import LoRALinear


def _linear(in_features: int, out_features: int, lora_rank: int) -> nn.Linear:
    return LoRALinear(in_features, out_features, lora_rank) if lora_rank else nn.Linear(in_features, out_features)


class CrossAttentionCore(nn.Module):
    """Multi-head attention of ``hidden`` [B, Q, H] over ``context`` [B, K, E]; returns [B, Q, H]."""

    def __init__(self, hidden: int, heads: int, context_width: int, lora_rank: int) -> None:
        super().__init__()
        self.heads = heads
        self.query = _linear(hidden, hidden, lora_rank)
        self.key = _linear(context_width, hidden, lora_rank)
        self.value = nn.Linear(context_width, hidden)

    def forward(self, hidden: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        def split(t: torch.Tensor) -> torch.Tensor:
            return t.unflatten(-1, (self.heads, -1)).transpose(1, 2)

        out = F.scaled_dot_product_attention(split(self.query(hidden)), split(self.key(context)), split(self.value(context)))
        return out.transpose(1, 2).flatten(2)


class CrossAttention(nn.Module):
    """BERT's attention block layout (``self`` then ``output``: dense + residual + LayerNorm)."""

    def __init__(self, config: BertConfig, context_width: int, lora_rank: int) -> None:
        super().__init__()
        self.self = CrossAttentionCore(config.hidden_size, config.num_attention_heads, context_width, lora_rank)
        self.output = BertSelfOutput(config)

    def forward(self, hidden: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        return self.output(self.self(hidden, context), hidden)


class TaggingLayer(nn.Module):
    """One decoder layer: cross-attention, then BERT's feed-forward (intermediate + output)."""

    def __init__(self, config: BertConfig, context_width: int, lora_rank: int) -> None:
        super().__init__()
        self.crossattention = CrossAttention(config, context_width, lora_rank)
        self.intermediate = BertIntermediate(config)
        self.output = BertOutput(config)

    def forward(self, hidden: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        attended = self.crossattention(hidden, context)
        return self.output(self.intermediate(attended), attended)


class TaggingEncoder(nn.Module):
    def __init__(self, config: BertConfig, context_width: int, lora_rank: int) -> None:
        super().__init__()
        self.layer = nn.ModuleList(TaggingLayer(config, context_width, lora_rank) for _ in range(config.num_hidden_layers))

    def forward(self, hidden: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        for layer in self.layer:
            hidden = layer(hidden, context)
        return hidden


class TaggingHead(nn.Module):
    """Tag queries [B, T, hidden] attend to image tokens [B, K, context_width]; returns [B, T, hidden]."""

    def __init__(
        self, hidden: int, heads: int, layers: int, intermediate: int, layer_norm_eps: float, context_width: int, lora_rank: int
    ) -> None:
        super().__init__()
        config = BertConfig(
            hidden_size=hidden,
            num_attention_heads=heads,
            num_hidden_layers=layers,
            intermediate_size=intermediate,
            hidden_act="gelu",
            layer_norm_eps=layer_norm_eps,
            hidden_dropout_prob=0.0,
            attention_probs_dropout_prob=0.0,
        )
        self.encoder = TaggingEncoder(config, context_width, lora_rank)

    def forward(self, queries: torch.Tensor, image_tokens: torch.Tensor) -> torch.Tensor:
        return self.encoder(queries, image_tokens)
