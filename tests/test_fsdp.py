"""The frozen base sharded by FSDP2 (models/sharding.py): the plan (which layers, one unit per shared layer), the
memory arithmetic, and two CPU ranks over gloo training OSEDiff bit for bit as one process while each holds half."""

from __future__ import annotations

import json
import re
import socket
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from safetensors.torch import load_file

from helpers import TINY, compose_config
from osediff_lab.checks import shard_problems
from osediff_lab.memory import training_step
from osediff_lab.models.sharding import frozen_units, shard_frozen_base, sharded_bytes
from osediff_lab.train import build_module
from test_ddp import CLI, finish, loss_rows, train_cli

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


def test_checks_refuse_a_sharded_base_that_cannot_work():
    ok = ["trainer=ddp_cpu", "generator.shard_frozen_base=true", "callbacks.samples.num_images=0"]
    assert not shard_problems(compose_config([*TINY, *ok]))
    assert not shard_problems(compose_config([*TINY, "trainer=cpu"]))  # off: nothing to check
    for extra, words in ((["trainer=cpu"], "several ranks"), (["trainer.devices=1"], "several ranks"),
                         (["generator.share_base=false"], "share_base=true"), (["callbacks.samples.num_images=4"], "val=none"),
                         (["trainer.precision=bf16-mixed", "generator.frozen_dtype=fp8_e4m3"], "buffers")):
        problems = shard_problems(compose_config([*TINY, *ok, *extra]))
        assert len(problems) == 1 and words in problems[0], (extra, problems)


@pytest.mark.slow
def test_ddp_run_with_the_key_trains_as_without_and_each_rank_holds_half(tmp_path):
    """``trainer=ddp_cpu generator.shard_frozen_base=true`` through the real trainer: losses, the exported LoRA and every
    rank's trained tensors bit for bit as the same run without the key; each rank holds about half the frozen base."""
    args = [*CLI, "trainer=ddp_cpu", f"trainer.max_steps={STEPS}", "callbacks.samples.num_images=0"]
    outs = {}
    for name, extra in (("whole", []), ("sharded", ["generator.shard_frozen_base=true"])):
        outs[name] = finish(train_cli([*args, *extra, f"hydra.run.dir={tmp_path / name}"], tmp_path))
    whole, sharded = tmp_path / "whole", tmp_path / "sharded"
    losses = loss_rows(sharded)
    assert losses.keys() == set(range(STEPS)) and losses == loss_rows(whole)
    ref, got = (load_file(d / "lora" / "osediff_lora.safetensors") for d in (whole, sharded))
    assert ref.keys() == got.keys() and all(torch.equal(ref[k], got[k]) for k in ref)
    digests = {json.loads((d / "ranks" / f"rank{r}.json").read_text())["trained_sha256"] for d in (whole, sharded)
               for r in (0, 1)}
    assert len(digests) == 1, "a rank's trained tensors differ"
    held = {int(r): (int(h), int(t)) for r, h, t in re.findall(r"rank (\d) of 2 holds (\d+) of (\d+) frozen", outs["sharded"])}
    assert held.keys() == {0, 1} and "shard_frozen_base" not in outs["whole"]
    for h, t in held.values():
        assert 0.45 * t < h < 0.6 * t  # half, and dim-0 padding
    print(json.dumps({"frozen_bytes": held[0][1], "per_rank": [held[0][0], held[1][0]]}))
