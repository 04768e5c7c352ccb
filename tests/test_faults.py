"""Fault tolerance on the tiny preset: SIGKILL + resume, preemption signals, atomic and corrupt
checkpoints, non-finite numbers, broken W&B, full disk."""

from __future__ import annotations

import csv
import errno
import json
import logging
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from helpers import TINY, compose_config
from osediff_lab.lit.callbacks import AtomicCheckpointIO
from osediff_lab.lit.optimization import NonFiniteLossError
from osediff_lab.lit.resume import PREEMPTED_EXIT_CODE, find_resume_checkpoint
from osediff_lab.methods.osediff import OSEDiff
from osediff_lab.train import run

CLI = ["logger=csv", "loss.lpips.pretrained=false", "loss.lpips.net=alex", "data.crop_size=64", "data.batch_size=2",
       "callbacks.samples.every_n_steps=0", "callbacks.checkpoint.every_n_train_steps=1", "trainer.log_every_n_steps=1",
       "trainer.enable_progress_bar=false", "degradation=realesrgan"]
STEPS = 6


def start(output_root: Path, extra: list[str] = ()) -> subprocess.Popen:
    env = os.environ | {"WANDB_MODE": "offline", "HF_HUB_OFFLINE": "1"}
    args = [sys.executable, "-m", "osediff_lab.train", *CLI, f"trainer.max_steps={STEPS}", f"paths.output_root={output_root}", *extra]
    return subprocess.Popen(args, cwd=output_root, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def finish(proc: subprocess.Popen) -> str:
    out, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, out[-4000:]
    return out


def run_dir(output_root: Path) -> Path:
    (d,) = (output_root / "train" / "runs").iterdir()
    return d


def wait_for(path: Path, proc: subprocess.Popen, timeout: float = 300) -> None:
    end = time.time() + timeout
    while not path.exists():
        assert proc.poll() is None, "training ended before the fault could be injected"
        assert time.time() < end, f"{path} never appeared"
        time.sleep(0.05)


def losses_by_step(d: Path) -> dict[int, float]:
    with open(d / "csv" / "metrics.csv") as f:
        return {int(r["step"]): float(r["train/loss_total"]) for r in csv.DictReader(f) if r.get("train/loss_total")}


def weights(d: Path) -> dict[str, torch.Tensor]:
    return load_file(d / "lora" / "osediff_lora.safetensors")


@pytest.mark.slow
def test_sigkill_then_same_command_resumes_to_identical_result(tmp_path):
    ref_root, killed_root = tmp_path / "ref", tmp_path / "killed"
    ref_root.mkdir()
    killed_root.mkdir()
    finish(start(ref_root))
    kill_after = random.Random().randint(2, 4)
    print(f"SIGKILL after step {kill_after}")
    proc = start(killed_root)
    wait_for(killed_root / "train" / "runs", proc)
    wait_for(run_dir(killed_root) / "checkpoints" / f"step{kill_after:06d}.ckpt", proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    out = finish(start(killed_root))  # the very same command: no flag, resumes by itself
    assert "resuming automatically" in out
    ref, resumed = run_dir(ref_root), run_dir(killed_root)
    a, b = weights(ref), weights(resumed)
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a), "resumed weights differ from the uninterrupted run"
    assert losses_by_step(ref) == losses_by_step(resumed)
    assert len(losses_by_step(ref)) == STEPS


@pytest.mark.slow
def test_sigterm_checkpoints_and_exits_cleanly_then_resumes(tmp_path):
    proc = start(tmp_path)
    wait_for(tmp_path / "train" / "runs", proc)
    wait_for(run_dir(tmp_path) / "checkpoints" / "step000002.ckpt", proc)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == PREEMPTED_EXIT_CODE, out[-3000:]  # not finished: Slurm requeues, a sweep waits
    assert "preemption checkpoint written" in out
    assert not (run_dir(tmp_path) / "summary.json").exists() and not (run_dir(tmp_path) / "lora").exists()
    ckpt = torch.load(run_dir(tmp_path) / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert 2 <= ckpt["global_step"] < STEPS
    finish(start(tmp_path))
    summary = json.loads((run_dir(tmp_path) / "summary.json").read_text())
    assert summary["steps"] == STEPS


def test_interrupted_checkpoint_write_leaves_previous_intact(tmp_path, monkeypatch):
    path = tmp_path / "last.ckpt"
    io = AtomicCheckpointIO()
    io.save_checkpoint({"state_dict": {"w": torch.ones(3)}, "global_step": 1}, path)

    real = Path.write_bytes

    def dies_half_way(self: Path, data) -> int:
        real(self, b"PK\x03\x04 half a checkpoint")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(Path, "write_bytes", dies_half_way)
    with pytest.raises(OSError, match=str(path)):
        io.save_checkpoint({"state_dict": {"w": torch.zeros(3)}, "global_step": 2}, path)
    monkeypatch.undo()
    kept = torch.load(path, weights_only=False)
    assert kept["global_step"] == 1 and torch.equal(kept["state_dict"]["w"], torch.ones(3))
    assert [p.name for p in tmp_path.iterdir()] == ["last.ckpt"], "temporary file left behind"


def test_corrupt_latest_checkpoint_falls_back_to_previous(tmp_path, caplog):
    good = {"state_dict": {}, "global_step": 3, "optimizer_states": [], "loops": {}}
    torch.save(good, tmp_path / "step000003.ckpt")
    time.sleep(0.01)
    torch.save(good | {"global_step": 4}, tmp_path / "last.ckpt")
    data = (tmp_path / "last.ckpt").read_bytes()
    (tmp_path / "last.ckpt").write_bytes(data[: len(data) // 2])  # truncated
    with caplog.at_level(logging.ERROR):
        found = find_resume_checkpoint(tmp_path)
    assert found == tmp_path / "step000003.ckpt"
    assert "last.ckpt is corrupt or truncated" in caplog.text


FAST = [*TINY, "trainer.max_steps=4", "trainer.log_every_n_steps=1", "callbacks.samples.every_n_steps=0",
        "callbacks.checkpoint.every_n_train_steps=1"]


@pytest.mark.slow
def test_nonfinite_loss_skips_the_step_and_is_logged(tmp_path, monkeypatch, caplog):
    original = OSEDiff.generator_losses
    calls = {"n": 0}

    def nan_on_second_call(self, batch, embeds):
        terms, z_h = original(self, batch, embeds)
        calls["n"] += 1
        if calls["n"] == 2:
            terms["lpips"] = terms["lpips"] * float("nan")
            terms["total"] = terms["total"] + terms["lpips"]
        return terms, z_h

    monkeypatch.setattr(OSEDiff, "generator_losses", nan_on_second_call)
    with caplog.at_level(logging.WARNING):
        trainer, module, _ = run(compose_config(FAST, tmp_path))
    assert "non-finite lpips, total in the generator step" in caplog.text
    # a skipped generator step is a step (as in the release, max_steps counts batches), logged as skipped
    assert trainer.global_step == 4 and calls["n"] == 4
    with open(tmp_path / "csv" / "metrics.csv") as f:
        skipped = [float(r["train/skipped_generator"]) for r in csv.DictReader(f) if r.get("train/skipped_generator")]
    assert skipped == [0.0, 1.0, 0.0, 0.0]
    assert all(torch.isfinite(p).all() for p in module.trained_state_dict().values())


@pytest.mark.slow
def test_too_many_bad_steps_stop_with_clear_error_keeping_last_good_checkpoint(tmp_path, monkeypatch):
    original = OSEDiff.generator_losses
    calls = {"n": 0}

    def nan_from_third(self, batch, embeds):
        terms, z_h = original(self, batch, embeds)
        calls["n"] += 1
        if calls["n"] >= 3:
            terms["total"] = terms["total"] * float("inf")
        return terms, z_h

    monkeypatch.setattr(OSEDiff, "generator_losses", nan_from_third)
    cfg = compose_config([*FAST, "trainer.max_steps=6", "optim.max_consecutive_bad_steps=3"], tmp_path)
    with pytest.raises(NonFiniteLossError, match="3 consecutive non-finite steps"):
        run(cfg)
    assert calls["n"] == 5  # two good steps, then the third bad one in a row stops the run
    last = torch.load(tmp_path / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert last["global_step"] == 4  # the skipped steps 3 and 4 left the weights of step 2
    assert all(torch.isfinite(v).all() for v in last["state_dict"].values())


def test_wandb_online_without_key_falls_back_to_csv(tmp_path, monkeypatch, caplog):
    from omegaconf import OmegaConf

    from osediff_lab.lit.loggers import build_logger

    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.netrc credentials
    cfg = OmegaConf.create({"logger": {"_target_": "osediff_lab.lit.loggers.wandb_logger", "name": "wandb", "project": "p",
                                       "mode": "online", "group": "g", "tags": [], "job_type": "train"}})
    with caplog.at_level(logging.WARNING):
        logger = build_logger(cfg, tmp_path / "run")
    from pytorch_lightning.loggers import CSVLogger, WandbLogger

    assert isinstance(logger, CSVLogger) and not isinstance(logger, WandbLogger)
    assert caplog.text.count("W&B logging unavailable") == 1


@pytest.mark.slow
def test_full_disk_while_writing_samples_is_reported_and_training_continues(tmp_path, monkeypatch, caplog):
    import osediff_lab.lit.callbacks as callbacks

    def no_space(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(callbacks, "save_image", no_space)
    cfg = compose_config([*FAST, "callbacks.samples.every_n_steps=2"], tmp_path)
    with caplog.at_level(logging.ERROR):
        trainer, _, _ = run(cfg)
    assert trainer.global_step == 4
    assert "sample grid not written" in caplog.text and str(tmp_path / "samples") in caplog.text


def _loader(tmp_path, overrides):
    from osediff_lab.data.datamodule import HQDataModule

    cfg = compose_config([*TINY, "data.num_workers=1", *overrides], tmp_path)
    dm = HQDataModule(cfg.data, seed=cfg.seed)
    dm.setup("fit")
    return dm.train_dataloader()


def test_worker_crash_is_a_clear_error_not_a_hang(tmp_path, monkeypatch):
    """Also after a first fit in the process: Lightning's signal connector then puts SIGCHLD back to the default
    it found, which removes torch's once-per-process dead-worker handler (the timeout is 600 s)."""
    from osediff_lab.data.datasets import HQCropDataset

    next(iter(_loader(tmp_path, [])))  # a first multi-worker loader: torch installs its SIGCHLD handler
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)  # what Lightning's SignalConnector.teardown does after a fit
    monkeypatch.setattr(HQCropDataset, "__getitem__", lambda self, i: os._exit(3))
    start_time = time.time()
    with pytest.raises(RuntimeError, match="DataLoader worker"):  # not "timed out after 60 seconds"
        next(iter(_loader(tmp_path, ["data.worker_timeout_s=60"])))
    assert time.time() - start_time < 30


@pytest.mark.slow
def test_stuck_worker_times_out_with_the_configured_limit(tmp_path, monkeypatch):
    from osediff_lab.data.datasets import HQCropDataset

    monkeypatch.setattr(HQCropDataset, "__getitem__", lambda self, i: time.sleep(30))
    with pytest.raises(RuntimeError, match=r"timed out after 1(\.0)? seconds"):
        next(iter(_loader(tmp_path, ["data.worker_timeout_s=1"])))


def test_wandb_unwritable_directory_falls_back_to_csv(tmp_path, caplog):
    from omegaconf import OmegaConf
    from pytorch_lightning.loggers import CSVLogger, WandbLogger

    from osediff_lab.lit.loggers import build_logger

    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "wandb").write_text("a file where W&B needs its directory")  # unwritable even for root
    cfg = OmegaConf.create({"logger": {"_target_": "osediff_lab.lit.loggers.wandb_logger", "name": "wandb", "project": "p",
                                       "mode": "offline", "group": "g", "tags": [], "job_type": "train"}})
    with caplog.at_level(logging.WARNING):
        logger = build_logger(cfg, run_dir)
    assert isinstance(logger, CSVLogger) and not isinstance(logger, WandbLogger)
