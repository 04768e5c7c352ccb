"""Real multi-process runs: DDP on CPU (gloo) and a Hydra multirun through submitit's local launcher."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from osediff_lab.report import load_local, results_table

ROOT = Path(__file__).resolve().parents[1]
TINY_CLI = ["logger=csv", "loss.lpips.pretrained=false", "loss.lpips.net=alex", "data.crop_size=64",
            "data.batch_size=2", "callbacks.samples.every_n_steps=0", "trainer.enable_progress_bar=false",
            "trainer.log_every_n_steps=1"]


def cli(args: list[str], cwd: Path, timeout: int = 600) -> subprocess.CompletedProcess:
    env = os.environ | {"WANDB_MODE": "offline", "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.run([sys.executable, "-m", "osediff_lab.train", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


@pytest.mark.slow
def test_ddp_cpu_two_ranks_agree_on_weights_and_split_data(tmp_path):
    run_dir = tmp_path / "run"
    cli(["trainer=ddp_cpu", *TINY_CLI, "trainer.max_steps=2", f"hydra.run.dir={run_dir}"], tmp_path)
    r0 = json.loads((run_dir / "ranks" / "rank0.json").read_text())
    r1 = json.loads((run_dir / "ranks" / "rank1.json").read_text())
    assert r0["world_size"] == 2 and r0["global_step"] == r1["global_step"] == 2
    assert r0["trained_sha256"] == r1["trained_sha256"], "ranks diverged: LoRA gradients were not synchronised"
    assert len(r0["paths"]) == len(r1["paths"]) == 4  # 2 steps x batch 2 on each rank
    assert r0["paths"] != r1["paths"], "both ranks saw the same data"


@pytest.mark.slow
def test_submitit_local_multirun_and_report(tmp_path):
    """`-m method.vsd_weight=0,1` through hydra/launcher=local: both jobs finish, log, and feed the report."""
    sweep = tmp_path / "sweep"
    cli(["-m", "hydra/launcher=local", *TINY_CLI, "trainer.max_steps=2", "method.vsd_weight=0,1",
         f"hydra.sweep.dir={sweep}"], tmp_path, timeout=900)
    jobs = sorted(p.parent for p in sweep.rglob("summary.json"))
    assert len(jobs) == 2
    for job in jobs:
        assert (job / "config.yaml").is_file() and (job / "csv" / "metrics.csv").is_file()
        assert (job / "checkpoints" / "last.ckpt").is_file()
        summary = json.loads((job / "summary.json").read_text())
        assert summary["steps"] == 2 and summary["peak_memory_mb"] > 0 and summary["wall_time_s"] > 0
    runs = load_local(sweep)
    table = results_table(runs)
    assert "method.vsd_weight" in table.splitlines()[0]
    rows = table.splitlines()[2:]
    assert len(rows) == 2 and {r.split("|")[1].strip() for r in rows} == {"0", "1"}
    with_vsd = next(r for r in runs if "method.vsd_weight=1" in r["overrides"])
    without = next(r for r in runs if "method.vsd_weight=0" in r["overrides"])
    assert "train/loss_vsd" in with_vsd["loss_stats"] and "train/loss_vsd" not in without["loss_stats"]
