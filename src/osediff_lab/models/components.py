"""Build or load a base model's components per model preset, through its backbone (``osediff_lab.backbones``).

``tiny*`` and ``*_shape`` presets build them from config with random weights (``random_components``);
``nano``, ``sd21_base``, ``sd_turbo``, ``sdxl_base`` and ``sd3_medium`` load a local diffusers-format directory,
never the network (``pretrained_components``). ``model.backbone`` names the family (a registered name, a class
path or ``{_target_: ...}``); every other key beside it that the factory does not take is an option of that
backbone (SD3's ``load_t5``, ``t5_max_length``). Without ``model.backbone`` (configs saved before it) the
folder or ``model.arch`` is recognised. The scheduler's class comes from the preset (``arch.scheduler.class_name``,
DDPMScheduler if unset) or from the folder's ``scheduler/scheduler_config.json``, so its prediction type is the
model's own.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from osediff_lab.backbones import (
    DEFAULT,
    REGISTRY,
    Backbone,
    Components,
    make_backbone,
    recognise_arch,
    recognise_folder,
    releases,
    spec_problems,
)
from osediff_lab.backbones.parts import (
    SCHEDULER_CONFIG,
    write_tiny_tokenizer,  # noqa: F401  (prompts/llava.py builds its tokenizer with it)
)
from osediff_lab.build import build, checked_by
from osediff_lab.errors import ConfigError, MissingWeightsError

PRETRAINED_KEYS = ("name", "pretrained_path", "pretrained_env", "backbone")  # pretrained_components' own
RANDOM_KEYS = ("name", "arch", "backbone")  # random_components' own


def _release_label(name: str, family: type[Backbone]) -> tuple[str, str | None]:
    """What the folder of preset ``name`` holds (its release's label, else the family's first release's, else the
    family) and the weights group that fetches it (None without a release)."""
    named = {r.group: r for _, r in releases()}.get(name) or next(iter(family.releases), None)
    return (named.label, named.group) if named else (f"{family.name} backbone", None)


def resolve_pretrained_path(cfg: DictConfig, backbone: type[Backbone] | None = None) -> Path:
    """The local diffusers directory for a pretrained preset, checked before any work: the subfolders of
    ``backbone`` (default: the family the folder holds), the errors naming the key and the fix."""
    raw = cfg.get("pretrained_path")
    env = cfg.get("pretrained_env", "OSEDIFF_SD21_BASE")
    path = Path(os.path.expanduser(str(raw))) if raw else None
    if backbone is not None:
        family = backbone
    elif path is not None:
        family = recognise_folder(path) or REGISTRY[DEFAULT]
    else:
        family = next((cls for cls, r in releases() if r.group == cfg.name), REGISTRY[DEFAULT])
    label, group = _release_label(str(cfg.name), family)
    fetch = f", e.g. one downloaded with `python -m osediff_lab.weights fetch {group}` on a connected machine" if group else ""
    if path is None:
        raise MissingWeightsError(
            f"model '{cfg.name}' needs local weights but no path is set: set model.pretrained_path=... or the "
            f"environment variable {env} to a diffusers-format {label} directory "
            f"(subfolders {', '.join(family.folders())}). "
            "To try the framework without weights use model=tiny data=demo."
        )
    held = recognise_folder(path)
    if backbone is not None and held is not None and not backbone.recognises_folder(path):
        raise ConfigError(f"model '{cfg.name}': model.backbone={backbone.name} does not fit {path}, which holds a "
                          f"'{held.name}' folder; set model.backbone={held.name}")
    missing = [sub for sub in family.folders() if not (path / sub).is_dir()]
    if not missing and not (path / SCHEDULER_CONFIG).is_file():
        missing = [SCHEDULER_CONFIG]  # names the scheduler class and prediction type the model was trained with
    if missing:
        raise MissingWeightsError(
            f"model '{cfg.name}': {path} is missing {', '.join(str(path / m) for m in missing)}. "
            f"Point model.pretrained_path (or {env}) at a diffusers-format {label} directory{fetch}. "
            f"To try the framework without weights use model=tiny data=demo."
        )
    return path


def check_compatible(components: Components, source: str) -> None:
    """Reject base models that would silently break the one-step x0 formula, latent layout or conditioning
    (``Backbone.compatibility_problems``)."""
    problems = components.backbone.compatibility_problems(components)
    if problems:
        raise ConfigError(f"{source}: " + "; ".join(problems))


def load_pretrained(path: str | Path, backbone: Backbone | None = None) -> Components:
    """Every component of a local diffusers-format directory, offline, by ``backbone`` (default: the family
    the folder holds, with its default options), checked."""
    folder = Path(path)
    if backbone is None:
        family = recognise_folder(folder)
        if family is None:
            raise ConfigError(f"{folder}: no registered backbone ({', '.join(REGISTRY)}) recognises this folder; "
                              "set model.backbone")
        backbone = family()
    components = backbone.load(folder)
    check_compatible(components, str(path))
    return components


def build_random(cfg: DictConfig) -> Components:
    """Randomly initialised components at the sizes in ``cfg.arch`` by ``cfg.backbone`` (default: the family
    the arch describes)."""
    arch = OmegaConf.to_container(cfg.arch, resolve=True)
    spec = cfg.get("backbone")
    return _random_backbone(OmegaConf.to_container(spec) if isinstance(spec, DictConfig) else spec, arch, {}).build_random(arch)


def _random_backbone(spec: Any, arch: Mapping[str, Any], options: Mapping[str, Any]) -> Backbone:
    if spec is not None:
        return make_backbone(spec, options)
    family = recognise_arch(arch)
    if family is None:
        raise ConfigError(f"model.arch ({', '.join(arch)}) is of no registered backbone ({', '.join(REGISTRY)}); set model.backbone")
    return make_backbone(family.name, options)


def random_problems(args: Mapping[str, Any]) -> list[str]:
    """The backbone a random preset names, and its options."""
    return spec_problems(args.get("backbone"), {k: v for k, v in args.items() if k not in RANDOM_KEYS})


@checked_by(random_problems)
def random_components(name: str, arch: Mapping[str, Any], backbone: Any = None, **options: Any) -> Components:
    """Randomly initialised components at the sizes in ``arch`` (model=tiny, sd21_shape, ...) by ``backbone``
    with ``options``, checked."""
    arch = OmegaConf.to_container(arch, resolve=True) if isinstance(arch, DictConfig) else arch
    components = _random_backbone(backbone, arch, options).build_random(arch)
    check_compatible(components, f"model '{name}'")
    return components


def pretrained_problems(args: Mapping[str, Any]) -> list[str]:
    """The backbone and its options, then the preset's directory on disk with every subfolder (each message names
    the key and the fix)."""
    options = {k: v for k, v in args.items() if k not in PRETRAINED_KEYS}
    problems = spec_problems(args.get("backbone"), options)
    if problems:
        return problems
    backbone = make_backbone(args["backbone"], options) if args.get("backbone") is not None else None
    try:
        where = {k: v for k, v in args.items() if k in ("name", "pretrained_path", "pretrained_env")}
        resolve_pretrained_path(OmegaConf.create(where), type(backbone) if backbone else None)
    except (MissingWeightsError, ConfigError) as exc:
        return [str(exc)]
    return []


@checked_by(pretrained_problems)
def pretrained_components(name: str, pretrained_path: str | None, pretrained_env: str = "OSEDIFF_SD21_BASE",
                          backbone: Any = None, **options: Any) -> Components:
    """The components of a local diffusers-format directory (model=nano, sd21_base, sd_turbo, sdxl_base,
    sd3_medium), loaded offline by ``backbone`` with ``options`` (e.g. SD3's ``load_t5=false``, which leaves
    T5 out, as diffusers allows)."""
    spec = OmegaConf.create({"name": name, "pretrained_path": pretrained_path, "pretrained_env": pretrained_env})
    chosen = make_backbone(backbone, options) if backbone is not None or options else None  # options alone: refused
    return load_pretrained(resolve_pretrained_path(spec, type(chosen) if chosen else None), chosen)


CALLER_SETTINGS = ("source",)  # read by the memory predictor and the sidecar; no constructor takes it


def build_components(cfg: DictConfig) -> Components:
    """Frozen components for a model preset, built by ``cfg._target_`` (``model=tiny|nano|sd21_base|sd21_shape|...``);
    a config saved without ``_target_`` (LoRA sidecars of earlier runs) builds by its ``source``."""
    if "_target_" in cfg:
        return frozen(build(cfg, "model", skip=CALLER_SETTINGS, name=cfg.get("name", "model")))
    spec = cfg.get("backbone")
    spec = OmegaConf.to_container(spec) if isinstance(spec, DictConfig) else spec
    if cfg.get("source") == "random":
        return frozen(random_components(cfg.name, cfg.arch, spec))
    if cfg.get("source") == "pretrained":
        return frozen(pretrained_components(cfg.name, cfg.get("pretrained_path"), cfg.get("pretrained_env", "OSEDIFF_SD21_BASE"), spec))
    raise ConfigError(f"model.source must be 'random' or 'pretrained', got '{cfg.get('source')}'")


def frozen(components: Components) -> Components:
    """The components with text encoders, VAE and denoiser frozen and in eval mode (adapters add what trains)."""
    for module in (*components.text_modules(), components.vae, components.denoiser):
        module.requires_grad_(False)
        module.eval()
    return components


def save_pretrained(components: Components, path: str | Path) -> Path:
    """Write components as a diffusers-format directory (what ``load_pretrained`` reads)."""
    path = Path(path)
    for part in components.backbone.text_parts:
        encoder = getattr(components, part.encoder_folder)
        if encoder is not None:
            getattr(components, part.tokenizer_folder).save_pretrained(path / part.tokenizer_folder)
            encoder.save_pretrained(path / part.encoder_folder)
    components.vae.save_pretrained(path / "vae")
    components.denoiser.save_pretrained(path / components.backbone.denoiser_folder)
    components.scheduler.save_pretrained(path / "scheduler")
    return path
