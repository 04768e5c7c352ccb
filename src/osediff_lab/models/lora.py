"""LoRA mechanics every method shares: target layers picked by module-name suffix, named PEFT adapters injected
over them, switched off for a call, merged or unloaded, and a frozen copy of the base without them.

Which layers a method adapts and how it groups them into adapters is its builder's choice (OSEDiff's three
denoiser adapters, ``models.backbone.lora_groups``, and its VAE adapters: ``models.osediff``; PiSA-SR's:
``models.pisasr``). Only Linear and Conv2d layers are ever wrapped, so biases and normalisation layers are
never adapted.
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Iterable, Iterator
from contextlib import contextmanager

import torch
from peft import LoraConfig, inject_adapter_in_model
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn

ADAPTABLE = (nn.Linear, nn.Conv2d)


def _matches(name: str, suffixes: Iterable[str]) -> bool:
    return any(name == s or name.endswith("." + s) for s in suffixes)


def select_targets(model: nn.Module, suffixes: Iterable[str], prefix: str = "") -> list[str]:
    """Names of Linear/Conv2d modules under ``prefix`` whose name ends with one of ``suffixes``."""
    suffixes = tuple(suffixes)
    return [
        name
        for name, module in model.named_modules()
        if isinstance(module, ADAPTABLE) and name.startswith(prefix) and _matches(name, suffixes)
    ]


def add_lora(model: nn.Module, targets: list[str], rank: int, alpha: float, adapter_name: str, init: str) -> None:
    """Inject one PEFT LoRA adapter over exactly the named modules (full names, not patterns)."""
    if not targets:
        raise ValueError(f"adapter '{adapter_name}': no target modules")
    if rank <= 0:
        raise ValueError(f"adapter '{adapter_name}': LoRA rank must be positive, got {rank}")
    init_weights: bool | str = True if init == "kaiming" else init
    pattern = "^(" + "|".join(t.replace(".", r"\.") for t in targets) + ")$"
    config = LoraConfig(r=rank, lora_alpha=alpha, init_lora_weights=init_weights, target_modules=pattern)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Already found a `peft_config`")  # several adapters by design
        inject_adapter_in_model(config, model, adapter_name=adapter_name)
    # PEFT makes the newest adapter the only active one on *every* LoRA layer, which would silently
    # switch off the adapters injected before it (OSEDiff's UNet has three): keep each layer's own active.
    for layer in lora_layers(model):
        layer.set_adapter(list(layer.lora_A.keys()))


def lora_layers(model: nn.Module) -> Iterator[BaseTunerLayer]:
    for module in model.modules():
        if isinstance(module, BaseTunerLayer):
            yield module


@contextmanager
def adapters_disabled(model: nn.Module) -> Iterator[None]:
    """Run the base (pretrained) weights only; restores the active adapters and their requires_grad."""
    layers = list(lora_layers(model))
    saved = [(layer, layer.active_adapters) for layer in layers]
    grads = {id(p): p.requires_grad for layer in layers for p in layer.parameters()}
    for layer in layers:
        layer.enable_adapters(False)
    try:
        yield
    finally:
        for layer, active in saved:
            layer.enable_adapters(True)
            layer.set_adapter(active)
        for layer in layers:
            for p in layer.parameters():
                p.requires_grad_(grads[id(p)])


def merge_lora(model: nn.Module) -> None:
    """Fold every active adapter into its base weight (inference speed; outputs unchanged up to fp error)."""
    for layer in lora_layers(model):
        layer.merge(adapter_names=list(layer.active_adapters))


def merge_and_unload(model: nn.Module) -> None:
    """Merge every active adapter, then put each base layer back in place of its LoRA wrapper (plain
    Linear/Conv2d: no per-call adapter bookkeeping at inference)."""
    merge_lora(model)
    unload_adapters(model)


def unload_adapters(model: nn.Module) -> None:
    """Put each base layer back in place of its LoRA wrapper; unmerged adapters are dropped (the base model)."""
    wrapped = [name for name, module in model.named_modules() if isinstance(module, BaseTunerLayer)]
    for name in wrapped:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, getattr(parent, child).get_base_layer())


def frozen_base_copy(model: nn.Module, dtype: torch.dtype) -> nn.Module:
    """A frozen copy of ``model`` without its adapters, stored in ``dtype`` (a separate pretrained network)."""
    base = copy.deepcopy(model)
    unload_adapters(base)
    return base.to(dtype).requires_grad_(False).eval()

