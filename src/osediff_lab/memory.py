"""`python -m osediff_lab.memory model=sd21_shape data.crop_size=512 [options]`: will this training config fit?

Predicts the peak tensor memory of a training step (generator step, then regularizer step, AdamW) without
a GPU and without the weights: the configured module is built on the meta device and the step is replayed
on fake tensors (shapes and dtypes only, seconds even at SD2.1 size). Every tensor storage the step creates
is tracked at the dispatcher and its free is seen through a storage weak reference, so the peak is that of
bytes held by tensors, which is what ``torch.cuda.max_memory_allocated`` reports. Not included: the CUDA
context (about 0.5 GiB), the caching allocator's rounding and fragmentation, and library workspaces.
Kernels are the CPU ones (autocast's CPU op list), so a GPU run may differ by a few percent.
FakeTensorMode and TorchDispatchMode come from the modules torch documents them in (``torch._subclasses``,
``torch.utils._python_dispatch``): they have no other import path.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import hydra
import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn
from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode

from osediff_lab.checks import config_problems
from osediff_lab.errors import ConfigError
from osediff_lab.io import atomic_write_text
from osediff_lab.lit.module import SRModule
from osediff_lab.paths import CONF_DIR
from osediff_lab.train import build_module

GIB = 2**30
AUTOCAST = {"bf16-mixed": torch.bfloat16, "16-mixed": torch.float16}


class PeakTensorBytes(TorchDispatchMode):
    """Peak bytes of the tensor storages that ops run inside this mode create and that are alive at once.

    ``existing`` tensors (weights, buffers) are not counted again when an in-place op returns them (the
    optimiser's update of a parameter). Frees are collected only when the running count passes the peak
    (a full scan of the weak references), so the peak is exact while most ops cost a dictionary lookup.
    """

    def __init__(self, existing: Iterable[torch.Tensor] = ()) -> None:
        super().__init__()
        self.existing = {StorageWeakRef(t.untyped_storage()).cdata for t in existing}
        self.live: dict[int, tuple[StorageWeakRef, int]] = {}
        self.now = 0
        self.peak = 0

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        out = func(*args, **(kwargs or {}))
        for t in tensors_in(out):
            storage = t.untyped_storage()
            ref = StorageWeakRef(storage)
            if ref.cdata not in self.live and ref.cdata not in self.existing:
                self.live[ref.cdata] = (ref, storage.nbytes())
                self.now += storage.nbytes()
        if self.now > self.peak:
            for key in [k for k, (ref, _) in self.live.items() if ref.expired()]:
                self.now -= self.live.pop(key)[1]
            self.peak = max(self.peak, self.now)
        return out


def tensors_in(out: Any) -> Iterator[torch.Tensor]:
    """The tensors an op returned: one, or those in its (nested) tuple or list."""
    if isinstance(out, torch.Tensor):
        yield out
    elif isinstance(out, tuple | list):
        for item in out:
            yield from tensors_in(item)


def make_fake(module: nn.Module, mode: FakeTensorMode, device: str = "cpu") -> dict[int, torch.Tensor]:
    """Replace every parameter and buffer of ``module`` (on meta) by a fake tensor on ``device``, in place.

    Tensors shared between sub-modules stay shared. Returns {id of the original: its fake}.
    """
    fakes: dict[int, torch.Tensor] = {}

    def fake(t: torch.Tensor) -> torch.Tensor:
        if id(t) not in fakes:
            f = FakeTensor(mode, torch.empty_like(t, device="meta"), torch.device(device))
            fakes[id(t)] = nn.Parameter(f, requires_grad=t.requires_grad) if isinstance(t, nn.Parameter) else f
        return fakes[id(t)]

    for m in module.modules():
        for key, t in [*m.named_parameters(recurse=False, remove_duplicate=False),
                       *m.named_buffers(recurse=False, remove_duplicate=False)]:
            setattr(m, key, fake(t))  # nn.Module.__setattr__ replaces the registered parameter or buffer
    return fakes


def training_step(module: SRModule, hq: torch.Tensor) -> Callable[[], None]:
    """The module's own training step (``SRModule.optimize_batch``: clipping, non-finite skips, every group's
    updates) without a trainer, with its own optimisers and trainer.precision's
    autocast, on a batch degraded from ``hq`` in [-1, 1]; text is the empty prompt. The benchmarks time it."""
    optimizers = module.build_optimizers()
    autocast = AUTOCAST.get(str(module.cfg.trainer.precision))

    def step() -> None:
        batch = module.on_after_batch_transfer({"hq": hq}, 0)
        with torch.autocast(hq.device.type, dtype=autocast or torch.float32, enabled=autocast is not None):
            module.optimize_batch(batch, optimizers, prompts=[""] * hq.shape[0])

    return step


@dataclass
class MemoryPrediction:
    """Bytes: weights and buffers present before the step, and the peak during it (both included in ``peak``); ``text``:
    the text encoders' weights among them (0 when ``text_cache.keep_encoders=false`` lets them go)."""

    static: int
    peak: int
    text: int = 0

    @property
    def activations(self) -> int:
        return self.peak - self.static


def predict_training_memory(cfg: DictConfig, steps: int = 2) -> MemoryPrediction:
    """Peak tensor bytes of ``steps`` training steps of ``cfg`` (the last step includes optimiser states)."""
    problems = config_problems(cfg)
    if cfg.model.source != "random":
        problems.append(f"model={cfg.model.name} loads weights; predict with its random twin (model=sd21_shape for SD2.1)")
    if cfg.optim.use_8bit:
        problems.append("optim.use_8bit=true: bitsandbytes kernels do not run on fake tensors; predict with AdamW "
                        "(8-bit states save 6 bytes per trainable parameter)")
    if problems:
        raise ConfigError("cannot predict memory for this config:\n  - " + "\n  - ".join(problems))
    uncached = OmegaConf.merge(cfg, {"text_cache": {"enabled": False}})  # the replay encodes on fake tensors: no disk
    with torch.device("meta"):
        module = build_module(uncached).train()
    text = sum(t.numel() * t.element_size() for t in [*module.text_encoders.parameters(), *module.text_encoders.buffers()])
    let_go = text if cfg.text_cache.enabled and not cfg.text_cache.keep_encoders else 0  # static for the whole run
    mode = FakeTensorMode(allow_non_fake_inputs=True)
    fakes = make_fake(module, mode)
    for group in module.groups.values():
        group.params = [fakes[id(p)] for p in group.params]
    static = sum(t.untyped_storage().nbytes() for t in fakes.values())
    size, batch = int(cfg.data.crop_size), int(cfg.data.batch_size)
    with mode:
        hq = torch.zeros(batch, 3, size, size)
        step = training_step(module, hq)
        tracker = PeakTensorBytes(fakes.values())
        with tracker:
            for _ in range(steps):
                step()
    return MemoryPrediction(static - let_go, static + tracker.peak - let_go, text - let_go)


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="memory")
def main(cfg: DictConfig) -> None:
    p = predict_training_memory(cfg, int(cfg.memory.steps))
    print(
        f"model={cfg.model.name}, {cfg.data.crop_size}x{cfg.data.crop_size}, batch {cfg.data.batch_size}, "
        f"precision {cfg.trainer.precision}, frozen {cfg.generator.frozen_dtype}, gradient checkpointing "
        f"{cfg.generator.gradient_checkpointing}, shared base {cfg.generator.share_base}, LPIPS {cfg.loss.lpips.dtype}:\n"
        f"  predicted peak tensor memory {p.peak / GIB:.2f} GiB (weights and buffers {p.static / GIB:.2f}, "
        f"step {p.activations / GIB:.2f}; text encoders {p.text / GIB:.2f}, none with text_cache.keep_encoders=false); "
        "add about 0.5 GiB of CUDA context"
    )
    out = Path(cfg.paths.output_dir) / "memory.json"  # bytes, for comparing the options of a sweep (-m)
    atomic_write_text(out, json.dumps({"static_bytes": p.static, "peak_bytes": p.peak}, indent=2))
    print(f"written: {out}")


if __name__ == "__main__":
    main()
