"""Every experiment config composes; bad configs fail before training with a message naming the key."""

from __future__ import annotations

from pathlib import Path

import pytest
from hydra.errors import ConfigCompositionException
from omegaconf import OmegaConf

from helpers import TINY, compose_config
from osediff_lab.checks import config_problems, validate_config
from osediff_lab.errors import ConfigError
from osediff_lab.paths import CONF_DIR

EXPERIMENTS = sorted(p.stem for p in (CONF_DIR / "experiment").glob("*.yaml"))


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_every_experiment_composes(name, tmp_path):
    cfg = compose_config([f"+experiment={name}"], tmp_path)
    assert cfg.task_name
    assert cfg.model.name in {p.stem for p in (CONF_DIR / "model").glob("*.yaml")}


# experiment: (its base model's tiny twin, the recipe's UNet/transformer LoRA rank: S3Diff 32, the paper 4, TSD-SR 64)
BACKBONE_EXPERIMENTS = {"osediff_sd_turbo": ("tiny_sd_turbo", 32), "osediff_sdxl": ("tiny_sdxl", 4), "osediff_sd3": ("tiny_sd3", 64)}


@pytest.mark.parametrize(("name", "twin", "rank"), [(k, *v) for k, v in sorted(BACKBONE_EXPERIMENTS.items())])
def test_backbone_experiments_pass_the_checks_and_build_on_their_tiny_twin(name, twin, rank, tmp_path):
    """Each backbone's recipe (ranks, LoRA targets, timesteps, precision) on its base model's tiny twin: the checks
    pass and the method builds, every adapter group the recipe names wrapping some layer."""
    cfg = compose_config([f"+experiment={name}", f"model={twin}", "data=demo", "val=none", "prompt=none",
                          "degradation=bicubic", "trainer=cpu", "trainer.precision=32", "generator.frozen_dtype=fp32",
                          "loss.lpips.pretrained=false", "loss.lpips.net=alex", "data.crop_size=64"], tmp_path)
    from osediff_lab.train import build_module

    assert config_problems(cfg) == []
    method = build_module(cfg).method
    assert method.generator.timestep == cfg.generator.timestep == 999
    assert method.lora_targets["unet.default_encoder"] and method.lora_targets["unet.default_decoder"]
    to_q = next(m for n, m in method.generator.unet.named_modules() if n.endswith("to_q"))
    assert set(to_q.r.values()) == {rank}
    if twin == "tiny_sd3":  # TSD-SR's targets reach the context stream
        assert any(n.endswith("add_q_proj") for n in method.lora_targets["unet.default_encoder"])


LOSS_ARMS = {p.stem: OmegaConf.load(p) for p in (CONF_DIR / "method").glob("osediff_*.yaml")
             if list(OmegaConf.load(p).get("defaults", [])) == ["osediff", "_self_"]}


def test_the_loss_arms_are_options_of_the_method():
    assert set(LOSS_ARMS) == {"osediff_no_vsd", "osediff_vsd_image"}


@pytest.mark.slow
@pytest.mark.parametrize("arm", sorted(LOSS_ARMS))
@pytest.mark.parametrize("name", EXPERIMENTS)
def test_a_loss_arm_keeps_what_defines_it_under_every_experiment(name, arm, tmp_path):
    """method=osediff_no_vsd means no VSD under any experiment: the values an arm's file sets over its parent survive the
    experiment's own method settings (the demo's vsd_weight once turned the no-VSD arm back on)."""
    cfg = compose_config([f"+experiment={name}", f"method={arm}"], tmp_path)
    own = {k: v for k, v in LOSS_ARMS[arm].items() if k != "defaults"}
    assert own and {k: cfg.method[k] for k in own} == own


@pytest.mark.slow
def test_the_no_vsd_arm_of_the_demo_trains_without_vsd(tmp_path):
    from osediff_lab.train import build_module

    weights = {arm: build_module(compose_config(["+experiment=demo", f"method={arm}"], tmp_path)).method.weights["vsd"]
               for arm in ("osediff", "osediff_no_vsd")}
    assert weights == {"osediff": 0.02, "osediff_no_vsd": 0.0}


def test_demo_experiment_is_runnable_here(tmp_path):
    cfg = compose_config(["+experiment=demo"], tmp_path)
    assert config_problems(cfg) == []
    assert cfg.model.name == "nano" and cfg.data.name == "demo" and cfg.val.name == "demo"
    assert cfg.method.lpips_weight == 0  # no random perceptual network in the demo: a real one or none


def test_ablate_vsd_declares_its_sweep(tmp_path):
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose(config_name="train", overrides=["+experiment=ablate_vsd"], return_hydra_config=True)
    assert str(cfg.hydra.mode) == "RunMode.MULTIRUN"
    assert set(cfg.hydra.sweeper.params.method.split(",")) == {"osediff", "osediff_no_vsd", "osediff_vsd_image"}
    assert cfg.model.name == "sd21_base" and cfg.data.name == "lsdir"


def test_missing_weights_and_data_named_before_work(tmp_path, monkeypatch):
    monkeypatch.delenv("OSEDIFF_SD21_BASE", raising=False)
    monkeypatch.delenv("OSEDIFF_LSDIR", raising=False)
    cfg = compose_config(["+experiment=ablate_vsd", "loss.lpips.pretrained=false"], tmp_path)
    with pytest.raises(ConfigError) as err:
        validate_config(cfg)
    msg = str(err.value)
    assert "model.pretrained_path" in msg and "OSEDIFF_SD21_BASE" in msg
    assert "data.root" in msg and "OSEDIFF_LSDIR" in msg
    assert "model=tiny data=demo" in msg
    assert "ram_swin_large_14m.pth" in msg and "prompt=dape_tiny" in msg  # DAPE weights, also before any work


def test_missing_path_on_disk_named(tmp_path):
    cfg = compose_config(["model=sd21_base", f"model.pretrained_path={tmp_path / 'nope'}", *TINY[1:]], tmp_path)
    problems = " ".join(config_problems(cfg))
    assert str(tmp_path / "nope" / "unet") in problems


def test_unknown_preset_is_rejected():
    with pytest.raises(ConfigCompositionException, match="model"):
        compose_config(["model=does_not_exist"])


@pytest.mark.parametrize(
    ("override", "key"),
    [
        ("method.lpips_weight=-1", "method.lpips_weight"),
        ("method.vsd_weight=-0.5", "method.vsd_weight"),
        ("method.optim.regularizer.updates=0", "method.optim.regularizer.updates"),
        ("method.vsd_t_max=2000", "method.vsd_t_max"),
        ("generator.lora.unet_rank=0", "generator.lora.unet_rank"),
        ("data.crop_size=100", "data.crop_size"),
        ("generator.frozen_dtype=bf16", "trainer.precision"),
    ],
)
def test_bad_values_name_their_key(override, key, tmp_path):
    cfg = compose_config([*TINY, override], tmp_path)
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        validate_config(cfg)


def test_crop_larger_than_images_without_policy_names_key(tmp_path):
    from osediff_lab.data.datamodule import HQDataModule

    cfg = compose_config([*TINY, "data.crop_size=1024", "data.small_image_policy=error"], tmp_path)
    with pytest.raises(ConfigError, match=r"data\.crop_size=1024.*data\.small_image_policy"):
        HQDataModule(cfg.data).setup("fit")


def test_lpips_weights_missing_is_reported(tmp_path):
    cfg = compose_config([*TINY, "loss.lpips.pretrained=true", f"paths.weights_dir={tmp_path}"], tmp_path)
    problems = " ".join(config_problems(cfg))
    assert str(Path(tmp_path) / "torch_hub" / "checkpoints") in problems and "loss.lpips.pretrained=false" in problems


@pytest.mark.parametrize("name", sorted(p.stem for p in (CONF_DIR / "trainer").glob("*.yaml")))
def test_every_trainer_preset_resolves_to_trainer_arguments(name, tmp_path):
    import inspect

    import pytorch_lightning as pl
    from omegaconf import OmegaConf

    kwargs = OmegaConf.to_container(compose_config([f"trainer={name}"], tmp_path).trainer, resolve=True)
    accepted = set(inspect.signature(pl.Trainer).parameters)
    assert set(kwargs) <= accepted, set(kwargs) - accepted
    assert all(v is not None for k, v in kwargs.items() if k in ("devices", "num_nodes", "accelerator"))
