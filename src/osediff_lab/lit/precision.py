"""Lightning precision plugins that give the forward pass its autocast and leave the optimiser step to the
module: Lightning's step runs the module's closure, which is the whole plain-torch update (``osediff_lab.step``),
so every precision gets the same step and Lightning only counts it (``global_step``)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from pytorch_lightning.plugins.precision import DoublePrecision, MixedPrecision, Precision

from osediff_lab.errors import ConfigError


class ModuleStep:
    """Mixin for a Lightning precision plugin: its optimiser step runs the closure it is given, the module's
    plain-torch update (backward, unscaling, clipping and the skip are the module's: manual optimisation)."""

    def optimizer_step(self, optimizer: torch.optim.Optimizer, model: Any, closure: Callable[[], Any], **kwargs: Any) -> Any:
        return closure()


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


def precision_plugin(precision: str | int, accelerator: str | None) -> Precision:
    """The plugin for ``trainer.precision``: its autocast, on CUDA or on the CPU (where Lightning would silently
    switch fp16 to bf16). fp16's loss scaler is the module's own (``optim.grad_scaler``): the plugin's is off."""
    device = "cpu" if accelerator == "cpu" or not torch.cuda.is_available() else "cuda"
    name = precision_name(precision)
    if name == "16-mixed":
        return StepMixedPrecision(name, device, scaler=torch.amp.GradScaler(device, enabled=False))
    if name == "bf16-mixed":
        return StepMixedPrecision(name, device)
    if name == "32-true":
        return StepPrecision()
    if name == "64-true":
        return StepDoublePrecision()
    raise ConfigError(f"trainer.precision={precision} is not one of {', '.join(PRECISIONS)}")
