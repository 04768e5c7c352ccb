"""The optimisation mechanics of the training loop as plain functions: optimisers and schedules per
parameter group, the fused clip-and-finiteness check, and the non-finite policy's pieces."""

from __future__ import annotations

import math
import warnings

import torch
from diffusers.optimization import get_scheduler
from torch import nn


class NonFiniteLossError(RuntimeError):
    """Too many consecutive optimiser steps had a non-finite loss or gradient."""


def poison_if_nonfinite(loss: torch.Tensor, params: list[nn.Parameter]) -> None:
    """Make the gradients non-finite when ``loss`` is, without a host sync: a NaN loss whose graph happens
    to give finite gradients must still skip the step, on every rank alike."""
    target = next((p for p in params if p.grad is not None), params[0])
    if target.grad is None:
        target.grad = torch.zeros_like(target)
    target.grad.add_(torch.where(torch.isfinite(loss.detach()), 0.0, float("nan")).to(target.grad.dtype))


def build_optimizers(
    groups: dict[str, list[nn.Parameter]],
    lrs: dict[str, float],
    betas: tuple[float, float],
    weight_decay: float,
    eps: float,
    use_8bit: bool = False,
) -> dict[str, torch.optim.Optimizer]:
    """One AdamW per parameter group at its learning rate (bitsandbytes' AdamW8bit with ``use_8bit``)."""
    if use_8bit:
        import bitsandbytes as bnb

        cls = bnb.optim.AdamW8bit
    else:
        cls = torch.optim.AdamW
    unknown = sorted(set(groups) - set(lrs))
    if unknown:
        raise ValueError(f"no learning rate for parameter groups {unknown} (known: {sorted(lrs)})")
    with warnings.catch_warnings():  # optim.conv_in_lora_twice lists tensors twice on purpose
        warnings.filterwarnings("ignore", message="optimizer contains a parameter group with duplicate parameters")
        return {
            name: cls(params, lr=lrs[name], betas=betas, weight_decay=weight_decay, eps=eps)
            for name, params in groups.items()
        }


def build_schedulers(optimizers: list[torch.optim.Optimizer], name: str, warmup_steps: int, steps: int) -> list:
    """diffusers' learning-rate schedule ``name`` for each optimiser, over ``steps`` generator steps."""
    return [get_scheduler(name, opt, num_warmup_steps=warmup_steps, num_training_steps=max(1, steps)) for opt in optimizers]


def clip_gradients(optimizer: torch.optim.Optimizer, clip: float | None) -> torch.Tensor:
    """Clip the optimiser's gradients to norm ``clip`` (none: measure only) and return the total norm:
    finite exactly when every gradient is, so it doubles as the one fused finiteness check."""
    params = [p for g in optimizer.param_groups for p in g["params"]]
    return torch.nn.utils.clip_grad_norm_(params, clip if clip and clip > 0 else math.inf)


def drop_gradients(optimizer: torch.optim.Optimizer) -> None:
    """Set every gradient of the optimiser to None, so its step leaves the parameters and moments alone."""
    for group in optimizer.param_groups:
        for p in group["params"]:
            p.grad = None
