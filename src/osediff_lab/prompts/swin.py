"""RAM's image encoder: a Swin Transformer laid out exactly as RAM's checkpoint names it.

Blocks, patch embedding and patch merging are timm's; only the stage container differs, because RAM
(the original Swin code) puts each stage's ``downsample`` at the end of ``layers.i`` where timm puts it at
the start of the next stage. Its output is the average-pooled token followed by the last stage's tokens.
"""

from __future__ import annotations

import torch
from timm.layers import PatchEmbed
from timm.models.swin_transformer import PatchMerging, SwinTransformerBlock
from torch import nn

from osediff_lab.prompts.lora_layers import MergedLoRALinear


class SwinStage(nn.Module):
    """``blocks`` (alternating plain and shifted windows) then an optional ``downsample``; NHWC in and out."""

    def __init__(
        self, dim: int, resolution: int, depth: int, heads: int, window: int, mlp_ratio: float, downsample: bool, lora_rank: int
    ) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(
            SwinTransformerBlock(
                dim=dim,
                input_resolution=(resolution, resolution),
                num_heads=heads,
                window_size=window,
                shift_size=0 if i % 2 == 0 else window // 2,
                mlp_ratio=mlp_ratio,
                qkv_bias=True,
            )
            for i in range(depth)
        )
        if lora_rank:
            for block in self.blocks:
                # DAPE adapts q and v of the fused projection, not k.
                block.attn.qkv = MergedLoRALinear(dim, 3 * dim, lora_rank, enabled=(True, False, True))
        self.downsample = PatchMerging(dim) if downsample else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)
        return self.downsample(x) if self.downsample is not None else x


class SwinEncoder(nn.Module):
    """Swin image encoder: normalised image [B, 3, S, S] -> tokens [B, 1 + (S / patch / 2^(stages-1))^2, width]."""

    def __init__(
        self,
        image_size: int,
        patch_size: int,
        embed_dim: int,
        depths: list[int],
        num_heads: list[int],
        window_size: int,
        mlp_ratio: float,
        lora_rank: int,
    ) -> None:
        super().__init__()
        self.patch_embed = PatchEmbed(
            img_size=image_size, patch_size=patch_size, in_chans=3, embed_dim=embed_dim, norm_layer=nn.LayerNorm, output_fmt="NHWC"
        )
        resolution = image_size // patch_size
        n = len(depths)
        self.layers = nn.ModuleList(
            SwinStage(
                embed_dim * 2**i, resolution // 2**i, depths[i], num_heads[i], window_size, mlp_ratio, i < n - 1, lora_rank
            )
            for i in range(n)
        )
        self.width = embed_dim * 2 ** (n - 1)
        self.norm = nn.LayerNorm(self.width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(x)
        for layer in self.layers:
            x = layer(x)
        x = self.norm(x.flatten(1, 2))
        return torch.cat([x.mean(dim=1, keepdim=True), x], dim=1)
