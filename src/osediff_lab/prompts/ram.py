"""The Recognize Anything Model's tagging path (RAM Swin-L; with LoRA it is SeeSR's DAPE).

image in [0, 1] -> resize + ImageNet normalisation -> Swin tokens -> ``image_proj`` -> the tag queries
(``relu(wordvec_proj(label_embed))``) attend to them in ``tagging_head`` -> ``fc`` -> one logit per tag ->
a tag is on when sigmoid(logit) > its threshold. Module names match the released checkpoints.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from importlib import resources
from typing import Any

import torch
import torch.nn.functional as F
from omegaconf import DictConfig, OmegaConf
from torch import nn

from osediff_lab.errors import ConfigError
from osediff_lab.prompts.swin import SwinEncoder
from osediff_lab.prompts.tagging_head import TaggingHead


@dataclass(frozen=True)
class RAMArch:
    """Sizes of the tagging path; ``conf/prompt/dape.yaml`` holds the released model's values."""

    image_size: int
    patch_size: int
    embed_dim: int
    depths: tuple[int, ...]
    num_heads: tuple[int, ...]
    window_size: int
    mlp_ratio: float
    embed_width: int
    head_hidden: int
    head_heads: int
    head_layers: int
    head_intermediate: int
    head_layer_norm_eps: float
    num_tags: int
    lora_rank: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]

    @classmethod
    def from_config(cls, cfg: DictConfig | Mapping[str, Any], lora_rank: int | None = None) -> RAMArch:
        """Build from ``prompt.arch``; ``lora_rank`` overrides the configured rank (0 = plain RAM)."""
        values = OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, DictConfig) else dict(cfg)
        for key in ("depths", "num_heads", "mean", "std"):
            values[key] = tuple(values[key])
        if lora_rank is not None:
            values["lora_rank"] = lora_rank
        try:
            return cls(**values)
        except TypeError as exc:
            raise ConfigError(f"prompt.arch does not describe a RAM model: {exc}") from exc


def tag_vocabulary(num_tags: int) -> tuple[list[str], torch.Tensor]:
    """The first ``num_tags`` RAM tag names and their per-tag thresholds (shipped as package data)."""
    folder = resources.files("osediff_lab") / "assets" / "ram"
    names = (folder / "ram_tag_list.txt").read_text(encoding="utf-8").splitlines()
    thresholds = [float(s) for s in (folder / "ram_tag_list_threshold.txt").read_text(encoding="utf-8").split()]
    if len(names) != len(thresholds):
        raise RuntimeError(f"packaged RAM tag list has {len(names)} names but {len(thresholds)} thresholds")
    if num_tags > len(names):
        raise ConfigError(f"prompt.arch.num_tags={num_tags} exceeds the {len(names)} RAM tags shipped with the package")
    return names[:num_tags], torch.tensor(thresholds[:num_tags])


def select_tags(logits: torch.Tensor, thresholds: torch.Tensor, names: list[str], exclude: set[int] | None = None) -> list[list[str]]:
    """Tag names per image where sigmoid(logit) > threshold (strictly), in tag-list order; ``exclude`` drops indices."""
    on = torch.sigmoid(logits.float()) > thresholds.to(logits.device, torch.float32)
    if exclude:
        on[:, sorted(exclude)] = False
    return [[names[i] for i in row.nonzero().flatten().tolist()] for row in on.cpu()]


class RAMTagger(nn.Module):
    """RAM's tagging path; ``logits`` maps images in [0, 1] to one logit per tag."""

    def __init__(self, arch: RAMArch) -> None:
        super().__init__()
        self.arch = arch
        self.visual_encoder = SwinEncoder(
            arch.image_size, arch.patch_size, arch.embed_dim, list(arch.depths), list(arch.num_heads),
            arch.window_size, arch.mlp_ratio, arch.lora_rank,
        )
        self.image_proj = nn.Linear(self.visual_encoder.width, arch.embed_width)
        # Checkpoints overwrite it; random (not zeros) so that random-weight presets give distinct tag logits.
        self.label_embed = nn.Parameter(torch.randn(arch.num_tags, arch.embed_width))
        self.wordvec_proj = nn.Linear(arch.embed_width, arch.head_hidden)
        self.tagging_head = TaggingHead(
            arch.head_hidden, arch.head_heads, arch.head_layers, arch.head_intermediate,
            arch.head_layer_norm_eps, arch.embed_width, arch.lora_rank,
        )
        self.fc = nn.Linear(arch.head_hidden, 1)

    def preprocess(self, images01: torch.Tensor) -> torch.Tensor:
        """Images in [0, 1] (any size) -> the encoder's input: bilinear (antialiased) resize, ImageNet normalisation."""
        size = (self.arch.image_size, self.arch.image_size)
        x = images01.float()  # resized in fp32 (antialiased resizing has no fp16 kernel on the CPU)
        if x.shape[-2:] != size:
            x = F.interpolate(x, size=size, mode="bilinear", align_corners=False, antialias=True)
        x = x.to(self.image_proj.weight.dtype)
        mean = torch.tensor(self.arch.mean, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
        std = torch.tensor(self.arch.std, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
        return (x - mean) / std

    def forward(self, images01: torch.Tensor) -> torch.Tensor:
        """Per-tag logits [B, num_tags] for images in [0, 1]."""
        tokens = self.image_proj(self.visual_encoder(self.preprocess(images01)))
        queries = F.relu(self.wordvec_proj(self.label_embed)).unsqueeze(0).expand(tokens.shape[0], -1, -1)
        return self.fc(self.tagging_head(queries, tokens)).squeeze(-1)
