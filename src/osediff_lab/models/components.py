"""Build or load the Stable Diffusion components OSEDiff needs, per model preset.

Every preset goes through the same classes (CLIPTokenizer, CLIPTextModel, AutoencoderKL,
UNet2DConditionModel, DDPMScheduler): ``tiny`` and ``sd21_shape`` build them from config with
random weights, ``sd21_base`` loads a local diffusers-format directory (never the network).
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
from omegaconf import DictConfig, OmegaConf
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from osediff_lab.build import build, checked_by
from osediff_lab.errors import ConfigError, MissingWeightsError

SUBFOLDERS = ("tokenizer", "text_encoder", "vae", "unet", "scheduler")


@dataclass
class Components:
    """The frozen-at-load parts of Stable Diffusion that the generator and regularizer share."""

    tokenizer: CLIPTokenizer
    text_encoder: CLIPTextModel
    vae: AutoencoderKL
    unet: UNet2DConditionModel
    scheduler: DDPMScheduler

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
    scheduler = DDPMScheduler.from_config(OmegaConf.to_container(arch.scheduler, resolve=True))
    return Components(tokenizer, text_encoder, vae, unet, scheduler)


def resolve_pretrained_path(cfg: DictConfig) -> Path:
    """The local diffusers directory for a pretrained preset, checked before any work."""
    raw = cfg.get("pretrained_path")
    env = cfg.get("pretrained_env", "OSEDIFF_SD21_BASE")
    if not raw:
        raise MissingWeightsError(
            f"model '{cfg.name}' needs local weights but no path is set: set model.pretrained_path=... or the "
            f"environment variable {env} to a diffusers-format SD2.1-base directory "
            f"(subfolders {', '.join(SUBFOLDERS)}). To try the framework without weights use model=tiny data=demo."
        )
    path = Path(os.path.expanduser(str(raw)))
    missing = [sub for sub in SUBFOLDERS if not (path / sub).is_dir()]
    if missing:
        raise MissingWeightsError(
            f"model '{cfg.name}': {path} is missing {', '.join(str(path / m) for m in missing)}. "
            f"Point model.pretrained_path (or {env}) at a diffusers-format SD2.1-base directory, e.g. one "
            f"downloaded with `python -m osediff_lab.weights fetch sd21_base` on a connected machine. "
            f"To try the framework without weights use model=tiny data=demo."
        )
    return path


def check_compatible(components: Components, source: str) -> None:
    """Reject base models that would silently break OSEDiff's one-step x0 formula or latent layout."""
    pred = components.scheduler.config.prediction_type
    if pred != "epsilon":
        raise ConfigError(f"{source}: scheduler prediction_type is '{pred}'; OSEDiff needs an epsilon-prediction model")
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
        scheduler=DDPMScheduler.from_pretrained(path, subfolder="scheduler", **kw),
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
    """The components of a local diffusers-format directory (model=nano, sd21_base), loaded offline."""
    spec = OmegaConf.create({"name": name, "pretrained_path": pretrained_path, "pretrained_env": pretrained_env})
    return load_pretrained(resolve_pretrained_path(spec))


CALLER_SETTINGS = ("source",)  # read by the memory predictor and the sidecar; no constructor takes it


def build_components(cfg: DictConfig) -> Components:
    """Frozen components for a model preset, built by ``cfg._target_`` (``model=tiny|nano|sd21_base|sd21_shape``);
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
