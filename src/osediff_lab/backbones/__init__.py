"""Base-model families, one file each, behind one interface (``base.Backbone``): ``sd`` (SD2.1, SD-Turbo;
sd.py), ``sdxl`` (sdxl.py), ``sd3`` (sd3.py) and ``flux`` (FLUX.1-dev, -schnell; flux.py). Nothing outside this package asks which family a model is.

Module map: ``base`` (the interface, ``Components``, folder-file and release records), ``embeds``
(``TextEmbeds``), ``text`` (``TextEncoders``, the prompt-encoding module a backbone subclasses), ``parts``
(loading and random building of a diffusers folder's parts for any backbone), and this module: the registry
lookups. A config names its backbone as ``model.backbone``: a registered name (``sd3``), an importable class
path, or ``{_target_: <class path>, <options>}``; options may also sit beside it as ``model.<option>``.
Without one, the folder (pretrained) or ``model.arch`` (random) is recognised. A denoiser built from
``Components`` carries its backbone; any other is recognised by class.
"""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from torch import nn

from osediff_lab.backbones import sd, sd3, sdxl  # noqa: F401  (the built-in families register themselves)

# isort: split
from osediff_lab.backbones import flux  # noqa: F401  (registered after sd: recognisers run latest first, SD's denoiser rule is the fallback)
from osediff_lab.backbones.base import REGISTRY, Backbone, Release
from osediff_lab.backbones.components import TAG, Components
from osediff_lab.backbones.embeds import TextEmbeds, as_embeds
from osediff_lab.errors import ConfigError

__all__ = ["DEFAULT", "REGISTRY", "Backbone", "Components", "Release", "TextEmbeds", "as_embeds", "backbone_of", "family_of",
           "make_backbone", "recognise_arch", "recognise_folder", "releases", "spec_problems"]
DEFAULT = "sd"  # what an unrecognisable folder is reported against


def _class_at(path: str) -> Any:
    module, _, attr = path.rpartition(".")
    try:
        return getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError, ValueError) as exc:
        raise ConfigError(f"'{path}' is not importable ({exc})") from None


def _named(spec: Any, options: Mapping[str, Any], key: str) -> tuple[type[Backbone], dict[str, Any]]:
    """The class ``spec`` names and every option: ``spec``'s own (a mapping's keys besides ``_target_``) and
    ``options`` (the keys beside ``key``), never the same option twice."""
    inner: dict[str, Any] = {}
    if isinstance(spec, Mapping):
        inner = {k: v for k, v in spec.items() if k != "_target_"}
        if "_target_" not in spec:
            raise ConfigError(f"{key} has no _target_: name a registered backbone ({sorted(REGISTRY)}) or a Backbone class")
        spec = spec["_target_"]
    twice = sorted(set(inner) & set(options))
    if twice:
        raise ConfigError(f"{key}.{twice[0]} is also set beside it; set each backbone option once")
    if spec in REGISTRY:
        return REGISTRY[spec], {**inner, **options}
    if "." not in str(spec):
        raise ConfigError(f"{key}='{spec}' is neither a registered backbone {sorted(REGISTRY)} nor a class path")
    try:
        cls = _class_at(str(spec))
    except ConfigError as exc:
        raise ConfigError(f"{key}: {exc}") from None
    if not (isinstance(cls, type) and issubclass(cls, Backbone)):
        raise ConfigError(f"{key}={spec} is not a Backbone subclass (osediff_lab.backbones.Backbone)")
    return cls, {**inner, **options}


def _option_problems(cls: type[Backbone], options: Mapping[str, Any], prefix: str) -> list[str]:
    taken = [n for n, p in inspect.signature(cls).parameters.items() if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
    return [f"{prefix}.{k} is not an argument of {cls.__qualname__} (it takes {sorted(taken)})" for k in options if k not in taken]


def spec_problems(spec: Any, options: Mapping[str, Any], prefix: str = "model") -> list[str]:
    """Every problem with a backbone named by ``spec`` (None: recognised later) and its ``options``."""
    if spec is None:
        return [f"{prefix}.{k} is a backbone option but {prefix}.backbone is not set" for k in options]
    try:
        cls, merged = _named(spec, options, f"{prefix}.backbone")
    except ConfigError as exc:
        return [str(exc)]
    return _option_problems(cls, merged, prefix)


def make_backbone(spec: Any, options: Mapping[str, Any] | None = None, prefix: str = "model") -> Backbone:
    """The backbone ``spec`` names (a registered name, a class path, or a mapping with ``_target_``) built with
    its options; a ConfigError names a bad key."""
    options = dict(options or {})
    problems = spec_problems(spec, options, prefix)
    if problems:
        raise ConfigError("; ".join(problems))
    cls, merged = _named(spec, options, f"{prefix}.backbone")
    return cls(**merged)


def _recognisers(*rules: str) -> Iterator[type[Backbone]]:
    """Registered classes that define one of ``rules`` themselves, the latest registered first (a variant that
    inherits its parent's rule does not claim the parent's models)."""
    for cls in reversed(REGISTRY.values()):
        if any(rule in vars(cls) for rule in rules):
            yield cls


def recognise_folder(path: Path) -> type[Backbone] | None:
    """The family of the diffusers folder at ``path`` (None when no registered backbone recognises it)."""
    return next((cls for cls in _recognisers("recognises", "recognises_folder") if cls.recognises_folder(path)), None)


def recognise_arch(arch: Mapping[str, Any]) -> type[Backbone] | None:
    """The family of a random twin's ``model.arch`` (configs saved before ``model.backbone``)."""
    return next((cls for cls in _recognisers("recognises", "recognises_arch") if cls.recognises_arch(arch)), None)


def backbone_of(net: nn.Module) -> Backbone:
    """The backbone a denoiser was built by (``Components`` attach it), else the family that recognises its class."""
    attached = getattr(net, TAG, None)
    if attached is not None:
        return attached
    cls = next((c for c in _recognisers("recognises_denoiser") if c.recognises_denoiser(net)), REGISTRY[DEFAULT])
    return cls()


def family_of(net: nn.Module) -> str:
    """The registered name of ``net``'s backbone."""
    return backbone_of(net).name


def releases() -> Iterator[tuple[type[Backbone], Release]]:
    """Every published base model of every registered backbone, in registration order."""
    for cls in REGISTRY.values():
        for release in cls.releases:
            yield cls, release
