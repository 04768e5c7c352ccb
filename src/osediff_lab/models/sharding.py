"""The frozen base sharded over GPUs (FSDP2, ``torch.distributed.fsdp.fully_shard``): each frozen layer of the denoiser
(every leaf module holding weights outside the LoRA adapters, none of them trained) is one FSDP unit whose weights are
split over the ranks and gathered for its forward (and again for the input gradient in backward). Trained tensors
(LoRA, the generator's own input layer) stay whole on every rank, averaged as DDP averages them (``step.py``). Units
are the layers themselves, not blocks, because a shared base (``models.lora.shared_base_copy``) shares layers between
two module trees: one unit per layer serves both. fp8 storage (``models.frozen``) keeps its weights in buffers, which
FSDP does not shard. The training option: ``generator.shard_frozen_base`` (``SRModule.configure_model``). Runs on CPU
over gloo too (tests/test_fsdp.py: two ranks equal one process, and a ``trainer=ddp_cpu`` run equals one without)."""

from __future__ import annotations

from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import fully_shard


def frozen_units(*models: nn.Module) -> list[nn.Module]:
    """The distinct leaf modules of ``models`` that hold weights, all frozen, outside LoRA adapters: the frozen base's
    layers (a layer several models share is listed once)."""
    units: dict[int, nn.Module] = {}
    for model in models:
        for name, module in model.named_modules():
            params = list(module.parameters(recurse=False))
            if (params and next(module.children(), None) is None and not any(p.requires_grad for p in params)
                    and not any(part.startswith("lora_") for part in name.split("."))):
                units.setdefault(id(module), module)
    return list(units.values())


def shard_frozen_base(*models: nn.Module, mesh: DeviceMesh) -> int:
    """Shard every frozen base layer of ``models`` over ``mesh`` in place (gathered per call, freed after); the count."""
    units = frozen_units(*models)
    for unit in units:
        fully_shard(unit, mesh=mesh, reshard_after_forward=True)
    return len(units)


def sharded_bytes(frozen: int, largest_unit: int, world: int) -> int:
    """Bytes of a frozen base of ``frozen`` bytes per rank when sharded over ``world`` ranks: its share plus two gathered
    units (the one running and the one prefetched), at most the whole base."""
    return min(frozen, -(-frozen // world) + 2 * largest_unit)
