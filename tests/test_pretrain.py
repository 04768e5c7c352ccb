"""Pretraining a base model (osediff_lab.pretrain) and the shipped nano base (model=nano)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from omegaconf import DictConfig, OmegaConf
from safetensors.torch import load_file

from helpers import compose_config
from osediff_lab.data.heldout import HeldOutCrops, tile_corners
from osediff_lab.models.components import build_components, load_pretrained
from osediff_lab.paths import CONF_DIR
from osediff_lab.pretrain import StepSampler, lr_factor, pretrain
from osediff_lab.resolvers import asset

NANO = Path(asset("nano"))
# A micro architecture so each stage takes seconds: the same classes and code path as the nano config.
MICRO = [
    "arch.vae.down_block_types=[DownEncoderBlock2D,DownEncoderBlock2D]",
    "arch.vae.up_block_types=[UpDecoderBlock2D,UpDecoderBlock2D]",
    "arch.vae.block_out_channels=[8,16]",
    "arch.unet.block_out_channels=[16,16,16]",
    "arch.unet.norm_num_groups=8",
    "arch.unet.attention_head_dim=[1,1,1]",
    "vae.batch_size=2", "vae.crop_size=32", "vae.scale_batches=1", "vae.warmup_steps=1", "vae.ckpt_every=2",
    "unet.batch_size=2", "unet.crop_size=32", "unet.warmup_steps=1", "unet.ckpt_every=2",
    "samples.num=2", "samples.nrow=2", "samples.size=32", "samples.steps=3",
    "val.grid=1", "progress_bar=false",
]


def pretrain_cfg(tmp_path: Path, *overrides: str) -> DictConfig:
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose(config_name="pretrain", overrides=[*MICRO, f"out_dir={tmp_path}", *overrides])
    return cfg


def test_stages_write_a_folder_that_sd21_base_loads(tmp_path, single_thread):
    pretrain(pretrain_cfg(tmp_path, "stage=vae", "vae.max_steps=3"))
    report = pretrain(pretrain_cfg(tmp_path, "stage=unet", "unet.max_steps=3"))
    assert report["vae"]["steps"] == 3 and report["unet"]["steps"] == 3
    assert report["vae"]["scaling_factor"] != 1.0  # measured from the latents, not the config's placeholder
    assert 0 < report["vae"]["heldout_recon_psnr_y"] < 100 and report["vae"]["heldout_bicubic_psnr_y"] > 15
    assert report["unet"]["config"]["stage"] == "unet" and report["vae"]["config"]["vae"]["max_steps"] == 3
    cfg = compose_config(["model=sd21_base", f"model.pretrained_path={tmp_path / 'model'}"])
    comps = build_components(cfg.model)
    assert comps.vae.config.latent_channels == 4 and comps.scheduler.config.prediction_type == "epsilon"
    assert comps.scaling_factor == pytest.approx(report["vae"]["scaling_factor"])
    samples = pretrain(pretrain_cfg(tmp_path, "stage=samples"))["samples"]
    assert Path(samples["path"]).is_file() and samples["steps"] == 3


def test_unet_stage_needs_the_vae_stage(tmp_path):
    with pytest.raises(Exception, match="stage=vae"):
        pretrain(pretrain_cfg(tmp_path, "stage=unet"))


@pytest.mark.slow
def test_killed_stage_resumes_bit_identically(tmp_path, single_thread):
    """2 steps, then the same command with max_steps=4 == 4 steps in one go (weights and optimiser)."""
    pretrain(pretrain_cfg(tmp_path / "a", "stage=vae", "vae.max_steps=2"))
    pretrain(pretrain_cfg(tmp_path / "a", "stage=vae", "vae.max_steps=4"))
    pretrain(pretrain_cfg(tmp_path / "b", "stage=vae", "vae.max_steps=4"))
    a = torch.load(tmp_path / "a" / "checkpoints" / "vae" / "last.pt", weights_only=False)
    b = torch.load(tmp_path / "b" / "checkpoints" / "vae" / "last.pt", weights_only=False)
    assert a["step"] == b["step"] == 4
    for k, v in b["model"].items():
        assert torch.equal(a["model"][k], v), k
    # without resume the second command starts over and differs from the 4-step run
    pretrain(pretrain_cfg(tmp_path / "a", "stage=vae", "vae.max_steps=2", "resume=false"))
    c = torch.load(tmp_path / "a" / "checkpoints" / "vae" / "last.pt", weights_only=False)
    assert c["step"] == 2


@pytest.mark.slow
def test_a_preemption_signal_checkpoints_and_the_rerun_finishes(tmp_path, single_thread, monkeypatch):
    """SIGUSR1 (what Slurm sends before a time limit) during step 2 of 5: the stage stops after that step with a
    checkpoint whose file loads with weights_only=True, and the same command then finishes the run."""
    import os
    import signal

    import osediff_lab.pretrain as pretrain_module

    calls, losses = [0], pretrain_module.vae_losses

    def signalled_losses(*args):
        calls[0] += 1
        if calls[0] == 2:
            os.kill(os.getpid(), signal.SIGUSR1)
        return losses(*args)

    monkeypatch.setattr(pretrain_module, "vae_losses", signalled_losses)
    report = pretrain(pretrain_cfg(tmp_path, "stage=vae", "vae.max_steps=5"))
    ckpt = tmp_path / "checkpoints" / "vae" / "last.pt"
    assert torch.load(ckpt, weights_only=True)["step"] == 2 and not report["vae"]["finished"]
    assert signal.getsignal(signal.SIGUSR1) in (signal.SIG_DFL, signal.default_int_handler, None)
    report = pretrain(pretrain_cfg(tmp_path, "stage=vae", "vae.max_steps=5"))
    assert report["vae"]["finished"] and torch.load(ckpt, weights_only=True)["step"] == 5


def test_step_sampler_covers_each_file_once_per_epoch_and_restarts_mid_epoch():
    it = iter(StepSampler(5, seed=3))
    first = [next(it) for _ in range(10)]
    assert sorted(i % 5 for i in first[:5]) == list(range(5)) and all(i >= 5 for i in first[5:])
    again = iter(StepSampler(5, seed=3, start=7))
    assert [next(again) for _ in range(3)] == first[7:10]


def test_lr_schedule():
    assert lr_factor(0, 10, 100, "cosine") == pytest.approx(0.1)
    assert lr_factor(10, 10, 100, "cosine") == pytest.approx(1.0)
    assert lr_factor(100, 10, 100, "cosine") == pytest.approx(0.1)
    assert lr_factor(50, 10, 100, "constant") == 1.0


def test_heldout_crops_are_fixed_and_not_training_images():
    cfg = compose_config(["val=demo"])
    assert not set(cfg.val.images) & set(cfg.data.images)
    assert tile_corners(300, 128, 2) == [0, 172] and tile_corners(300, 128, 1) == [86]
    from osediff_lab.data.demo_images import demo_files

    ds = HeldOutCrops(demo_files(list(cfg.val.images)), 128, 2, 4)
    assert len(ds) == 8
    item = ds[0]
    assert item["hq"].shape == (3, 128, 128) and item["lq"].shape == (3, 32, 32)
    assert torch.equal(ds[0]["hq"], HeldOutCrops(demo_files(list(cfg.val.images)), 128, 2, 4)[0]["hq"])


# ---- the shipped nano base ----------------------------------------------------------------------
def test_shipped_nano_matches_its_checksums_and_stays_small():
    sums = (NANO / "SHA256SUMS").read_text().split("\n")
    entries = [line.split("  ", 1) for line in sums if line.strip()]
    assert len(entries) >= 10
    total = 0
    for digest, name in entries:
        data = (NANO / name).read_bytes()
        total += len(data)
        assert hashlib.sha256(data).hexdigest() == digest, name
    assert total < 12 * 2**20, f"nano base is {total / 2**20:.1f} MB"
    report = json.loads((NANO / "pretrain_report.json").read_text())
    assert report["vae"]["finished"] and report["unet"]["steps"] >= 200  # the UNet stopped early: README.md


def test_model_nano_loads_the_shipped_folder_as_sd21_base_would():
    cfg = compose_config(["model=nano"])
    assert Path(cfg.model.pretrained_path) == NANO
    comps = build_components(cfg.model)
    same = load_pretrained(NANO)
    weights = load_file(NANO / "unet" / "diffusion_pytorch_model.safetensors")
    for k, v in comps.denoiser.state_dict().items():
        assert torch.equal(v, weights[k]) and torch.equal(v, same.denoiser.state_dict()[k]), k
    assert not any(p.requires_grad for p in comps.denoiser.parameters())
    assert OmegaConf.select(cfg, "model.source") == "pretrained"


def test_nano_vae_reconstructs_heldout_crops_better_than_bicubic(single_thread):
    """The property the demo needs: the frozen decoder's ceiling on held-out crops is above bicubic x4."""
    from osediff_lab.pretrain import heldout_reconstruction

    cfg = compose_config(["val=demo", "model=nano"])
    comps = load_pretrained(NANO)
    got = heldout_reconstruction(comps.vae, cfg)
    report = json.loads((NANO / "pretrain_report.json").read_text())
    assert got["heldout_recon_psnr_y"] == pytest.approx(report["vae"]["heldout_recon_psnr_y"], abs=1e-3)
    assert got["heldout_recon_psnr_y"] > got["heldout_bicubic_psnr_y"] + 1.5
