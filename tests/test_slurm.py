"""Sweeps on Slurm: the request checked against sinfo, launcher presets, the job table, and, on a running
cluster (`bash ../shared/tools/slurm/up.sh`, as .ci/run does), end-to-end sweeps through preemption
(USR2 before the time limit, `scontrol requeue`), a DDP job preempted and resumed, and a failing point."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf, open_dict

from osediff_lab.errors import ConfigError
from osediff_lab.lit.loggers import journal_rows
from osediff_lab.paths import CONF_DIR
from osediff_lab.report import unfinished_runs
from osediff_lab.slurm import JobRecord, Node, failure_reason, jobs_table, parse_gpus, request_problems
from wandb_files import history_matches_journal, read_history

NODES = [Node("c1", ["cpu"], cpus=2, mem_mb=20000, gpus=0), Node("g1", ["gpu"], cpus=32, mem_mb=256000, gpus=4),
         Node("g2", ["gpu"], cpus=32, mem_mb=256000, gpus=4)]
OK = {"partition": "cpu", "nodes": 1, "tasks_per_node": 2, "cpus_per_task": 1, "mem_gb": 4, "gpus_per_node": None}


@pytest.mark.parametrize(("change", "key"), [
    ({"partition": "gpu-big"}, "hydra.launcher.partition=gpu-big: no such partition"),
    ({"cpus_per_task": 8}, "hydra.launcher.cpus_per_task=8 x tasks_per_node=2 = 16 CPUs"),
    ({"mem_gb": 128}, "hydra.launcher.mem_gb=128 (131072 MB)"),
    ({"gpus_per_node": 4}, "hydra.launcher.gpus_per_node=4 GPUs"),
    ({"tasks_per_node": 0}, "hydra.launcher.tasks_per_node=0 must be >= 1"),
    ({"partition": "gpu", "gpus_per_node": 4, "cpus_per_task": 8, "tasks_per_node": 4, "nodes": 3}, "hydra.launcher.nodes=3"),
])
def test_request_that_fits_no_node_names_its_key(change, key):
    assert request_problems(OK, NODES, "cpu") == []
    problems = request_problems(OK | change, NODES, "cpu")
    assert any(p.startswith(key) for p in problems), problems


def test_gpu_request_fits_and_gres_strings_parse():
    gpu = {"partition": "gpu", "nodes": 2, "tasks_per_node": 4, "cpus_per_task": 8, "mem_gb": 128, "gpus_per_node": 4}
    assert request_problems(gpu, NODES, "cpu") == []
    assert request_problems(OK | {"partition": None}, NODES, "cpu") == []  # the default partition
    assert [parse_gpus(g) for g in ("(null)", "gpu:4", "gpu:a100:8(S:0-1)", "gpu:2,gpu:v100:1")] == [0, 4, 8, 3]


def launcher_cfg(*overrides: str) -> dict:
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose("train", overrides=list(overrides), return_hydra_config=True)
    with open_dict(cfg):
        cfg.hydra.sweep.dir = "sweep"
    return OmegaConf.to_container(cfg.hydra.launcher, resolve=True)


def test_presets_cpu_has_no_gpu_line_and_tasks_follow_devices():
    cpu = launcher_cfg("hydra/launcher=slurm_cpu", "trainer=ddp_cpu")
    assert cpu["gpus_per_node"] is None and cpu["gres"] is None and cpu["tasks_per_node"] == 2
    assert launcher_cfg("hydra/launcher=slurm_cpu", "trainer=cpu")["tasks_per_node"] == 1
    gpu = launcher_cfg("hydra/launcher=slurm", "trainer=ddp")
    assert gpu["gpus_per_node"] == gpu["tasks_per_node"] == 4 and gpu["partition"] == "gpu"
    assert launcher_cfg("hydra/launcher=slurm_gpu", "trainer=ddp", "trainer.devices=2")["tasks_per_node"] == 2
    for preset in ("slurm_cpu", "slurm_gpu", "local"):
        assert launcher_cfg(f"hydra/launcher={preset}")["_target_"].startswith("hydra_plugins.osediff_lab_launcher.")


def test_job_table_and_failure_reason():
    trace = ("Job (task=0) failed during processing with trace:\n----------------------\nTraceback (most recent call "
             "last):\n  File \"x.py\", line 1\nosediff_lab.errors.ConfigError: method.vsd_weight=-1.0 is negative\n\n"
             "----------------------\nYou can check full logs with 'job.stderr(0)'")
    reason = failure_reason(RuntimeError(trace))
    assert reason == "osediff_lab.errors.ConfigError: method.vsd_weight=-1.0 is negative"
    records = [JobRecord(0, ["seed=1", "method.vsd_weight=1"], "7_0", restarts=1, result="finished", summary={"attempts": 2}),
               JobRecord(1, ["seed=1", "method.vsd_weight=-1"], "7_1", result="failed", reason=reason)]
    rows = jobs_table(records).splitlines()[2:]
    assert rows[0] == "| 0 | 7_0 | method.vsd_weight=1 | finished, preempted and requeued 1x | 2 |  |"
    assert rows[1].startswith("| 1 | 7_1 | method.vsd_weight=-1 | failed | 1 | osediff_lab.errors.ConfigError")


# ---- on a running cluster ----------------------------------------------------------------------------
def slurm_problem() -> str | None:
    if shutil.which("sinfo") is None:
        return "Slurm is not installed (start one with `bash ../shared/tools/slurm/up.sh`, as .ci/run does)"
    probe = subprocess.run(["sinfo", "-h", "-o", "%T"], capture_output=True, text=True, timeout=30)
    if probe.returncode != 0 or not re.search(r"idle|mixed|alloc", probe.stdout):
        return f"Slurm is not running or has no usable node: {probe.stderr.strip() or probe.stdout.strip()}"
    return None


needs_slurm = pytest.mark.skipif(slurm_problem() is not None, reason=str(slurm_problem()))
TINY = ["loss.lpips.pretrained=false", "loss.lpips.net=alex", "data.crop_size=64", "data.batch_size=2",
        "callbacks.samples.every_n_steps=0", "callbacks.checkpoint.every_n_train_steps=2", "trainer.log_every_n_steps=1",
        "trainer.enable_progress_bar=false", "hydra/launcher=slurm_cpu", "hydra.launcher.timeout_min=20"]
STEPS = 8


def sweep(sweep_dir: Path, args: list[str]) -> subprocess.Popen:
    env = os.environ | {"WANDB_MODE": "offline", "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1",
                        "OSEDIFF_SWEEP_POLL_S": "2", "PYTHONUNBUFFERED": "1"}
    sweep_dir.mkdir(parents=True)
    log = open(sweep_dir.parent / "sweep.log", "w")  # noqa: SIM115 (the process writes it)
    return subprocess.Popen([sys.executable, "-m", "osediff_lab.train", "-m", *TINY, f"trainer.max_steps={STEPS}",
                             f"hydra.sweep.dir={sweep_dir}", *args], cwd=sweep_dir.parent, env=env, stdout=log,
                            stderr=subprocess.STDOUT)


def sweep_log(sweep_dir: Path) -> str:
    return (sweep_dir.parent / "sweep.log").read_text()


def job_ids(sweep_dir: Path, proc: subprocess.Popen, count: int) -> list[str]:
    """The Slurm ids of the sweep's jobs, in job order, once all are submitted."""
    deadline = time.time() + 120
    while time.time() < deadline:
        found = dict(re.findall(r"submitted #(\d+) as job (\S+):", sweep_log(sweep_dir)))
        if len(found) == count:
            return [found[str(i)] for i in range(count)]
        assert proc.poll() is None, sweep_log(sweep_dir)[-3000:]
        time.sleep(0.5)
    raise AssertionError("jobs not submitted:\n" + sweep_log(sweep_dir)[-3000:])


def wait_for(path: Path, proc: subprocess.Popen, timeout: float = 300) -> None:
    deadline = time.time() + timeout
    while not path.exists():
        assert proc.poll() is None, sweep_log(path.parents[1] if path.parent.name == "checkpoints" else path.parent)[-3000:]
        assert time.time() < deadline, f"{path} never appeared"
        time.sleep(0.3)


def preempt_at_first_checkpoint(sweep_dir: Path, proc: subprocess.Popen, commands: dict[int, list[str]],
                                timeout: float = 300) -> None:
    """Run each job's preemption command as soon as that job writes its step-2 checkpoint. The jobs are
    watched together: waiting for one first would let the other run on to its end before its signal."""
    deadline = time.time() + timeout
    pending = dict(commands)
    while pending:
        for n in [n for n in pending if (sweep_dir / str(n) / "checkpoints" / "step000002.ckpt").exists()]:
            assert not (sweep_dir / str(n) / "summary.json").exists(), f"job {n} finished before it could be preempted"
            subprocess.run(pending.pop(n), check=True, timeout=30)
        assert proc.poll() is None, sweep_log(sweep_dir)[-3000:]
        assert time.time() < deadline, f"no step-2 checkpoint from jobs {sorted(pending)}"
        time.sleep(0.2)


def rank_pid(job: str, rank: int) -> int:
    """PID of the training process of global rank ``rank`` in the job's step 0 (`scontrol listpids`)."""
    array_id, task = job.split("_")
    numeric = job_field(job, "JobId")  # an array element has its own numeric id
    out = subprocess.run(["scontrol", "listpids", numeric], capture_output=True, text=True, timeout=30).stdout
    pids = [int(f[0]) for f in (line.split() for line in out.splitlines()[1:]) if f[2] == "0" and f[4] == str(rank)]
    assert pids, f"no process of rank {rank} in job {job} ({array_id}_{task}):\n{out}"
    return min(pids)


def job_field(job: str, name: str) -> str:
    out = subprocess.run(["scontrol", "-o", "show", "job", job], capture_output=True, text=True, timeout=30).stdout
    match = re.search(rf"\b{name}=(\S*)", out)
    return match.group(1) if match else ""


def start_requeued_now(job: str, proc: subprocess.Popen) -> None:
    """Slurm holds a requeued job for 2 minutes (BeginTime); the test lets it start at once instead."""
    deadline = time.time() + 120
    while job_field(job, "JobState") != "PENDING":
        assert proc.poll() is None and time.time() < deadline, f"{job} was not requeued: {job_field(job, 'JobState')}"
        time.sleep(0.3)
    subprocess.run(["scontrol", "update", f"JobId={job}", "StartTime=now"], check=True, timeout=30)


def finish(proc: subprocess.Popen, sweep_dir: Path, timeout: float = 600) -> str:
    proc.wait(timeout=timeout)
    return sweep_log(sweep_dir)


def assert_wandb_matches_csv(run_dir: Path) -> None:
    run_id = (run_dir / "wandb_run_id.txt").read_text().strip()
    history = read_history(run_dir / "wandb", run_id)
    assert history_matches_journal(history, journal_rows(run_dir / "csv")) == []
    assert [r["_step"] for r in history] == list(range(STEPS))
    dry = subprocess.run([shutil.which("wandb") or str(Path(sys.executable).with_name("wandb")), "sync", "--dry-run",
                          *map(str, sorted((run_dir / "wandb").glob("offline-run-*"))),
                          ], capture_output=True, text=True, timeout=120, cwd=run_dir)
    # every attempt's folder left in wandb/ is one W&B can sync (an attempt that never finished its run is set aside
    # in wandb_unfinished/ and its rows are sent again from the CSV journal: the history check above holds them)
    folders = sorted((run_dir / "wandb").glob("offline-run-*"))
    assert folders and dry.returncode == 0 and f"Would sync {len(folders)} run(s)" in dry.stdout + dry.stderr, \
        dry.stdout + dry.stderr


@pytest.mark.slurm
@needs_slurm
def test_sweep_survives_usr2_and_scontrol_requeue_with_wandb(tmp_path):
    """Job 0 gets USR2 (the time-limit warning), job 1 `scontrol requeue` (SIGTERM to every process of the
    job, W&B's service included). Both checkpoint, write no summary, are requeued and finish; the sweep
    waits for the final attempts and ends with a table; W&B holds every row once, as the CSV does."""
    sweep_dir = tmp_path / "sweep"
    proc = sweep(sweep_dir, ["logger=wandb", "method.vsd_weight=0,1"])
    jobs = job_ids(sweep_dir, proc, 2)
    preempt_at_first_checkpoint(sweep_dir, proc, {0: ["scancel", "--signal=USR2", jobs[0]],
                                                  1: ["scontrol", "requeue", jobs[1]]})
    for job in jobs:
        start_requeued_now(job, proc)
        assert proc.poll() is None, "the sweep returned before the requeued attempts ran"
    for n in (0, 1):
        assert not (sweep_dir / str(n) / "summary.json").exists(), "a preempted attempt wrote the run's summary"
        assert not (sweep_dir / str(n) / "lora").exists(), "a preempted attempt exported LoRA weights"
    out = finish(proc, sweep_dir)
    assert proc.returncode == 0, out[-4000:]
    table = (sweep_dir / "jobs.md").read_text()
    assert table.count("finished, preempted and requeued 1x | 2 |") == 2, table
    for n in (0, 1):
        summary = json.loads((sweep_dir / str(n) / "summary.json").read_text())
        assert summary["steps"] == STEPS and summary["attempts"] == 2
        assert_wandb_matches_csv(sweep_dir / str(n))
    logs = "".join(p.read_text() for p in (sweep_dir / ".submitit").rglob("*_log.*"))
    assert "preemption checkpoint written" in logs and "Requeued job" in logs


@pytest.mark.slurm
@needs_slurm
def test_ddp_job_preempted_and_resumed_and_a_failing_point_is_loud(tmp_path):
    """trainer=ddp_cpu: 2 tasks on the node. Rank 0's process alone gets USR2 (both ranks must still stop
    after the same step, or the other waits forever in a collective). The invalid point fails in its job:
    traceback in its own log, Slurm exit code non-zero, 'failed (reason)' in the sweep's table, a
    non-zero sweep, and `report` lists it beside the results."""
    sweep_dir = tmp_path / "sweep"
    proc = sweep(sweep_dir, ["trainer=ddp_cpu", "logger=csv", "method.vsd_weight=1,-1"])
    jobs = job_ids(sweep_dir, proc, 2)
    wait_for(sweep_dir / "0" / "checkpoints" / "step000002.ckpt", proc)
    os.kill(rank_pid(jobs[0], 0), signal.SIGUSR2)  # rank 1 never sees the signal: it must follow rank 0
    start_requeued_now(jobs[0], proc)
    out = finish(proc, sweep_dir)
    assert proc.returncode != 0, "a sweep with a failed job must not exit 0"
    table = (sweep_dir / "jobs.md").read_text()
    assert "| 0 | " + jobs[0] + " | method.vsd_weight=1 | finished, preempted and requeued 1x | 2 |" in table, table
    assert re.search(rf"\| 1 \| {jobs[1]} \| method.vsd_weight=-1 \| failed \| 1 \| .*ConfigError: .*method.vsd_weight=-1 is negative", table), table
    assert "method.vsd_weight=-1" in out
    assert job_field(jobs[1], "ExitCode") not in ("", "0:0"), "Slurm recorded the failed job as a success"
    own_log = "".join(p.read_text() for p in (sweep_dir / ".submitit" / jobs[1]).glob("*_log.*"))
    assert "Traceback" in own_log and "ConfigError" in own_log
    summary = json.loads((sweep_dir / "0" / "summary.json").read_text())
    assert summary["steps"] == STEPS and summary["attempts"] == 2
    steps = [s for s, _ in journal_rows(sweep_dir / "0" / "csv")]
    assert steps == list(range(STEPS)), "rows lost or duplicated across the DDP job's attempts"
    ranks = [json.loads((sweep_dir / "0" / "ranks" / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert ranks[0]["trained_sha256"] == ranks[1]["trained_sha256"] and ranks[0]["global_step"] == STEPS
    (failed,) = unfinished_runs(sweep_dir)
    assert failed["status"] == "failed" and "vsd_weight" in failed["reason"]


@pytest.mark.slurm
@needs_slurm
def test_request_larger_than_any_node_stops_before_submitting(tmp_path):
    sweep_dir = tmp_path / "sweep"
    proc = sweep(sweep_dir, ["logger=csv", "hydra.launcher.cpus_per_task=8", "hydra.launcher.mem_gb=128", "seed=1,2"])
    out = finish(proc, sweep_dir, timeout=120)
    assert proc.returncode != 0
    assert "hydra.launcher.cpus_per_task=8" in out and "hydra.launcher.mem_gb=128" in out, out[-3000:]
    assert "submitted #" not in out


def test_config_error_is_what_the_check_raises(monkeypatch):
    import osediff_lab.slurm as slurm

    monkeypatch.setattr(slurm, "sinfo_nodes", lambda: (NODES, "cpu"))
    with pytest.raises(ConfigError, match="hydra.launcher.mem_gb"):
        slurm.check_request(OK | {"mem_gb": 64})
