"""Measured peak GPU memory per rank of training steps with the frozen base sharded by FSDP2, for multi-GPU machines.

`torchrun --nproc_per_node=4 benchmarks/fsdp_check.py model=flux_shape data.crop_size=1024 trainer.precision=bf16-mixed \
    generator.frozen_dtype=bf16 generator.gradient_checkpointing=true`
(any training overrides; needs N GPUs, or runs on CPU over gloo as a smoke test). The module is built on the meta
device, its frozen base sharded (models/sharding.py), then allocated on each rank's device (only its shards of the
frozen base) and filled with small random values: the numbers are memory, not training. Each rank prints its peak
(torch.cuda.max_memory_allocated) beside the single-GPU prediction (osediff_lab.memory) minus what the sharding saves.
"""

from __future__ import annotations

import os
import sys

import torch
from hydra import compose, initialize_config_dir
from omegaconf import open_dict
from torch.distributed.device_mesh import init_device_mesh

from osediff_lab import resolvers  # noqa: F401  (registers the config resolvers)
from osediff_lab.memory import GIB, predict_training_memory, training_step
from osediff_lab.models.sharding import frozen_units, shard_frozen_base, sharded_bytes
from osediff_lab.paths import CONF_DIR
from osediff_lab.train import build_module


def main() -> None:
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    cuda = torch.cuda.is_available()
    device = torch.device("cuda", int(os.environ["LOCAL_RANK"])) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    torch.distributed.init_process_group("nccl" if cuda else "gloo")
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose(config_name="memory", overrides=sys.argv[1:])
    with open_dict(cfg):
        cfg.paths.output_dir = "unused"
    with torch.device("meta"):
        module = build_module(cfg).train()
    nets = (module.method.generator.unet, getattr(module.method, "reg_unet", module.method.generator.unet))
    units = frozen_units(*nets)
    frozen = sum(p.numel() * p.element_size() for u in units for p in u.parameters())
    largest = max(sum(p.numel() * p.element_size() for p in u.parameters()) for u in units)
    shard_frozen_base(*nets, mesh=init_device_mesh(device.type, (world,)))
    module.to_empty(device=device).to(device)  # .to: Lightning's own record of the device
    module.groups = module.method.param_groups()  # to_empty made new tensors of the meta parameters the groups held
    with torch.no_grad():
        for t in [*module.parameters(), *module.buffers()]:
            if t.is_floating_point() and t.element_size() > 1:
                (t.to_local() if hasattr(t, "to_local") else t).normal_(0, 0.02)
    step = training_step(module, torch.rand(int(cfg.data.batch_size), 3, int(cfg.data.crop_size), int(cfg.data.crop_size),
                                            device=device) * 2 - 1)
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    for _ in range(int(cfg.memory.steps)):
        step()
    measured = torch.cuda.max_memory_allocated(device) if cuda else 0
    if rank == 0:
        one = predict_training_memory(cfg, int(cfg.memory.steps))
        expected = one.peak - frozen + sharded_bytes(frozen, largest, world)
        print(f"{world} ranks: frozen base {frozen / GIB:.2f} GiB in {len(units)} units (largest {largest / GIB:.3f} GiB); "
              f"predicted one GPU {one.peak / GIB:.2f} GiB, sharded {expected / GIB:.2f} GiB per rank")
    print(f"rank {rank}: measured peak {measured / GIB:.2f} GiB" + ("" if cuda else " (CPU: not measured)"), flush=True)
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
