"""LoRA mechanics every method shares: target layers picked by module-name suffix, named PEFT adapters injected
over them, switched off for a call, merged or unloaded, a frozen copy of the base without them, a copy of the module
tree that holds the same base weights (another set of adapters over one base in memory), and gradient checkpointing
that recomputes with the adapters active at forward time.

Which layers a method adapts and how it groups them into adapters is its builder's choice (OSEDiff's three
denoiser adapters, ``models.backbone.lora_groups``, and its VAE adapters: ``models.osediff``; PiSA-SR's:
``models.pisasr``). Only Linear and Conv2d layers are ever wrapped, so biases and normalisation layers are
never adapted.
"""

from __future__ import annotations

import contextlib
import copy
import warnings
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torch.utils.checkpoint
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



def shared_base_copy(model: nn.Module, own: Iterable[str] = ()) -> nn.Module:
    """A copy of ``model``'s module tree that holds ``model``'s own layers (every leaf module, parameter and buffer):
    adapters injected into it wrap the same base weights, so both trees keep one set in memory. The modules named in
    ``own`` are copied with all they hold, so the copy may train them without touching ``model``."""
    owned = {id(x) for name in own for m in model.get_submodule(name).modules()
             for x in (m, *m.parameters(recurse=False), *m.buffers(recurse=False))}
    memo: dict[int, Any] = {}
    for module in model.modules():
        held = [*module.parameters(recurse=False), *module.buffers(recurse=False)]
        if next(module.children(), None) is None:
            held.append(module)
        memo.update((id(x), x) for x in held if id(x) not in owned)
    return copy.deepcopy(model, memo)


AdapterState = list[tuple[BaseTunerLayer, bool, list[str], list[bool]]]


def adapter_state(model: nn.Module) -> AdapterState:
    """Each LoRA layer of ``model`` with whether its adapters are off, which are active and its tensors' requires_grad."""
    return adapter_state_of(lora_layers(model))


def _apply_adapter_state(state: AdapterState) -> None:
    for layer, disabled, active, grads in state:
        layer.set_adapter(active)  # PEFT's set_adapter also sets requires_grad: put back below
        layer.enable_adapters(not disabled)
        for p, grad in zip(layer.parameters(), grads, strict=True):
            p.requires_grad_(grad)


@contextmanager
def adapter_state_restored(state: AdapterState) -> Iterator[None]:
    """Run with the LoRA layers as ``state`` recorded them (adapters on or off, active adapters, requires_grad); the
    state they have now is put back after. A no-op when nothing differs."""
    layers = [layer for layer, *_ in state]
    now = adapter_state_of(layers)
    if now == state:
        yield
        return
    _apply_adapter_state(state)
    try:
        yield
    finally:
        _apply_adapter_state(now)


def adapter_state_of(layers: Iterable[BaseTunerLayer]) -> AdapterState:
    """``adapter_state`` of these LoRA layers."""
    return [(layer, layer.disable_adapters, list(layer.active_adapters), [p.requires_grad for p in layer.parameters()])
            for layer in layers]


def checkpoint_keeping_adapters(block: nn.Module, *args: Any) -> Any:
    """torch's non-reentrant activation checkpoint of ``block(*args)`` whose recomputation (in backward, when other
    adapters may be active: the real score's adapters-off call, another adapter set) runs with the adapters that were
    active at forward time, so the gradients are those of the forward that was run."""
    state = adapter_state(block)

    def contexts() -> tuple[contextlib.AbstractContextManager, contextlib.AbstractContextManager]:
        return contextlib.nullcontext(), adapter_state_restored(state)

    return torch.utils.checkpoint.checkpoint(block.__call__, *args, use_reentrant=False, context_fn=contexts)


def enable_checkpointing(model: nn.Module) -> None:
    """diffusers' gradient checkpointing of ``model``'s blocks, recomputed with the adapters active at forward time."""
    model.enable_gradient_checkpointing(checkpoint_keeping_adapters)
