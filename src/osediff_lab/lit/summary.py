"""What a run trains, said once when fitting starts (in place of Lightning's model summary, whose FLOPs are 0
and whose train/eval mode counts say nothing here): the parameters of each optimiser group with its learning
rate, then trained and frozen parameters per module, with the frozen weights' dtypes."""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping

import pytorch_lightning as pl
import torch
from torch import nn

log = logging.getLogger(__name__)


def count(n: int) -> str:
    """A parameter count as people read it: 950, 12.3 K, 4.5 M, 1.2 B."""
    for unit, size in (("B", 10**9), ("M", 10**6), ("K", 10**3)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return str(n)


def module_rows(model: nn.Module, depth: int) -> list[tuple[str, int, int, list[torch.dtype]]]:
    """(module, trained parameters, frozen parameters, dtypes of the frozen ones) per module ``depth`` levels
    below ``model``, in model order; a part with nothing trained is one row at its highest ancestor below
    ``model`` with nothing trained either (a frozen text encoder is one row, not one per layer)."""
    params = [(name.split(".")[:-1] or ["(own)"], p) for name, p in model.named_parameters()]
    trained_under: dict[tuple[str, ...], int] = {}
    for path, p in params:
        for i in range(1, min(depth, len(path)) + 1):
            trained_under[tuple(path[:i])] = trained_under.get(tuple(path[:i]), 0) + (p.numel() if p.requires_grad else 0)
    rows: dict[str, list] = {}
    for path, p in params:
        prefix = tuple(path[:depth])
        if not trained_under[prefix]:  # collapse to the highest frozen ancestor
            prefix = next(prefix[:i] for i in range(1, len(prefix) + 1) if not trained_under[prefix[:i]])
        row = rows.setdefault(".".join(prefix), [0, 0, []])
        if p.requires_grad:
            row[0] += p.numel()
        else:
            row[1] += p.numel()
            if p.dtype not in row[2]:
                row[2].append(p.dtype)
    return [(name, trained, frozen, dtypes) for name, (trained, frozen, dtypes) in rows.items()]


def group_rows(optimizers: Iterable[torch.optim.Optimizer], names: Iterable[str]) -> list[tuple[str, int, int, float]]:
    """(group, tensors, parameters, learning rate) per optimiser; ``names`` label them in order (else
    ``optimizer <i>``)."""
    optimizers, names = list(optimizers), list(names)
    if len(names) != len(optimizers):
        names = [f"optimizer {i}" for i in range(len(optimizers))]
    rows = []
    for name, opt in zip(names, optimizers, strict=True):
        tensors = [p for group in opt.param_groups for p in group["params"]]
        rows.append((name, len(tensors), sum(p.numel() for p in tensors), float(opt.param_groups[0]["lr"])))
    return rows


def aligned(header: list[str], rows: list[list[str]], right: Iterable[int] = ()) -> list[str]:
    """Text table lines with padded columns (``right``: right-aligned column indices)."""
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    right = set(right)
    return ["  ".join(c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths, strict=True))).rstrip()
            for r in [header, *rows]]


def _dtype(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def parameter_summary(model: nn.Module, optimizers: Iterable[torch.optim.Optimizer], names: Iterable[str],
                      depth: int = 3) -> str:
    """The summary's text: optimiser groups, then modules, then totals."""
    groups = group_rows(optimizers, names)
    modules = module_rows(model, depth)
    trained = sum(t for _, t, _, _ in modules)
    frozen = sum(f for _, _, f, _ in modules)
    lines = ["Trained parameters per optimiser group:"]
    lines += ["  " + line for line in aligned(
        ["group", "tensors", "parameters", "lr"], [[g, str(n), count(p), f"{lr:g}"] for g, n, p, lr in groups], right=(1, 2, 3))]
    lines.append("Parameters per module:")
    lines += ["  " + line for line in aligned(
        ["module", "trained", "frozen", "frozen dtype"],
        [[name, count(t) if t else "-", count(f) if f else "-", ", ".join(map(_dtype, d))] for name, t, f, d in modules],
        right=(1, 2))]
    lines.append(f"Total: {count(trained)} trained ({trained:,}), {count(frozen)} frozen ({frozen:,})")
    return "\n".join(lines)


class ParameterSummary(pl.Callback):
    """Logs ``parameter_summary`` once, on global rank 0, when fitting starts (set ``trainer.enable_model_summary``
    false). Optimiser groups are named by the module's ``groups`` (name -> group, in optimiser order) when it has them."""

    def __init__(self, depth: int = 3) -> None:
        super().__init__()
        if depth < 1:
            raise ValueError(f"ParameterSummary depth={depth} must be >= 1")
        self.depth = depth

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.is_global_zero:
            groups = getattr(pl_module, "groups", None)
            names = list(groups) if isinstance(groups, Mapping) else []
            log.info("%s", parameter_summary(pl_module, trainer.optimizers, names, self.depth))
