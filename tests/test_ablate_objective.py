"""+experiment=ablate_objective: it declares its 12-run sweep (4 objectives x 3 seeds), and every arm is the same nano
recipe (base, data, degradation, steps, batch, crops, validation, learning rate) with its own method, passing the config
checks; the shipped reference curves are those arms' (one file per method, 3 seeds, the recipe's steps)."""

from __future__ import annotations

import json

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra

from helpers import compose_config
from osediff_lab.checks import config_problems
from osediff_lab.curves import REFERENCE_DIR
from osediff_lab.paths import CONF_DIR

ARMS = {"vsd": "osediff.OSEDiff", "csd": "pisasr.PiSASR", "gan": "hypir.HYPIR", "vsd_gan": "osediff_gan.OSEDiffGAN"}
METHODS = {"vsd": "osediff", "csd": "pisasr_pixel", "gan": "hypir", "vsd_gan": "osediff_gan"}


def test_the_experiment_declares_four_arms_times_three_seeds():
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose(config_name="train", overrides=["+experiment=ablate_objective"], return_hydra_config=True)
    params = cfg.hydra.sweeper.params
    assert str(cfg.hydra.mode) == "RunMode.MULTIRUN"
    assert params["+objective"].split(",") == list(ARMS) and params.seed.split(",") == ["1", "2", "3"]


@pytest.mark.parametrize("arm", list(ARMS))
def test_every_arm_is_the_same_recipe_with_its_method(arm, tmp_path):
    cfg = compose_config(["+experiment=ablate_objective", f"+objective={arm}"], tmp_path)
    assert cfg.method._target_ == f"osediff_lab.methods.{ARMS[arm]}"
    shared = (cfg.model.name, cfg.data.name, cfg.degradation._target_, cfg.trainer.max_steps, cfg.data.batch_size,
              cfg.data.crop_size, cfg.val.name, cfg.val.every_n_steps, cfg.method.optim.generator.lr, cfg.method.lpips_weight)
    assert shared == ("nano", "demo", compose_config(["+experiment=demo"]).degradation._target_, 100, 4, 64, "demo", 50,
                      1e-3, 0)
    assert all(group.lr == 1e-3 for group in cfg.method.optim.values())
    assert config_problems(cfg) == []


@pytest.mark.parametrize("arm", list(ARMS))
def test_the_shipped_reference_curves_are_the_arms(arm):
    ref = json.loads((REFERENCE_DIR / f"nano_{METHODS[arm]}.json").read_text())
    assert ref["seeds"] == ["1", "2", "3"] and ref["arm"] == f"objective={arm}" and ref["steps"] == 100
    psnr = ref["quantities"]["val/psnr"]
    assert psnr["steps"] == [49, 99] and all(lo <= m <= hi for lo, m, hi in zip(psnr["min"], psnr["mean"], psnr["max"], strict=True))
