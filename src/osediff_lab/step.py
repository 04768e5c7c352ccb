"""The optimisation step in plain torch, the same for every method and precision: backward with loss scaling,
gradient accumulation, per-group gradient averaging over DDP ranks, unscale, clipping, the non-finite skip
decided on the device, and the update. The LightningModule, the memory predictor and the benchmarks use it.

A method hands the loop named parameter groups (``ParamGroup``), each with its own optimiser settings; the
``generator`` group comes first and is stepped once per generator step, every other group ``updates`` times.
"""

from __future__ import annotations

import contextlib
import math
import warnings
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from hydra.utils import get_object
from torch import nn

GENERATOR = "generator"
SETTING_KEYS = ("lr", "betas", "weight_decay", "eps", "updates", "sync_grads")


@dataclass(frozen=True)
class GroupSettings:
    """One parameter group's optimiser settings (a method's ``method.optim.<group>``)."""

    lr: float
    betas: tuple[float, float] = (0.9, 0.999)
    weight_decay: float = 0.01
    eps: float = 1e-8
    updates: int = 1  # optimiser updates per generator step (the generator's own is always 1)
    sync_grads: bool = True  # average the gradients over DDP ranks before the update

    @classmethod
    def from_config(cls, values: Mapping[str, Any]) -> GroupSettings:
        """From a config mapping (unknown keys are the config check's to report)."""
        known = {k: values[k] for k in SETTING_KEYS if k in values and values[k] is not None}
        if "betas" in known:
            known["betas"] = tuple(float(b) for b in known["betas"])
        return cls(**known)


@dataclass
class ParamGroup:
    """A named set of trained tensors with its optimiser settings."""

    params: list[nn.Parameter]
    settings: GroupSettings


def settings_problems(name: str, values: Mapping[str, Any], key: str) -> list[str]:
    """Problems with one group's settings (``key``: where they live in the config), found before anything is built."""
    problems = [f"{key}.{k} is not a parameter-group setting (known: {list(SETTING_KEYS)})" for k in values if k not in SETTING_KEYS]
    if "lr" not in values or values["lr"] is None or not float(values["lr"]) > 0:
        problems.append(f"{key}.lr={values.get('lr')} must be > 0")
    betas = values.get("betas", (0.9, 0.999))
    if len(betas) != 2 or not all(0 <= float(b) < 1 for b in betas):
        problems.append(f"{key}.betas={list(betas)} must be two numbers in [0, 1)")
    if float(values.get("weight_decay", 0.0)) < 0:
        problems.append(f"{key}.weight_decay={values['weight_decay']} must be >= 0")
    if not float(values.get("eps", 1e-8)) > 0:
        problems.append(f"{key}.eps={values['eps']} must be > 0")
    updates = int(values.get("updates", 1))
    if updates < 1 or (name == GENERATOR and updates != 1):
        problems.append(f"{key}.updates={updates}: " + ("the generator is stepped once per generator step (1)"
                                                         if name == GENERATOR else "must be >= 1"))
    return problems


def build_optimizer(
    group: ParamGroup, optimizer: Mapping[str, Any], use_8bit: bool = False, fused: bool = True
) -> torch.optim.Optimizer:
    """The optimiser of one group: ``optimizer._target_`` (default AdamW; bitsandbytes' AdamW8bit with
    ``use_8bit``) with the group's lr, betas, weight decay and eps, and ``optimizer``'s other keys.

    ``fused``: torch's fused kernel, which also skips a non-finite step on the device. Not for a group listing a
    tensor twice (``optim.conv_in_lora_twice``): one fused launch reads that tensor's moments once for both
    entries, where the release's AdamW steps it twice in a row."""
    extra = {k: v for k, v in optimizer.items() if k != "_target_"}
    if use_8bit:
        import bitsandbytes as bnb

        cls = bnb.optim.AdamW8bit
    else:
        cls = get_object(str(optimizer.get("_target_", "torch.optim.AdamW")))
        if cls in (torch.optim.AdamW, torch.optim.Adam):
            extra.setdefault("fused", fused and len({id(p) for p in group.params}) == len(group.params))
    s = group.settings
    with warnings.catch_warnings():  # optim.conv_in_lora_twice lists tensors twice on purpose
        warnings.filterwarnings("ignore", message="optimizer contains a parameter group with duplicate parameters")
        return cls(group.params, lr=s.lr, betas=s.betas, weight_decay=s.weight_decay, eps=s.eps, **extra)


@dataclass
class Stepper:
    """Steps named parameter groups: ``backward`` once per micro-batch and group update, ``step`` at the last
    micro-batch of each accumulated step. ``scaler``: fp16's GradScaler, or one held at scale 1 (fp32/bf16 get
    the same fused finiteness check and on-device skip). ``no_sync``: a context keeping DDP's reducer out of
    backward (each group averages its own gradients instead)."""

    groups: dict[str, ParamGroup]
    optimizers: dict[str, torch.optim.Optimizer]
    scaler: torch.amp.GradScaler
    grad_clip: float | None
    accumulate: int = 1
    unit_scale: bool = False  # the scaler is held at 1 (fp32/bf16)
    no_sync: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext
    watch: dict[str, list[nn.Parameter]] = field(default_factory=dict)  # generator modules: gradient norms measured
    grad_norms: dict[str, torch.Tensor] = field(default_factory=dict)
    module_norms: dict[str, torch.Tensor] = field(default_factory=dict)

    def backward(self, name: str, loss: torch.Tensor, fresh: bool) -> None:
        """Add ``loss``'s gradients (divided by the micro-batches per step, loss-scaled) to group ``name``'s only
        (a generator loss through a discriminator leaves the discriminator's alone), after clearing them when
        ``fresh`` (the first micro-batch of a step). A non-finite loss poisons them, so every rank (after the
        average) skips that step alike."""
        params = self.groups[name].params
        if fresh:
            self.optimizers[name].zero_grad(set_to_none=True)
        with self.no_sync():
            # frozen tensors a group lists (PiSA-SR's release_one_optimizer) get no gradient from backward
            self.scaler.scale(loss / self.accumulate).backward(inputs=[p for p in dict.fromkeys(params) if p.requires_grad])
        poison_if_nonfinite(loss, params)

    def step(self, name: str) -> torch.Tensor:
        """Average over ranks (when the group syncs), unscale, clip, update (skipped on the device when a gradient
        is not finite). Returns 1.0 when skipped, 0.0 otherwise, on the device (never read)."""
        group, optimizer = self.groups[name], self.optimizers[name]
        if group.settings.sync_grads:
            average_gradients(group.params)
        self.scaler.unscale_(optimizer)
        if name == GENERATOR:
            for module, params in self.watch.items():
                grads = [p.grad.detach().float().norm() for p in params if p.grad is not None]
                self.module_norms[module] = torch.stack(grads).norm() if grads else torch.zeros(())
        norm = clip_gradients(optimizer, self.grad_clip).detach()
        self.grad_norms[name] = norm
        self.scaler.step(optimizer)
        self.scaler.update(new_scale=1.0 if self.unit_scale else None)
        return (~torch.isfinite(norm)).float()  # the norm is finite iff every gradient is


def poison_if_nonfinite(loss: torch.Tensor, params: list[nn.Parameter]) -> None:
    """Make the gradients non-finite when ``loss`` is, without a host sync: a NaN loss whose graph happens
    to give finite gradients must still skip the step, on every rank alike."""
    target = next((p for p in params if p.grad is not None), params[0])
    if target.grad is None:
        target.grad = torch.zeros_like(target)
    target.grad.add_(torch.where(torch.isfinite(loss.detach()), 0.0, float("nan")).to(target.grad.dtype))


def clip_gradients(optimizer: torch.optim.Optimizer, clip: float | None) -> torch.Tensor:
    """Clip the optimiser's gradients to norm ``clip`` (none: measure only) and return the total norm (a
    tensor, not read here): finite exactly when every gradient is, so it also flags a skipped step."""
    params = [p for g in optimizer.param_groups for p in g["params"]]
    return torch.nn.utils.clip_grad_norm_(params, clip if clip and clip > 0 else math.inf)


def average_gradients(params: list[nn.Parameter]) -> None:
    """Replace each gradient by its mean over ranks with one flat all-reduce (a gradient missing on some ranks
    counts as 0 there; one missing on every rank stays None, so the optimiser leaves that tensor alone).

    DDP's own reducer expects every parameter to get a gradient from every backward, which alternating
    generator/regularizer steps never satisfy (the public release needed find_unused_parameters=True, a
    full graph walk per step); this syncs exactly the set an optimiser is about to step.
    """
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return
    world = torch.distributed.get_world_size()
    if world == 1:
        return
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    present = torch.tensor([float(p.grad is not None) for p in params], device=grads[0].device)
    flat = torch.cat([g.reshape(-1).float() for g in grads] + [present])
    torch.distributed.all_reduce(flat)
    flat /= world
    anywhere = flat[-len(params):] > 0  # read only for tensors without a gradient here (rare: frozen sets)
    offset = 0
    for i, p in enumerate(params):
        n = p.numel()
        if p.grad is not None or bool(anywhere[i]):
            p.grad = flat[offset : offset + n].view_as(p).to(p.dtype)
        offset += n


def unit_scaler(device: torch.device) -> torch.amp.GradScaler:
    """A GradScaler held at scale 1, its scale tensor already on ``device``."""
    scaler = torch.amp.GradScaler(device.type, init_scale=1.0)
    scaler.scale(torch.ones((), device=device))
    return scaler


def further_updates(groups: Mapping[str, ParamGroup]) -> Iterator[str]:
    """The group names to update after the generator's, in order, each as often as its ``updates`` says."""
    for name, group in groups.items():
        if name != GENERATOR:
            yield from [name] * group.settings.updates
