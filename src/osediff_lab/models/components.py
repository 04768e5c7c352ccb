"""Build or load the base-model components OSEDiff needs, per model preset and family (``models.backbone``).

Every preset goes through the classes diffusers' own pipelines use: CLIP tokenizers and text encoders (two
for SDXL and SD3, plus SD3's optional T5), AutoencoderKL, the denoiser (UNet2DConditionModel for SD2.1,
SD-Turbo and SDXL; SD3Transformer2DModel for SD3) and a diffusers scheduler. ``tiny*`` and ``*_shape`` presets
build them from config with random weights; ``sd21_base``, ``sd_turbo``, ``sdxl_base`` and ``sd3_medium`` load a
local diffusers-format directory (never the network), whose subfolders say the family. The scheduler's class
comes from the preset (``arch.scheduler.class_name``, DDPMScheduler if unset) or from the folder's
``scheduler/scheduler_config.json`` (``_class_name``), so its prediction type is the model's own.
"""

from __future__ import annotations

import functools
import json
import os
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import diffusers
import torch
from diffusers import AutoencoderKL, SchedulerMixin, SD3Transformer2DModel, UNet2DConditionModel
from omegaconf import DictConfig, OmegaConf
from tokenizers import Tokenizer, models, pre_tokenizers
from torch import nn
from transformers import (
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTextModelWithProjection,
    CLIPTokenizer,
    T5Config,
    T5EncoderModel,
    T5TokenizerFast,
)

from osediff_lab.build import build, checked_by
from osediff_lab.errors import ConfigError, MissingWeightsError
from osediff_lab.models.backbone import family_of
from osediff_lab.models.schedules import FlowMatchSchedule, schedule_from_scheduler
from osediff_lab.models.text import TextEncoders
from osediff_lab.weights.manifest import BASE_FAMILIES, BASE_MODELS

SUBFOLDERS = ("tokenizer", "text_encoder", "vae", "unet", "scheduler")  # SD2.1's; per family: FOLDERS
FOLDERS = {
    "sd": SUBFOLDERS,
    "sdxl": ("tokenizer", "tokenizer_2", "text_encoder", "text_encoder_2", "vae", "unet", "scheduler"),
    "sd3": ("tokenizer", "tokenizer_2", "text_encoder", "text_encoder_2", "vae", "transformer", "scheduler"),
}
SCHEDULER_CONFIG = "scheduler/scheduler_config.json"
TEXT_CLASSES = {"CLIPTextModel": CLIPTextModel, "CLIPTextModelWithProjection": CLIPTextModelWithProjection}


@dataclass
class Components:
    """The frozen-at-load parts of a base model that the generator and regularizer share. ``unet`` is the
    denoiser of any family (SD3's transformer too); ``*_2`` / ``*_3`` are SDXL's and SD3's extra text encoders
    (SD3's T5, ``text_encoder_3``, may be absent)."""

    tokenizer: CLIPTokenizer
    text_encoder: CLIPTextModel
    vae: AutoencoderKL
    unet: nn.Module
    scheduler: SchedulerMixin
    tokenizer_2: CLIPTokenizer | None = None
    text_encoder_2: CLIPTextModelWithProjection | None = None
    tokenizer_3: T5TokenizerFast | None = None
    text_encoder_3: T5EncoderModel | None = None
    t5_max_length: int = 256

    @property
    def scaling_factor(self) -> float:
        return float(self.vae.config.scaling_factor)

    @property
    def family(self) -> str:
        return family_of(self.unet)

    @functools.cached_property
    def text(self) -> TextEncoders:
        """Every prompt encoder as one module (strings -> TextEmbeds), sharing these components' encoders."""
        if self.family == "sd":
            return TextEncoders("sd", [self.tokenizer], [self.text_encoder])
        tokenizers, clip = [self.tokenizer, self.tokenizer_2], [self.text_encoder, self.text_encoder_2]
        if self.family == "sdxl":
            return TextEncoders("sdxl", tokenizers, clip)
        return TextEncoders("sd3", tokenizers, clip, self.text_encoder_3, self.tokenizer_3,
                            int(self.unet.config.joint_attention_dim), self.t5_max_length)

    def text_modules(self) -> list[nn.Module]:
        """The text encoders that are loaded, in diffusers' order."""
        return [m for m in (self.text_encoder, self.text_encoder_2, self.text_encoder_3) if m is not None]


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP byte-level BPE alphabet: every byte maps to a printable unicode character."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs), strict=True))


def write_tiny_tokenizer(directory: str | Path, merges: list[str]) -> Path:
    """Write a real CLIP byte-level BPE vocabulary (the 512 byte tokens, the given merges, specials).

    The result loads with ``CLIPTokenizer.from_pretrained`` exactly like SD2.1's tokenizer folder.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    alphabet = list(_bytes_to_unicode().values())
    vocab_tokens = alphabet + [c + "</w>" for c in alphabet]
    for merge in merges:
        a, b = merge.split()
        vocab_tokens.append(a + b)
    vocab_tokens += ["<|startoftext|>", "<|endoftext|>"]
    vocab = {tok: i for i, tok in enumerate(dict.fromkeys(vocab_tokens))}
    (directory / "vocab.json").write_text(json.dumps(vocab))
    (directory / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    (directory / "tokenizer_config.json").write_text(
        json.dumps(
            {
                "model_max_length": 77,
                "bos_token": "<|startoftext|>",
                "eos_token": "<|endoftext|>",
                "unk_token": "<|endoftext|>",
                "pad_token": "<|endoftext|>",
                "do_lower_case": True,
                "tokenizer_class": "CLIPTokenizer",
            }
        )
    )
    return directory


def _build_tokenizer(cfg: DictConfig) -> CLIPTokenizer:
    with tempfile.TemporaryDirectory(prefix="osediff_tokenizer_") as tmp:  # read into memory, then removed
        directory = write_tiny_tokenizer(Path(tmp), list(cfg.tokenizer.merges))
        return CLIPTokenizer.from_pretrained(str(directory), local_files_only=True)


def write_tiny_t5_tokenizer(directory: str | Path, words: list[str]) -> Path:
    """Write a real T5TokenizerFast folder (SentencePiece-style unigram over ``words``, T5's specials) that
    ``T5TokenizerFast.from_pretrained`` loads like SD3's ``tokenizer_3``."""
    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), *[("\u2581" + w, -1.0) for w in words],
              *[(c, -5.0) for c in "abcdefghijklmnopqrstuvwxyz"]]
    backend = Tokenizer(models.Unigram(pieces, unk_id=2))
    backend.pre_tokenizer = pre_tokenizers.Metaspace()
    tokenizer = T5TokenizerFast(tokenizer_object=backend, eos_token="</s>", unk_token="<unk>", pad_token="<pad>", extra_ids=0)
    tokenizer.save_pretrained(str(directory))
    return Path(directory)


def _build_text_encoder(section: Mapping[str, Any], tokenizer: CLIPTokenizer, default_class: str) -> nn.Module:
    """A random CLIP text encoder (``class_name``: CLIPTextModel or CLIPTextModelWithProjection) for ``tokenizer``."""
    text_cfg = dict(section)
    cls = TEXT_CLASSES[text_cfg.pop("class_name", default_class)]
    text_cfg["vocab_size"] = max(int(text_cfg.get("vocab_size", 0)), len(tokenizer))
    text_cfg |= {"bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id, "pad_token_id": tokenizer.pad_token_id}
    return cls(CLIPTextConfig(**text_cfg))


def build_random(cfg: DictConfig) -> Components:
    """Randomly initialised components at the sizes in ``cfg.arch`` (tiny* and *_shape presets): ``text_encoder_2``
    adds SDXL's / SD3's second CLIP, ``text_encoder_3`` SD3's T5, ``transformer`` (instead of ``unet``) SD3's
    denoiser."""
    arch = OmegaConf.to_container(cfg.arch, resolve=True)
    tokenizer = _build_tokenizer(cfg.arch)
    parts: dict[str, Any] = {"tokenizer": tokenizer, "text_encoder": _build_text_encoder(arch["text_encoder"], tokenizer, "CLIPTextModel")}
    if arch.get("text_encoder_2"):
        parts["tokenizer_2"] = _build_tokenizer(cfg.arch)
        parts["text_encoder_2"] = _build_text_encoder(arch["text_encoder_2"], parts["tokenizer_2"], "CLIPTextModelWithProjection")
    if arch.get("text_encoder_3"):
        t5_cfg = dict(arch["text_encoder_3"])
        words = t5_cfg.pop("tokenizer_words")
        parts["t5_max_length"] = int(t5_cfg.pop("max_length"))
        with tempfile.TemporaryDirectory(prefix="osediff_t5_tokenizer_") as tmp:
            parts["tokenizer_3"] = T5TokenizerFast.from_pretrained(str(write_tiny_t5_tokenizer(tmp, words)), local_files_only=True)
        t5_cfg["vocab_size"] = max(int(t5_cfg.get("vocab_size", 0)), len(parts["tokenizer_3"]))
        parts["text_encoder_3"] = T5EncoderModel(T5Config(**t5_cfg))
    vae = AutoencoderKL(**arch["vae"])
    if arch.get("transformer"):
        unet = SD3Transformer2DModel(**arch["transformer"])
    else:
        unet = UNet2DConditionModel(**arch["unet"])
    scheduler_cfg = dict(arch["scheduler"])
    scheduler = scheduler_class(scheduler_cfg.pop("class_name", "DDPMScheduler"), "model.arch.scheduler.class_name")
    with torch.device("cpu"):  # its tables hold values even when the networks are built on the meta device
        scheduler = scheduler.from_config(scheduler_cfg)
    return Components(vae=vae, unet=unet, scheduler=scheduler, **parts)


def scheduler_class(name: str, source: str) -> type[SchedulerMixin]:
    """The diffusers scheduler class called ``name`` (as a ``scheduler_config.json`` names it)."""
    cls = getattr(diffusers, str(name), None)
    if not (isinstance(cls, type) and issubclass(cls, SchedulerMixin)):
        raise ConfigError(f"{source}: '{name}' is not a diffusers scheduler class (e.g. DDPMScheduler, EulerDiscreteScheduler)")
    return cls


def load_scheduler(path: str | Path) -> SchedulerMixin:
    """The folder's scheduler, built by the class its ``scheduler/scheduler_config.json`` names, offline."""
    config_file = Path(path) / SCHEDULER_CONFIG
    try:
        name = json.loads(config_file.read_text()).get("_class_name", "DDPMScheduler")
    except (OSError, json.JSONDecodeError) as exc:
        raise MissingWeightsError(f"{config_file} is missing or unreadable ({exc}); the scheduler folder needs it") from exc
    return scheduler_class(name, str(config_file)).from_pretrained(str(path), subfolder="scheduler", local_files_only=True)


def folder_family(path: Path) -> str:
    """The family a diffusers folder holds: 'sd3' with a transformer/, 'sdxl' with text_encoder_2/, else 'sd'."""
    if (path / "transformer").is_dir():
        return "sd3"
    return "sdxl" if (path / "text_encoder_2").is_dir() else "sd"


def resolve_pretrained_path(cfg: DictConfig) -> Path:
    """The local diffusers directory for a pretrained preset, checked before any work (its family's subfolders)."""
    raw = cfg.get("pretrained_path")
    env = cfg.get("pretrained_env", "OSEDIFF_SD21_BASE")
    group = cfg.name if cfg.name in BASE_MODELS else "sd21_base"
    what = f"{BASE_MODELS[group]} directory"
    if not raw:
        raise MissingWeightsError(
            f"model '{cfg.name}' needs local weights but no path is set: set model.pretrained_path=... or the "
            f"environment variable {env} to a diffusers-format {what} "
            f"(subfolders {', '.join(FOLDERS[BASE_FAMILIES.get(group, 'sd')])}). "
            "To try the framework without weights use model=tiny data=demo."
        )
    path = Path(os.path.expanduser(str(raw)))
    missing = [sub for sub in FOLDERS[folder_family(path)] if not (path / sub).is_dir()]
    if not missing and not (path / SCHEDULER_CONFIG).is_file():
        missing = [SCHEDULER_CONFIG]  # names the scheduler class and prediction type the model was trained with
    if missing:
        raise MissingWeightsError(
            f"model '{cfg.name}': {path} is missing {', '.join(str(path / m) for m in missing)}. "
            f"Point model.pretrained_path (or {env}) at a diffusers-format {what}, e.g. one "
            f"downloaded with `python -m osediff_lab.weights fetch {group}` on a connected machine. "
            f"To try the framework without weights use model=tiny data=demo."
        )
    return path


def compatibility_problems(c: Components) -> list[str]:
    """Why these components cannot run OSEDiff's one-step formula, if they cannot: the schedule must match the
    denoiser (epsilon / v_prediction for UNets, rectified flow for SD3's transformer), the VAE's latent channels
    its input, and the text encoders' widths its conditioning inputs."""
    family, unet, problems = c.family, c.unet.config, []
    try:
        schedule = schedule_from_scheduler(c.scheduler)
    except ConfigError as exc:
        return [str(exc)]
    if isinstance(schedule, FlowMatchSchedule) != (family == "sd3"):
        problems.append(f"{type(c.scheduler).__name__} does not fit a {type(c.unet).__name__}: SD3's transformer "
                        "trains by rectified flow (FlowMatchEulerDiscreteScheduler), UNets by epsilon or v_prediction")
    latent = c.vae.config.latent_channels
    if latent != unet.in_channels or latent != unet.out_channels:
        problems.append(f"VAE latent channels {latent} != denoiser in/out channels {unet.in_channels}/{unet.out_channels}")
    widths = [int(m.config.hidden_size) for m in (c.text_encoder, c.text_encoder_2) if m is not None]
    if family == "sd" and unet.cross_attention_dim != widths[0]:
        problems.append(f"UNet cross_attention_dim {unet.cross_attention_dim} != text encoder width {widths[0]}")
    if family in ("sdxl", "sd3") and len(widths) != 2:
        problems.append(f"a {family} base needs text_encoder_2 (a CLIPTextModelWithProjection)")
        return problems
    if family == "sdxl":
        pooled = int(c.text_encoder_2.config.projection_dim)
        if unet.cross_attention_dim != sum(widths):
            problems.append(f"UNet cross_attention_dim {unet.cross_attention_dim} != the two text encoders' widths {widths}")
        if unet.projection_class_embeddings_input_dim != 6 * unet.addition_time_embed_dim + pooled:
            problems.append(f"UNet projection_class_embeddings_input_dim {unet.projection_class_embeddings_input_dim} != "
                            f"6 time ids x {unet.addition_time_embed_dim} + pooled width {pooled}")
    if family == "sd3":
        pooled = sum(int(m.config.projection_dim) for m in (c.text_encoder, c.text_encoder_2))
        if sum(widths) > unet.joint_attention_dim:
            problems.append(f"CLIP widths {widths} exceed the transformer's joint_attention_dim {unet.joint_attention_dim}")
        if unet.pooled_projection_dim != pooled:
            problems.append(f"transformer pooled_projection_dim {unet.pooled_projection_dim} != CLIP projections' sum {pooled}")
        if c.text_encoder_3 is not None and c.text_encoder_3.config.d_model != unet.joint_attention_dim:
            problems.append(f"T5 width {c.text_encoder_3.config.d_model} != joint_attention_dim {unet.joint_attention_dim}")
    return problems


def check_compatible(components: Components, source: str) -> None:
    """Reject base models that would silently break OSEDiff's one-step x0 formula, latent layout or conditioning."""
    problems = compatibility_problems(components)
    if problems:
        raise ConfigError(f"{source}: " + "; ".join(problems))


def load_pretrained(path: str | Path, load_t5: bool = True, t5_max_length: int = 256) -> Components:
    """Load every component of a local diffusers-format directory of any family, offline (SD3's T5 only with
    ``load_t5`` and when the folder has it)."""
    folder, path = Path(path), str(path)
    kw = {"local_files_only": True}
    family = folder_family(folder)
    parts: dict[str, Any] = {"tokenizer": CLIPTokenizer.from_pretrained(path, subfolder="tokenizer", **kw)}
    first = CLIPTextModelWithProjection if family == "sd3" else CLIPTextModel
    parts["text_encoder"] = first.from_pretrained(path, subfolder="text_encoder", **kw)
    if family != "sd":
        parts["tokenizer_2"] = CLIPTokenizer.from_pretrained(path, subfolder="tokenizer_2", **kw)
        parts["text_encoder_2"] = CLIPTextModelWithProjection.from_pretrained(path, subfolder="text_encoder_2", **kw)
    if family == "sd3" and load_t5 and (folder / "text_encoder_3").is_dir():
        parts["tokenizer_3"] = T5TokenizerFast.from_pretrained(path, subfolder="tokenizer_3", **kw)
        parts["text_encoder_3"] = T5EncoderModel.from_pretrained(path, subfolder="text_encoder_3", **kw)
    denoiser = SD3Transformer2DModel if family == "sd3" else UNet2DConditionModel
    components = Components(
        vae=AutoencoderKL.from_pretrained(path, subfolder="vae", **kw),
        unet=denoiser.from_pretrained(path, subfolder="transformer" if family == "sd3" else "unet", **kw),
        scheduler=load_scheduler(path), t5_max_length=t5_max_length, **parts,
    )
    check_compatible(components, path)
    return components


def random_components(name: str, arch: Mapping[str, Any]) -> Components:
    """Randomly initialised components at the sizes in ``arch`` (model=tiny, sd21_shape), checked for OSEDiff."""
    components = build_random(OmegaConf.create({"arch": arch}))
    check_compatible(components, f"model '{name}'")
    return components


def pretrained_problems(args: Mapping[str, Any]) -> list[str]:
    """The pretrained preset's directory on disk, with every subfolder (the message names the key and the fix)."""
    try:
        resolve_pretrained_path(OmegaConf.create(dict(args)))
    except MissingWeightsError as exc:
        return [str(exc)]
    return []


@checked_by(pretrained_problems)
def pretrained_components(name: str, pretrained_path: str | None, pretrained_env: str = "OSEDIFF_SD21_BASE",
                          load_t5: bool = True, t5_max_length: int = 256) -> Components:
    """The components of a local diffusers-format directory (model=nano, sd21_base, sd_turbo, sdxl_base,
    sd3_medium), loaded offline; ``load_t5=false`` leaves SD3's T5 (the memory hog) out, as diffusers allows."""
    spec = OmegaConf.create({"name": name, "pretrained_path": pretrained_path, "pretrained_env": pretrained_env})
    return load_pretrained(resolve_pretrained_path(spec), load_t5, t5_max_length)


CALLER_SETTINGS = ("source",)  # read by the memory predictor and the sidecar; no constructor takes it


def build_components(cfg: DictConfig) -> Components:
    """Frozen components for a model preset, built by ``cfg._target_`` (``model=tiny|nano|sd21_base|sd21_shape|...``);
    a config saved without ``_target_`` (LoRA sidecars of earlier runs) builds by its ``source``."""
    if "_target_" in cfg:
        return frozen(build(cfg, "model", skip=CALLER_SETTINGS, name=cfg.get("name", "model")))
    if cfg.get("source") == "random":
        return frozen(random_components(cfg.name, cfg.arch))
    if cfg.get("source") == "pretrained":
        return frozen(pretrained_components(cfg.name, cfg.get("pretrained_path"), cfg.get("pretrained_env", "OSEDIFF_SD21_BASE")))
    raise ConfigError(f"model.source must be 'random' or 'pretrained', got '{cfg.get('source')}'")


def frozen(components: Components) -> Components:
    """The components with text encoder, VAE and UNet frozen and in eval mode (adapters add what trains)."""
    for module in (*components.text_modules(), components.vae, components.unet):
        module.requires_grad_(False)
        module.eval()
    return components


def save_pretrained(components: Components, path: str | Path) -> Path:
    """Write components as a diffusers-format directory (what ``load_pretrained`` reads)."""
    path = Path(path)
    for suffix in ("", "_2", "_3"):
        tokenizer, encoder = getattr(components, f"tokenizer{suffix}"), getattr(components, f"text_encoder{suffix}")
        if encoder is not None:
            tokenizer.save_pretrained(path / f"tokenizer{suffix}")
            encoder.save_pretrained(path / f"text_encoder{suffix}")
    components.vae.save_pretrained(path / "vae")
    components.unet.save_pretrained(path / ("transformer" if components.family == "sd3" else "unet"))
    components.scheduler.save_pretrained(path / "scheduler")
    return path
