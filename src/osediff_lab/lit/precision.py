"""Lightning precision plugins whose optimiser step is the module's own (``SRModule.optimizer_update``), so
every precision gets the same step: one fused finiteness check, clipping, and a skip decided on the device."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from pytorch_lightning.plugins.precision import DoublePrecision, MixedPrecision, Precision

from osediff_lab.errors import ConfigError


class ModuleStep:
    """Mixin for a Lightning precision plugin: its optimiser step hands over to the LightningModule's
    ``optimizer_update(optimizer)``. Manual optimisation: backward ran before, the closure only marks the step."""

    def optimizer_step(self, optimizer: torch.optim.Optimizer, model: Any, closure: Callable[[], Any], **kwargs: Any) -> Any:
        closure()
        return model.optimizer_update(optimizer)


class StepPrecision(ModuleStep, Precision):
    """``32-true`` with the module's optimiser step."""


class StepMixedPrecision(ModuleStep, MixedPrecision):
    """``16-mixed`` (autocast and its GradScaler) or ``bf16-mixed`` with the module's optimiser step."""


class StepDoublePrecision(ModuleStep, DoublePrecision):
    """``64-true`` with the module's optimiser step."""


ALIASES = {"32": "32-true", "16": "16-mixed", "bf16": "bf16-mixed", "64": "64-true"}
# Not the *-true half precisions: for frozen weights in half precision use generator.frozen_dtype=bf16|fp16
# with a *-mixed precision (trained LoRA weights stay fp32); 16-true's unscaled fp16 gradients underflow.
PRECISIONS = ("32-true", "16-mixed", "bf16-mixed", "64-true")


def precision_name(precision: str | int) -> str:
    """``trainer.precision`` in Lightning's full spelling (``32`` -> ``32-true``, ``bf16`` -> ``bf16-mixed``)."""
    return ALIASES.get(str(precision), str(precision))


def precision_plugin(precision: str | int, accelerator: str | None, scaler_kwargs: dict[str, Any]) -> Precision:
    """The plugin for ``trainer.precision``. fp16 gets a GradScaler built from ``optim.grad_scaler`` (init scale,
    growth, backoff), on CUDA or on the CPU (where Lightning would silently switch to bf16)."""
    device = "cpu" if accelerator == "cpu" or not torch.cuda.is_available() else "cuda"
    name = precision_name(precision)
    if name == "16-mixed":
        return StepMixedPrecision(name, device, scaler=torch.amp.GradScaler(device, **scaler_kwargs))
    if name == "bf16-mixed":
        return StepMixedPrecision(name, device)
    if name == "32-true":
        return StepPrecision()
    if name == "64-true":
        return StepDoublePrecision()
    raise ConfigError(f"trainer.precision={precision} is not one of {', '.join(PRECISIONS)}")
