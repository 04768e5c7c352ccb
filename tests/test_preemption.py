"""Preemption and requeue on the tiny preset, without Slurm: a signalled attempt checkpoints, writes no
summary or export and exits with PREEMPTED_EXIT_CODE; the attempt that finishes sums every attempt; a
signal at max_steps finishes the run; W&B keeps one strictly increasing history, read back from its
offline files and compared with the CSV journal, even when its service dies with the job's processes."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch

import osediff_lab.train as train_mod
from helpers import compose_config
from osediff_lab.lit.loggers import journal_rows, read_delivered
from osediff_lab.lit.resume import PREEMPTED_EXIT_CODE
from wandb_files import history_matches_journal, read_history

STEPS = 6
BASE = ["model=tiny", "data=demo", "loss.lpips.pretrained=false", "loss.lpips.net=alex", "data.crop_size=64",
        "data.batch_size=2", "callbacks.samples.every_n_steps=2", "callbacks.checkpoint.every_n_train_steps=2",
        "trainer.log_every_n_steps=1", "trainer.enable_progress_bar=false", f"trainer.max_steps={STEPS}"]


class SignalAt(pl.Callback):
    """Sends ``signum`` to this process at the end of generator step ``step`` (what Slurm would do)."""

    def __init__(self, step: int, signum: int) -> None:
        self.step, self.signum = step, signum

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step == self.step:
            os.kill(os.getpid(), self.signum)
            time.sleep(0.05)  # the Python handler runs before the next callback


@pytest.fixture
def signal_at(monkeypatch):
    """Make the next run() signal itself at a given step (the signaller runs before Preemption)."""

    build = train_mod.build_callbacks

    def arm(step: int, signum: int) -> None:
        def with_signal(cfg, run_dir, preemption):
            callbacks, samples = build(cfg, run_dir, preemption)
            return [SignalAt(step, signum), *callbacks], samples

        monkeypatch.setattr(train_mod, "build_callbacks", with_signal)

    return arm


def wandb_matches_csv(run_dir: Path) -> list[dict]:
    run_id = (run_dir / "wandb_run_id.txt").read_text().strip()
    history = read_history(run_dir / "wandb", run_id)
    journal = journal_rows(run_dir / "csv")
    assert journal and history
    assert history_matches_journal(history, journal) == []
    return history


@pytest.mark.slow
def test_preempted_attempt_writes_nothing_final_and_the_last_attempt_sums_all(tmp_path, signal_at, single_thread):
    cfg = compose_config([*BASE, "logger=wandb"], tmp_path)
    signal_at(3, signal.SIGUSR2)
    with pytest.raises(SystemExit) as stop:
        train_mod.run(cfg)
    assert stop.value.code == PREEMPTED_EXIT_CODE
    assert not (tmp_path / "summary.json").exists(), "a preempted attempt must not write the run's summary"
    assert not (tmp_path / "lora").exists(), "a preempted attempt must not export LoRA weights"
    ckpt = torch.load(tmp_path / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert ckpt["global_step"] == 3
    first = ckpt["callbacks"]["RunStats"]
    assert first["attempts"] == 1 and first["wall_time_s"] > 0

    signal_at(-1, signal.SIGUSR2)  # the requeued attempt runs undisturbed
    start = time.monotonic()
    summary = train_mod.train(cfg)
    second_wall = time.monotonic() - start
    assert summary["steps"] == STEPS and summary["attempts"] == 2
    assert summary["wall_time_s"] >= first["wall_time_s"] + 0.5 * second_wall, "wall time of attempt 1 lost"
    assert "train/loss_total" in summary["last_metrics"]
    assert json.loads((tmp_path / "summary.json").read_text())["attempts"] == 2
    assert (tmp_path / "lora" / "osediff_lora.safetensors").is_file()

    assert len(list((tmp_path / "wandb").glob("offline-run-*"))) == 2, "each attempt is one offline folder"
    assert not (tmp_path / "wandb_unfinished").exists(), "a preempted attempt finishes its W&B run"
    history = wandb_matches_csv(tmp_path)
    assert [r["_step"] for r in history] == list(range(STEPS)), "one W&B row per step, across both attempts"
    assert sum(any(k.startswith("samples/lq_sr_hq") for k in r) for r in history) >= 2, "grids of both attempts"


@pytest.mark.slow
def test_signal_at_max_steps_finishes_instead_of_requeueing(tmp_path, signal_at, single_thread, caplog):
    cfg = compose_config([*BASE, "logger=csv"], tmp_path)
    signal_at(STEPS, signal.SIGUSR2)
    with caplog.at_level(logging.WARNING):
        summary = train_mod.train(cfg)
    assert summary["steps"] == STEPS and summary["attempts"] == 1
    assert (tmp_path / "summary.json").is_file() and (tmp_path / "lora").is_dir()
    assert "finishing the run instead of requeueing" in caplog.text


@pytest.mark.slow
def test_wandb_service_killed_with_the_job_loses_no_row(tmp_path):
    """SIGTERM to the whole process group, as `scontrol requeue` does: wandb's service dies with the job.
    The job still checkpoints and exits PREEMPTED_EXIT_CODE; the next attempt sends W&B the rows it lost."""
    env = os.environ | {"WANDB_MODE": "offline", "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    args = [sys.executable, "-m", "osediff_lab.train", *BASE[1:], "logger=wandb", "callbacks.samples.every_n_steps=0",
            f"hydra.run.dir={tmp_path}"]
    proc = subprocess.Popen(args, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    deadline = time.time() + 300
    while not (tmp_path / "checkpoints" / "step000002.ckpt").exists():
        assert proc.poll() is None and time.time() < deadline, proc.stdout.read()[-3000:] if proc.poll() else "timeout"
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGTERM)
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == PREEMPTED_EXIT_CODE, out[-3000:]
    assert "preemption checkpoint written" in out
    assert out.count("W&B stopped working") <= 1, "say it once"
    assert not (tmp_path / "summary.json").exists()

    resumed = subprocess.run(args, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    history = wandb_matches_csv(tmp_path)
    assert [r["_step"] for r in history] == list(range(STEPS))
    kept = sorted(p.name for p in (tmp_path / "wandb").glob("offline-run-*"))
    assert kept == read_delivered(tmp_path)["finished"], "only finished W&B runs stay in wandb/ (what `wandb sync` uploads)"
    assert json.loads((tmp_path / "summary.json").read_text())["attempts"] == 2
