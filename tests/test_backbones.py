"""Backbones beyond SD2.1-base on its architecture: a non-epsilon (v-prediction) model trains OSEDiff and reloads for
inference, its sidecar naming the prediction type (PiSA-SR on it: tests/test_backbone_matrix.py); a pretrained folder keeps the scheduler class and prediction type it was saved with; the
SD-Turbo preset names its missing folder and the fix; a rectified-flow scheduler is refused on the UNet path."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from diffusers import DDPMScheduler, EulerDiscreteScheduler
from omegaconf import open_dict

from helpers import TINY, compose_config
from osediff_lab.backbones.schedules import EpsilonSchedule, VPredictionSchedule
from osediff_lab.checks import config_problems
from osediff_lab.errors import ConfigError
from osediff_lab.models.components import build_components, check_compatible, save_pretrained
from osediff_lab.models.osediff import build_generator
from osediff_lab.pipeline import SRPipeline
from osediff_lab.train import run

pytestmark = pytest.mark.usefixtures("single_thread")
TWIN = [*TINY, "model=tiny_sd_turbo"]
RUN = [*TWIN, "trainer.max_steps=3", "trainer.log_every_n_steps=1", "callbacks.samples.every_n_steps=0",
       "callbacks.checkpoint.every_n_train_steps=3", "trainer.enable_progress_bar=false"]


@pytest.fixture(scope="module")
def twin():
    """The tiny v-prediction components (model=tiny_sd_turbo), built once."""
    return build_components(compose_config(TWIN).model)


def test_v_prediction_twin_passes_the_check_and_gives_a_v_schedule(twin):
    assert isinstance(twin.scheduler, EulerDiscreteScheduler) and twin.scheduler.config.prediction_type == "v_prediction"
    check_compatible(twin, "tiny_sd_turbo")
    generator, _ = build_generator(twin, compose_config(TWIN).generator)
    assert type(generator.schedule) is VPredictionSchedule


@pytest.mark.slow
def test_osediff_trains_on_the_v_twin_and_its_export_reloads_for_inference(tmp_path):
    trainer, module, summary = run(compose_config(RUN, tmp_path))
    assert trainer.global_step == 3 and type(module.method.schedule) is VPredictionSchedule
    pipe = SRPipeline.from_checkpoint(summary["lora"], device="cpu")
    assert type(pipe.generator.schedule) is VPredictionSchedule
    out, _ = pipe.enhance(torch.rand(1, 3, 16, 16))
    assert out.shape == (1, 3, 64, 64) and torch.isfinite(out).all()
    assert json.loads(Path(summary["lora_sidecar"]).read_text())["prediction_type"] == "v_prediction"
    epsilon_base = save_pretrained(build_components(compose_config(TINY).model), tmp_path / "epsilon_base")
    with pytest.raises(ConfigError, match="predicting 'v_prediction', but this base predicts 'epsilon'"):
        SRPipeline.from_checkpoint(summary["lora"], base=epsilon_base, device="cpu")


@pytest.mark.parametrize(("model", "cls", "schedule"), [("tiny_sd_turbo", EulerDiscreteScheduler, VPredictionSchedule),
                                                       ("tiny", DDPMScheduler, EpsilonSchedule)])
def test_a_saved_folder_loads_with_its_scheduler_class_and_prediction_type(model, cls, schedule, tmp_path):
    saved = build_components(compose_config([*TINY, f"model={model}"]).model)
    folder = save_pretrained(saved, tmp_path / "model")
    cfg = compose_config([*TINY, "model=sd21_base", f"model.pretrained_path={folder}"], tmp_path)
    loaded = build_components(cfg.model)
    assert type(loaded.scheduler) is cls
    assert loaded.scheduler.config.prediction_type == saved.scheduler.config.prediction_type
    generator, _ = build_generator(loaded, cfg.generator)
    assert type(generator.schedule) is schedule


def test_sd_turbo_without_weights_names_the_folder_and_the_fix(monkeypatch, tmp_path):
    monkeypatch.delenv("OSEDIFF_SD_TURBO", raising=False)
    cfg = compose_config([*TINY, "model=sd_turbo"], tmp_path)
    assert any("OSEDIFF_SD_TURBO" in p for p in config_problems(cfg))  # named by the checks, before any model
    with pytest.raises(ConfigError, match="model.pretrained_path.*OSEDIFF_SD_TURBO.*SD-Turbo"):
        build_components(cfg.model)
    folder = save_pretrained(build_components(compose_config(TWIN).model), tmp_path / "turbo")
    (folder / "scheduler" / "scheduler_config.json").unlink()
    cfg = compose_config([*TINY, "model=sd_turbo", f"model.pretrained_path={folder}"], tmp_path)
    with pytest.raises(ConfigError, match=r"scheduler_config\.json.*fetch sd_turbo"):
        build_components(cfg.model)


@pytest.mark.parametrize(("key", "value", "message"), [("class_name", "FlowMatchEulerDiscreteScheduler", "rectified flow"),
                                                      ("class_name", "NoSuchScheduler", "not a diffusers scheduler"),
                                                      ("prediction_type", "sample", "prediction_type='sample'")])
def test_schedulers_the_unet_path_cannot_train_are_config_errors(key, value, message, tmp_path):
    cfg = compose_config(TWIN, tmp_path)
    with open_dict(cfg):
        cfg.model.arch.scheduler[key] = value
        if value.startswith("FlowMatch"):
            cfg.model.arch.scheduler = {"class_name": value, "num_train_timesteps": 1000, "shift": 3.0}
    with pytest.raises(ConfigError, match=message):
        build_components(cfg.model)
