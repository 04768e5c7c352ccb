"""What a loaded or randomly built base model hands the methods (``Components``), apart from the families that
build it (``backbones.base``), so the builders (``backbones.parts``) need no family."""

from __future__ import annotations

import functools
import importlib
from typing import TYPE_CHECKING, Any

from torch import nn

if TYPE_CHECKING:
    from diffusers import AutoencoderKL, SchedulerMixin
    from transformers import PreTrainedTokenizerBase

    from osediff_lab.backbones.text import TextEncoders

TAG = "osediff_backbone"  # the attribute a denoiser carries its backbone in (deep copies keep it)


def library_class(library: str, name: str) -> type:
    """The class ``name`` of ``library`` (diffusers, transformers), imported when first needed."""
    return getattr(importlib.import_module(library), name)



class Components:
    """The frozen-at-load parts of a base model that methods share, built by their ``backbone``. ``denoiser`` is the
    UNet or transformer of any family; ``*_2`` / ``*_3`` are the extra tokenizers and text encoders
    of families with several (SD3's T5, ``text_encoder_3``, may be absent). A plain class, not a dataclass, so
    that Hydra hands it to a method's constructor as itself rather than as a config copy of its fields."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, text_encoder: nn.Module, vae: AutoencoderKL, denoiser: nn.Module,
                 scheduler: SchedulerMixin, backbone: Any, tokenizer_2: PreTrainedTokenizerBase | None = None,
                 text_encoder_2: nn.Module | None = None, tokenizer_3: PreTrainedTokenizerBase | None = None,
                 text_encoder_3: nn.Module | None = None) -> None:
        self.tokenizer, self.text_encoder, self.vae, self.denoiser, self.scheduler = tokenizer, text_encoder, vae, denoiser, scheduler
        self.backbone = backbone
        self.tokenizer_2, self.text_encoder_2 = tokenizer_2, text_encoder_2
        self.tokenizer_3, self.text_encoder_3 = tokenizer_3, text_encoder_3
        setattr(denoiser, TAG, backbone)

    def replace(self, **changes: Any) -> Components:
        """A copy with the parts ``changes`` names swapped (as ``dataclasses.replace``)."""
        parts = ("tokenizer", "text_encoder", "vae", "denoiser", "scheduler", "backbone", "tokenizer_2", "text_encoder_2",
                 "tokenizer_3", "text_encoder_3")
        return Components(**{name: getattr(self, name) for name in parts} | changes)

    @property
    def scaling_factor(self) -> float:
        return float(self.vae.config.scaling_factor)

    @property
    def family(self) -> str:
        return self.backbone.name

    @functools.cached_property
    def text(self) -> TextEncoders:
        """Every prompt encoder as one module (strings -> TextEmbeds), sharing these components' encoders."""
        return self.backbone.text_encoders(self)

    def text_modules(self) -> list[nn.Module]:
        """The text encoders that are loaded, in diffusers' order."""
        return [m for m in (self.text_encoder, self.text_encoder_2, self.text_encoder_3) if m is not None]
