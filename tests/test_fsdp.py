"""The frozen base sharded by FSDP2 (models/sharding.py): the plan (which layers, one unit per shared layer), the
memory arithmetic, and two CPU ranks over gloo training OSEDiff bit for bit as one process while each holds half."""

from __future__ import annotations

import json
import socket
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from helpers import TINY, compose_config
from osediff_lab.memory import training_step
from osediff_lab.models.sharding import frozen_units, shard_frozen_base, sharded_bytes
from osediff_lab.train import build_module

pytestmark = pytest.mark.usefixtures("single_thread")
STEPS = 2


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_memory_arithmetic():
    assert sharded_bytes(1000, 10, 1) == 1000  # never more than the whole base
    assert sharded_bytes(1000, 10, 4) == 250 + 20
    assert sharded_bytes(1001, 0, 2) == 501


@pytest.mark.slow
def test_plan_shards_each_frozen_base_layer_once():
    torch.manual_seed(0)
    module = build_module(compose_config(TINY))
    gen, reg = module.method.generator.unet, module.method.reg_unet
    units = frozen_units(gen, reg)
    ids = {id(u) for u in units}
    assert len(ids) == len(units) and units
    assert ids == {id(u) for u in frozen_units(reg)}  # the generator's frozen layers are the shared base's
    assert all(not p.requires_grad for u in units for p in u.parameters())
    trained = {id(p) for p in module.parameters() if p.requires_grad}
    assert not trained & {id(p) for u in units for p in u.parameters()}  # LoRA and the generator's conv_in stay whole
    frozen_base = {id(p) for n, p in reg.named_parameters() if not p.requires_grad and ".lora_" not in n}
    assert frozen_base == {id(p) for u in units for p in u.parameters()}


def run(rank: int, world: int, port: int, out: str) -> None:
    """``STEPS`` OSEDiff steps on the tiny model, the frozen base sharded over ``world`` ranks (1: not sharded)."""
    torch.set_num_threads(1)
    if world > 1:
        torch.distributed.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    torch.manual_seed(0)
    module = build_module(compose_config(TINY)).train()
    gen, reg = module.method.generator.unet, module.method.reg_unet
    total = sum(p.numel() for u in frozen_units(gen, reg) for p in u.parameters())
    if world > 1:
        from torch.distributed.device_mesh import init_device_mesh

        shard_frozen_base(gen, reg, mesh=init_device_mesh("cpu", (world,)))
    local = sum(p.to_local().numel() for u in frozen_units(gen, reg) for p in u.parameters()) if world > 1 else total
    step = training_step(module, torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(1)) * 2 - 1)
    for _ in range(STEPS):
        step()
    trained = {n: p.detach() for n, p in module.trained_state_dict().items()}
    torch.save({"trained": trained, "total": total, "local": local}, Path(out) / f"rank{rank}_of{world}.pt")
    if world > 1:
        torch.distributed.destroy_process_group()


@pytest.mark.slow
def test_two_gloo_ranks_with_a_sharded_base_equal_one_process(tmp_path):
    run(0, 1, 0, str(tmp_path))
    mp.spawn(run, args=(2, free_port(), str(tmp_path)), nprocs=2)
    one = torch.load(tmp_path / "rank0_of1.pt")
    ranks = [torch.load(tmp_path / f"rank{r}_of2.pt") for r in range(2)]
    assert sum(r["local"] for r in ranks) >= one["total"]
    for shard in ranks:
        assert shard["total"] == one["total"] and shard["local"] < 0.6 * one["total"]  # half, and dim-0 padding
        assert shard["trained"].keys() == one["trained"].keys()
        for name, value in one["trained"].items():
            assert torch.equal(shard["trained"][name], value), name
    print(json.dumps({"frozen_params": one["total"], "per_rank": [r["local"] for r in ranks]}))
