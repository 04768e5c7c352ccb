"""The ``Backbone`` interface: everything the lab knows about one family of base model, in one class, and the
``Components`` of a base model it loads or builds.

A backbone recognises its diffusers folder (and its denoiser module), loads it, builds its random twins from
``model.arch``, encodes prompts into ``TextEmbeds``, calls its denoiser on a latent (any packing inside that
call), gives its noise schedule, its LoRA groups and fully trained input layer, the latent side multiple its
denoiser needs, its attention processors, its compatibility checks, and the files of its diffusers folder for
the weights manifest. A subclass that sets its own ``name`` registers itself under it (``backbones`` looks
families up there); a model config names its backbone by that name or by ``_target_``.

Import-light on purpose (torch only): diffusers and transformers load when a backbone builds, loads or runs,
so the weights manifest can read the folder files of every family without them.
"""

from __future__ import annotations

import importlib
import json
from abc import ABC, abstractmethod
from collections.abc import Callable, Collection, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import nn

from osediff_lab.backbones.components import Components, library_class
from osediff_lab.backbones.embeds import TextEmbeds
from osediff_lab.errors import ConfigError

if TYPE_CHECKING:
    from diffusers import SchedulerMixin

    from osediff_lab.backbones.schedules import NoiseSchedule
    from osediff_lab.backbones.text import TextEncoders

REGISTRY: dict[str, type[Backbone]] = {}  # name -> class, in registration order
FolderFile = tuple[str, str, str, "float | None"]  # (manifest entry suffix, file in the folder, what, approx MB)


def folder_class(path: Path) -> str | None:
    """The ``_class_name`` a diffusers subfolder's config.json names (None without a readable one)."""
    try:
        return json.loads((path / "config.json").read_text()).get("_class_name")
    except (OSError, ValueError):
        return None


@dataclass(frozen=True)
class TextPart:
    """A tokenizer and text encoder pair of a diffusers folder (subfolders ``tokenizer<suffix>`` and
    ``text_encoder<suffix>``, also the ``Components`` attributes and ``model.arch`` keys), by transformers class
    name; an ``optional`` pair may be absent from a folder or an arch."""

    suffix: str
    tokenizer: str
    encoder: str
    optional: bool = False

    @property
    def tokenizer_folder(self) -> str:
        return f"tokenizer{self.suffix}"

    @property
    def encoder_folder(self) -> str:
        return f"text_encoder{self.suffix}"


@dataclass(frozen=True)
class Release:
    """A published base model of a backbone: its weights group (``python -m osediff_lab.weights fetch <group>``,
    also its model preset's name), label, manifest name prefix, cache folder, Hugging Face repo and licence gate."""

    group: str
    label: str
    prefix: str
    folder: str
    repo: str
    licence: str | None = None


def clip_files(folder: str, what: str, mb: float) -> tuple[FolderFile, ...]:
    """A CLIP tokenizer and text encoder pair of a diffusers folder (``folder``: text_encoder, text_encoder_2)."""
    tok = folder.replace("text_encoder", "tokenizer")
    return (
        (f"{folder}_config", f"{folder}/config.json", f"{what} config", None),
        (folder, f"{folder}/model.safetensors", what, mb),
        (f"{tok}_vocab", f"{tok}/vocab.json", "CLIP tokenizer vocabulary", None),
        (f"{tok}_merges", f"{tok}/merges.txt", "CLIP tokenizer BPE merges", None),
        (f"{tok}_config", f"{tok}/tokenizer_config.json", "CLIP tokenizer config", None),
        (f"{tok}_special", f"{tok}/special_tokens_map.json", "CLIP tokenizer special tokens", None),
    )


def t5_files(folder: str, what: str) -> tuple[FolderFile, ...]:
    """A two-shard T5-XXL encoder and its SentencePiece tokenizer in a diffusers folder (``folder``: text_encoder_2,
    text_encoder_3; ``what``: the encoder config's label); sizes are the Hub's."""
    tok = folder.replace("text_encoder", "tokenizer")
    return (
        (f"{folder}_config", f"{folder}/config.json", what, None),
        (f"{folder}_index", f"{folder}/model.safetensors.index.json", "T5-XXL shard index", None),
        (f"{folder}_1", f"{folder}/model-00001-of-00002.safetensors", "T5-XXL encoder, shard 1", 4990),
        (f"{folder}_2", f"{folder}/model-00002-of-00002.safetensors", "T5-XXL encoder, shard 2", 4530),
        (f"{tok}_spiece", f"{tok}/spiece.model", "T5 SentencePiece model", None),
        (f"{tok}_json", f"{tok}/tokenizer.json", "T5 fast tokenizer", None),
        (f"{tok}_config", f"{tok}/tokenizer_config.json", "T5 tokenizer config", None),
        (f"{tok}_special", f"{tok}/special_tokens_map.json", "T5 tokenizer special tokens", None),
    )


def common_files(denoiser: str, denoiser_what: str, denoiser_mb: float, vae_mb: float) -> tuple[FolderFile, ...]:
    """The pipeline index, scheduler config, denoiser and VAE of a diffusers folder (``denoiser``: its subfolder)."""
    return (
        ("model_index", "model_index.json", "pipeline index", None),
        ("scheduler", "scheduler/scheduler_config.json", "scheduler config (class, prediction type)", None),
        (f"{denoiser}_config", f"{denoiser}/config.json", f"{denoiser_what} config", None),
        (denoiser, f"{denoiser}/diffusion_pytorch_model.safetensors", denoiser_what, denoiser_mb),
        ("vae_config", "vae/config.json", "VAE config", None),
        ("vae", "vae/diffusion_pytorch_model.safetensors", "VAE", vae_mb),
    )


class Backbone(ABC):
    """One family of base model. Class attributes describe its diffusers folder; an instance may carry options
    (a dataclass subclass: its fields are ``model.*`` keys) and is attached to the denoiser it built (``TAG``)."""

    name: ClassVar[str]  # registered name: model.backbone=<name>
    denoiser_folder: ClassVar[str] = "unet"  # its subfolder, its model.arch key
    denoiser_class: ClassVar[str]  # diffusers class
    text_parts: ClassVar[tuple[TextPart, ...]]  # in diffusers' order
    rectified_flow: ClassVar[bool] = False  # trained by rectified flow rather than epsilon / v-prediction
    schedule_note: ClassVar[str]  # which schedules fit the denoiser, for the mismatch message
    attention: ClassVar[dict[str, str]] = {"sdpa": "AttnProcessor2_0", "plain": "AttnProcessor"}  # pipeline.fast.attention
    fused_attention: ClassVar[str] = "FusedAttnProcessor2_0"  # pipeline.fast.fuse_qkv's processor
    releases: ClassVar[tuple[Release, ...]] = ()
    folder_files: ClassVar[tuple[FolderFile, ...]] = ()  # its diffusers folder's files, for the weights manifest
    # (encode_prompt, call_denoiser): module-level functions of torch and the loaded diffusers / transformers objects
    # alone, whose source format=diffusers pastes into its infer.py; a variant inherits its family's; None: no script
    standalone: ClassVar[tuple[Callable[..., Any], Callable[..., Any]] | None] = None

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "name" not in vars(cls):  # a variant without its own name is not a family of its own
            return
        taken = REGISTRY.get(cls.name)
        if taken is not None and (taken.__module__, taken.__qualname__) != (cls.__module__, cls.__qualname__):
            raise ValueError(f"backbone name '{cls.name}' is taken by {taken.__module__}.{taken.__qualname__}")
        REGISTRY[cls.name] = cls

    # ---- recognition -------------------------------------------------------------------------------------
    @classmethod
    @abstractmethod
    def recognises(cls, parts: Collection[str], denoiser_class: str | None) -> bool:
        """Whether a base model with these ``parts`` (folder or ``model.arch`` names) and denoiser class (None
        when unknown, as in an arch) is of this family."""

    @classmethod
    def recognises_folder(cls, path: Path) -> bool:
        """Whether the diffusers folder at ``path`` holds this family (its subfolders, its denoiser's class)."""
        if not path.is_dir():
            return False
        parts = {p.name for p in path.iterdir() if p.is_dir()}
        return cls.recognises(parts, folder_class(path / cls.denoiser_folder))

    @classmethod
    def recognises_arch(cls, arch: Mapping[str, Any]) -> bool:
        """Whether a random twin's ``model.arch`` (from a config without ``model.backbone``) is of this family."""
        return cls.recognises(set(arch), None)

    @classmethod
    @abstractmethod
    def recognises_denoiser(cls, net: nn.Module) -> bool:
        """Whether ``net`` is this family's denoiser (for a network built outside ``Components``)."""

    @classmethod
    def denoiser_type(cls) -> type[nn.Module]:
        """The denoiser's class (``denoiser_class`` of diffusers; a backbone with its own class returns it)."""
        return library_class("diffusers", cls.denoiser_class)

    @classmethod
    def folders(cls) -> tuple[str, ...]:
        """The subfolders its diffusers folder must have."""
        text = [f for p in cls.text_parts if not p.optional for f in (p.tokenizer_folder, p.encoder_folder)]
        return (*text, "vae", cls.denoiser_folder, "scheduler")

    # ---- loading and building ----------------------------------------------------------------------------
    def wants(self, part: TextPart, path: Path) -> bool:
        """Whether ``load`` reads ``part`` from the folder at ``path`` (an optional one only when it is there)."""
        return not part.optional or (path / part.encoder_folder).is_dir()

    def load(self, path: Path) -> Components:
        """Every component of its diffusers folder at ``path``, offline."""
        # diffusers and transformers load with the first model, not with the CLIs that import this
        from osediff_lab.backbones.parts import load_components

        return load_components(self, path)

    def build_random(self, arch: Mapping[str, Any]) -> Components:
        """Randomly initialised components at the sizes in ``arch`` (``model.arch`` of its tiny / shape twins)."""
        from osediff_lab.backbones.parts import random_components  # as load()

        return random_components(self, arch)

    # ---- conditioning and the denoiser -------------------------------------------------------------------
    @abstractmethod
    def text_encoders(self, c: Components) -> TextEncoders:
        """Its prompt encoders over the components' tokenizers and encoders: strings -> TextEmbeds."""

    @abstractmethod
    def denoiser_output(self, net: nn.Module, z_t: torch.Tensor, timestep: torch.Tensor, embeds: TextEmbeds,
                        factor: int) -> torch.Tensor:
        """``net``'s output on the scaled latent ``z_t`` (B, C, h, w) at ``timestep`` (the schedule's
        ``model_timestep``) given ``embeds``, shaped like ``z_t``; ``factor`` is the VAE's pixels per latent cell."""

    def schedule(self, scheduler: SchedulerMixin) -> NoiseSchedule:
        """The noise schedule of its scheduler (``backbones.schedules``: alpha-bar or fixed-shift flow); a backbone
        whose shift depends on the image size overrides this."""
        from osediff_lab.backbones.schedules import schedule_from_scheduler

        return schedule_from_scheduler(scheduler)

    def guidance_distilled(self, net: nn.Module) -> bool:
        """Whether ``net`` takes the guidance value as an input (guidance distillation, FLUX.1-dev): then the real
        score of score distillation is one call at guidance = the CFG value, not CFG against a negative prompt."""
        return False

    def denoiser_channels(self, net: nn.Module) -> tuple[int, int]:
        """The latent channels the denoiser takes and gives (before any packing of its own)."""
        return int(net.config.in_channels), int(net.config.out_channels)

    @abstractmethod
    def lora_groups(self, net: nn.Module, names: Iterable[str]) -> dict[str, list[str]]:
        """OSEDiff's three LoRA groups (encoder, decoder, others) of the denoiser's module ``names``."""

    @abstractmethod
    def input_layer(self, net: nn.Module) -> str:
        """The denoiser's first layer, trained in full by OSEDiff."""

    def latent_multiple(self, net: nn.Module) -> int:
        """The latent side multiple the denoiser needs (1: it pads itself)."""
        return 1

    # ---- features a diffusion-feature discriminator reads -----------------------------------------------
    def feature_points(self, net: nn.Module) -> dict[str, tuple[nn.Module, int]]:
        """The denoiser's named intermediate features in forward order: name -> (the module whose output holds it,
        its channels). Every family names a ``mid`` (its bottleneck, or its middle block)."""
        raise ConfigError(f"the {self.name} backbone names no denoiser features: choose an image discriminator")

    def feature_map(self, output: Any, z_t: torch.Tensor, net: nn.Module) -> torch.Tensor:
        """A feature point's module output as a (B, C, h, w) map (``z_t``: the latent the denoiser was called on)."""
        return output[0] if isinstance(output, tuple) else output

    # ---- inference fast paths ----------------------------------------------------------------------------
    def set_attention(self, net: nn.Module, kind: str) -> None:
        """The attention kernel ``kind`` (``pipeline.fast.attention``) in every attention layer of the denoiser."""
        if kind not in self.attention:
            raise ConfigError(f"pipeline.fast.attention='{kind}' has no processor for the {self.name} backbone's "
                              f"denoiser; use one of {sorted(self.attention)}")
        net.set_attn_processor(self.processor(self.attention[kind]))

    def fuse_qkv(self, net: nn.Module) -> None:
        """One projection for q, k, v in the denoiser's attention, run by its fused processor."""
        net.fuse_qkv_projections()
        net.set_attn_processor(self.processor(self.fused_attention))

    def processor(self, name: str) -> Any:
        """A new attention processor of class ``name`` (diffusers' shared processors; a family with its own
        module of processors overrides this)."""
        return attention_processor(name)

    # ---- checks ------------------------------------------------------------------------------------------
    def compatibility_problems(self, c: Components) -> list[str]:
        """Why these components cannot run a one-step method: a schedule that does not fit the denoiser, VAE
        latents of other channels, or conditioning of other widths."""
        from osediff_lab.backbones.schedules import FlowMatchSchedule

        try:
            schedule = self.schedule(c.scheduler)
        except ConfigError as exc:
            return [str(exc)]
        problems = []
        if isinstance(schedule, FlowMatchSchedule) != self.rectified_flow:
            problems.append(f"{type(c.scheduler).__name__} does not fit a {type(c.denoiser).__name__}: {self.schedule_note}")
        latent = c.vae.config.latent_channels
        channels_in, channels_out = self.denoiser_channels(c.denoiser)
        if latent != channels_in or latent != channels_out:
            problems.append(f"VAE latent channels {latent} != denoiser in/out channels {channels_in}/{channels_out}")
        return problems + self.conditioning_problems(c)

    def conditioning_problems(self, c: Components) -> list[str]:
        """Text encoder widths that do not fit the denoiser's conditioning inputs."""
        return []


def token_points(blocks: Iterable[nn.Module], width: int) -> dict[str, tuple[nn.Module, int]]:
    """A transformer's feature points: ``block.<i>`` (the output of block i) and ``mid`` (the middle block's)."""
    blocks = list(blocks)
    return {f"block.{i}": (block, width) for i, block in enumerate(blocks)} | {"mid": (blocks[len(blocks) // 2], width)}


def token_map(tokens: torch.Tensor, z_t: torch.Tensor, patch: int) -> torch.Tensor:
    """Image tokens (B, N, D) of a latent ``z_t`` (B, C, h, w) cut into ``patch`` x ``patch`` cells, row by row,
    as a (B, D, h / patch, w / patch) map."""
    rows, cols = z_t.shape[-2] // patch, z_t.shape[-1] // patch
    return tokens.transpose(1, 2).reshape(tokens.shape[0], tokens.shape[2], rows, cols)


def attention_processor(name: str) -> Any:
    """A new diffusers attention processor of class ``name``."""
    return getattr(importlib.import_module("diffusers.models.attention_processor"), name)()
