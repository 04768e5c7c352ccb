"""Build a config group's component with ``hydra.utils.instantiate``, its arguments checked first.

A group's yaml names the class (or factory function) in ``_target_`` beside that constructor's arguments.
Keys the caller reads itself (``name``, which labels the choice in file names, cache keys and logs, and
group-specific ones such as ``prompt.source``) are left out of the call. A target validates its own
arguments in ``argument_problems(args) -> list[str]`` (a classmethod, or attached to a factory function by
``@checked_by``); ``checks.py`` collects those before anything is built, and ``build`` runs the same check.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterable, Mapping
from typing import Any, TypeVar

from hydra.errors import InstantiationException
from hydra.utils import get_object, instantiate
from omegaconf import DictConfig, OmegaConf

from osediff_lab.errors import USER_ERRORS, ConfigError

F = TypeVar("F", bound=Callable[..., Any])
LABELS = ("name",)  # every group's label of the choice, never a constructor argument
HYDRA_KEYS = ("_target_", "_recursive_", "_convert_", "_partial_", "_args_")


def checked_by(problems: Callable[[Mapping[str, Any]], list[str]]) -> Callable[[F], F]:
    """Attach ``problems`` as the ``argument_problems`` of a factory function (classes define the classmethod)."""

    def attach(fn: F) -> F:
        fn.argument_problems = problems  # type: ignore[attr-defined]
        return fn

    return attach


def arguments(cfg: DictConfig, skip: Iterable[str] = ()) -> dict[str, Any]:
    """The constructor's arguments in ``cfg``, resolved to plain values: every key but Hydra's, the labels, ``skip``
    and those left ``???`` (a required one is then reported missing, a defaulted one takes its default)."""
    left_out = {*HYDRA_KEYS, *LABELS, *skip}
    values = OmegaConf.to_container(cfg, resolve=True).items()
    return {k: v for k, v in values if k not in left_out and not OmegaConf.is_missing(cfg, k)}


def taken(fn: Any, offered: Mapping[str, Any]) -> dict[str, Any]:
    """The ``offered`` arguments that ``fn``'s signature takes (all of them when it takes ``**kwargs``)."""
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):  # builtins without a signature: offer nothing
        return {}
    if any(p.kind is p.VAR_KEYWORD for p in params.values()):
        return dict(offered)
    named = {n for n, p in params.items() if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
    return {k: v for k, v in offered.items() if k in named}


def target(cfg: DictConfig, key: str) -> Any:
    """The class or function named by ``<key>._target_``, or a ConfigError naming that key."""
    name = cfg.get("_target_")
    if not name:
        raise ConfigError(f"{key} has no _target_: name the class that builds it ({key}._target_=package.module.Class)")
    try:
        return get_object(str(name))
    except (ImportError, AttributeError, ValueError) as exc:
        raise ConfigError(f"{key}._target_={name} is not importable ({exc})") from None


def signature_problems(fn: Any, args: Mapping[str, Any], key: str, given: Iterable[str] = ()) -> list[str]:
    """Config keys the constructor does not take, and required parameters neither the config nor the caller gives."""
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):  # builtins without a signature: leave it to the call
        return []
    if any(p.kind is p.VAR_KEYWORD for p in params.values()):
        return []
    named = {n for n, p in params.items() if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
    problems = [f"{key}.{k} is not an argument of {fn.__qualname__} (it takes {sorted(named)})" for k in args if k not in named]
    have = {*args, *given}
    for n, p in params.items():
        if n in named and p.default is p.empty and n not in have:
            problems.append(f"{key}.{n} is missing: {fn.__qualname__} needs it")
    return problems


def component_problems(
    cfg: DictConfig,
    key: str,
    skip: Iterable[str] = (),
    given: Mapping[str, Any] | None = None,
    offer: Mapping[str, Any] | None = None,
) -> list[str]:
    """Every problem with ``cfg`` (the ``key`` group) found without building it: the target, the argument
    names, and the target's own ``argument_problems``. ``given``: the arguments the caller adds when building;
    ``offer``: those it adds only where the target takes them."""
    try:
        fn = target(cfg, key)
    except ConfigError as exc:
        return [str(exc)]
    args, given = arguments(cfg, skip), {**taken(fn, offer or {}), **(given or {})}
    problems = signature_problems(fn, args, key, given)
    check = getattr(fn, "argument_problems", None)
    return problems if problems or check is None else check({**args, **given})


def raise_problems(problems: list[str], what: str) -> None:
    """One ConfigError listing ``problems`` (none: nothing happens)."""
    if problems:
        raise ConfigError(f"{what}:\n  - " + "\n  - ".join(problems))


def build(cfg: DictConfig, key: str, skip: Iterable[str] = (), offer: Mapping[str, Any] | None = None, **kwargs: Any) -> Any:
    """``instantiate`` the ``key`` group's ``cfg`` with ``kwargs`` (and the ``offer`` its target takes) added, after
    its ``component_problems``; a ConfigError or MissingWeightsError raised inside comes out as itself, not wrapped."""
    raise_problems(component_problems(cfg, key, skip, kwargs, offer), f"{key} cannot be built")
    call = {"_target_": cfg._target_, **arguments(cfg, skip)}
    added = {**taken(target(cfg, key), offer or {}), **kwargs}
    try:
        return instantiate(call, **added, _recursive_=False, _convert_="all")
    except InstantiationException as exc:
        if isinstance(exc.__cause__, USER_ERRORS):
            raise exc.__cause__ from None
        raise
