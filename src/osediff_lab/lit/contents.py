"""What a training checkpoint holds: the trained (and exported) tensors only, checked on load against the
model it is loaded into, with errors that say which config differs."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

SHAPING_SECTIONS = ("generator", "method", "model")  # where the settings that shape trained tensors live


def keep_saved(state_dict: Mapping[str, torch.Tensor], saved_names: list[str]) -> dict[str, torch.Tensor]:
    """The entries of ``state_dict`` a checkpoint stores (LoRA sets, conv_in): megabytes, not gigabytes."""
    keep = set(saved_names)
    return {k: v for k, v in state_dict.items() if k in keep}


def leaf_values(tree: Any, prefix: str = "") -> dict[str, Any]:
    """The leaves of nested mappings as {dotted key: value}."""
    if not isinstance(tree, Mapping):
        return {prefix: tree}
    return {k: v for key, value in tree.items() for k, v in leaf_values(value, f"{prefix}{key}.").items()} if tree else {}


def config_differences(saved: Mapping[str, Any], now: Mapping[str, Any], sections: tuple[str, ...]) -> list[str]:
    """``key=saved (now value)`` for every leaf of ``sections`` that differs between two configs."""
    before = {k: v for s in sections for k, v in leaf_values(saved.get(s) or {}, f"{s}.").items()}
    after = {k: v for s in sections for k, v in leaf_values(now.get(s) or {}, f"{s}.").items()}
    return [f"{k.rstrip('.')}={before.get(k)} (now {after.get(k)})" for k in sorted(set(before) | set(after))
            if before.get(k) != after.get(k)]


def check_contents(checkpoint: Mapping[str, Any], saved_names: list[str], params: Mapping[str, torch.Tensor],
                   config_now: Mapping[str, Any]) -> None:
    """Raise when ``checkpoint`` does not hold exactly ``saved_names`` with the shapes of ``params``; a shape
    difference names the settings of its config's generator, method and model that differ from ``config_now``."""
    state = checkpoint["state_dict"]
    have, want = set(state), set(saved_names)
    missing, unexpected = sorted(want - have), sorted(have - want)
    if missing or unexpected:
        raise RuntimeError(
            f"checkpoint does not match this model: {len(missing)} missing (e.g. {missing[:3]}), "
            f"{len(unexpected)} unexpected (e.g. {unexpected[:3]}); was it trained with another model/generator config?"
        )
    wrong = [k for k in sorted(want) if tuple(state[k].shape) != tuple(params[k].shape)]
    if wrong:
        saved = (checkpoint.get("hyper_parameters") or {}).get("config") or {}
        differ = config_differences(saved, config_now, SHAPING_SECTIONS) if saved else ["unknown (no config saved)"]
        raise RuntimeError(
            f"checkpoint was trained with other LoRA ranks or layers: {len(wrong)} tensors differ in shape (e.g. "
            f"{wrong[0]}: {tuple(state[wrong[0]].shape)} saved, {tuple(params[wrong[0]].shape)} now); its settings "
            f"that differ: {', '.join(differ[:6]) or 'none'}. Set the same, or resume=false to start over"
        )
