"""What a training checkpoint holds: the trained (and exported) tensors only, checked on load against the
model it is loaded into, with errors that say which config differs."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

RANK_KEYS = ("unet_rank", "vae_rank", "reg_rank")


def keep_saved(state_dict: Mapping[str, torch.Tensor], saved_names: list[str]) -> dict[str, torch.Tensor]:
    """The entries of ``state_dict`` a checkpoint stores (LoRA sets, conv_in): megabytes, not gigabytes."""
    keep = set(saved_names)
    return {k: v for k, v in state_dict.items() if k in keep}


def check_contents(checkpoint: Mapping[str, Any], saved_names: list[str], params: Mapping[str, torch.Tensor],
                   lora_now: Mapping[str, Any]) -> None:
    """Raise when ``checkpoint`` does not hold exactly ``saved_names`` with the shapes of ``params``; a shape
    difference names the LoRA ranks saved (``generator.lora`` of its config) and ``lora_now``."""
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
        saved = ((checkpoint.get("hyper_parameters") or {}).get("config") or {}).get("generator", {}).get("lora", {})
        ranks = ", ".join(f"{k}={saved.get(k)} (now {lora_now[k]})" for k in RANK_KEYS if k in saved)
        raise RuntimeError(
            f"checkpoint was trained with other LoRA ranks: {len(wrong)} tensors differ in shape (e.g. {wrong[0]}: "
            f"{tuple(state[wrong[0]].shape)} saved, {tuple(params[wrong[0]].shape)} now); "
            f"its generator.lora: {ranks or 'unknown'}. Set the same ranks, or resume=false to start over"
        )
