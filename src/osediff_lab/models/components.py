"""Build or load the Stable Diffusion components OSEDiff needs, per model preset.

Every preset goes through the same classes (CLIPTokenizer, CLIPTextModel, AutoencoderKL,
UNet2DConditionModel and a diffusers scheduler): ``tiny`` and ``sd21_shape`` build them from config with
random weights, ``sd21_base`` and ``sd_turbo`` load a local diffusers-format directory (never the network).
The scheduler's class comes from the preset (``arch.scheduler.class_name``, DDPMScheduler if unset) or from
the folder's ``scheduler/scheduler_config.json`` (``_class_name``), so its prediction type is the model's own.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import diffusers
from diffusers import AutoencoderKL, SchedulerMixin, UNet2DConditionModel
from omegaconf import DictConfig, OmegaConf
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from osediff_lab.build import build, checked_by
from osediff_lab.errors import ConfigError, MissingWeightsError
from osediff_lab.models.schedules import FlowMatchSchedule, schedule_from_scheduler
from osediff_lab.weights.manifest import BASE_MODELS

SUBFOLDERS = ("tokenizer", "text_encoder", "vae", "unet", "scheduler")
SCHEDULER_CONFIG = "scheduler/scheduler_config.json"


@dataclass
class Components:
    """The frozen-at-load parts of Stable Diffusion that the generator and regularizer share."""

    tokenizer: CLIPTokenizer
    text_encoder: CLIPTextModel
    vae: AutoencoderKL
    unet: UNet2DConditionModel
    scheduler: SchedulerMixin

    @property
    def scaling_factor(self) -> float:
        return float(self.vae.config.scaling_factor)


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


def build_random(cfg: DictConfig) -> Components:
    """Randomly initialised components at the sizes in ``cfg.arch`` (tiny and sd21_shape presets)."""
    arch = cfg.arch
    tokenizer = _build_tokenizer(arch)
    text_cfg = OmegaConf.to_container(arch.text_encoder, resolve=True)
    text_cfg["vocab_size"] = max(int(text_cfg.get("vocab_size", 0)), len(tokenizer))
    text_cfg |= {"bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id, "pad_token_id": tokenizer.pad_token_id}
    text_encoder = CLIPTextModel(CLIPTextConfig(**text_cfg))
    vae = AutoencoderKL(**OmegaConf.to_container(arch.vae, resolve=True))
    unet = UNet2DConditionModel(**OmegaConf.to_container(arch.unet, resolve=True))
    scheduler_cfg = OmegaConf.to_container(arch.scheduler, resolve=True)
    scheduler = scheduler_class(scheduler_cfg.pop("class_name", "DDPMScheduler"), "model.arch.scheduler.class_name")
    scheduler = scheduler.from_config(scheduler_cfg)
    return Components(tokenizer, text_encoder, vae, unet, scheduler)


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


def resolve_pretrained_path(cfg: DictConfig) -> Path:
    """The local diffusers directory for a pretrained preset, checked before any work."""
    raw = cfg.get("pretrained_path")
    env = cfg.get("pretrained_env", "OSEDIFF_SD21_BASE")
    group = cfg.name if cfg.name in BASE_MODELS else "sd21_base"
    what = f"{BASE_MODELS[group]} directory"
    if not raw:
        raise MissingWeightsError(
            f"model '{cfg.name}' needs local weights but no path is set: set model.pretrained_path=... or the "
            f"environment variable {env} to a diffusers-format {what} "
            f"(subfolders {', '.join(SUBFOLDERS)}). To try the framework without weights use model=tiny data=demo."
        )
    path = Path(os.path.expanduser(str(raw)))
    missing = [sub for sub in SUBFOLDERS if not (path / sub).is_dir()]
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


def check_compatible(components: Components, source: str) -> None:
    """Reject base models that would silently break OSEDiff's one-step x0 formula or latent layout: the
    scheduler must have a noise schedule (epsilon or v_prediction; rectified flow needs a transformer backbone,
    which this UNet2DConditionModel path does not build yet)."""
    try:
        schedule = schedule_from_scheduler(components.scheduler)
    except ConfigError as exc:
        raise ConfigError(f"{source}: {exc}") from exc
    if isinstance(schedule, FlowMatchSchedule):
        raise ConfigError(
            f"{source}: {type(components.scheduler).__name__} is rectified flow (SD3-style); the UNet2DConditionModel "
            "backbone here supports epsilon and v_prediction schedulers only"
        )
    latent = components.vae.config.latent_channels
    if latent != 4 or components.unet.config.in_channels != 4:
        raise ConfigError(
            f"{source}: VAE latent channels {latent} / UNet in_channels {components.unet.config.in_channels}; "
            "OSEDiff needs 4-channel latents"
        )
    te_dim = components.text_encoder.config.hidden_size
    if components.unet.config.cross_attention_dim != te_dim:
        raise ConfigError(
            f"{source}: UNet cross_attention_dim {components.unet.config.cross_attention_dim} != text encoder width {te_dim}"
        )


def load_pretrained(path: str | Path) -> Components:
    """Load every component from a local diffusers-format directory, offline."""
    path = str(path)
    kw = {"local_files_only": True}
    components = Components(
        tokenizer=CLIPTokenizer.from_pretrained(path, subfolder="tokenizer", **kw),
        text_encoder=CLIPTextModel.from_pretrained(path, subfolder="text_encoder", **kw),
        vae=AutoencoderKL.from_pretrained(path, subfolder="vae", **kw),
        unet=UNet2DConditionModel.from_pretrained(path, subfolder="unet", **kw),
        scheduler=load_scheduler(path),
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
def pretrained_components(name: str, pretrained_path: str | None, pretrained_env: str = "OSEDIFF_SD21_BASE") -> Components:
    """The components of a local diffusers-format directory (model=nano, sd21_base, sd_turbo), loaded offline."""
    spec = OmegaConf.create({"name": name, "pretrained_path": pretrained_path, "pretrained_env": pretrained_env})
    return load_pretrained(resolve_pretrained_path(spec))


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
    for module in (components.text_encoder, components.vae, components.unet):
        module.requires_grad_(False)
        module.eval()
    return components


def save_pretrained(components: Components, path: str | Path) -> Path:
    """Write components as a diffusers-format directory (what ``load_pretrained`` reads)."""
    path = Path(path)
    components.tokenizer.save_pretrained(path / "tokenizer")
    components.text_encoder.save_pretrained(path / "text_encoder")
    components.vae.save_pretrained(path / "vae")
    components.unet.save_pretrained(path / "unet")
    components.scheduler.save_pretrained(path / "scheduler")
    return path
