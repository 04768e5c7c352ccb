"""Config groups build their components through ``_target_``: every option builds the right class, a bad
argument is a ConfigError naming its key before any model is built, and a class from outside src plugs in."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image
from pytorch_lightning.loggers import CSVLogger, WandbLogger

from helpers import TINY, compose_config
from osediff_lab.build import build, component_problems, target
from osediff_lab.checks import config_problems
from osediff_lab.data.datamodule import HQDataModule
from osediff_lab.data.degradation import BicubicDegradation, PairedOnly, build_degradation
from osediff_lab.data.images import list_images
from osediff_lab.data.realesrgan import RealESRGANDegradation, Stage
from osediff_lab.data.sources import (
    DemoImages,
    FFHQImages,
    FolderImages,
    MixedSources,
    TxtListImages,
    build_source,
    source_files,
)
from osediff_lab.errors import ConfigError
from osediff_lab.lit.loggers import JournaledWandbLogger, build_logger, close_logger, csv_logger, wandb_logger
from osediff_lab.models.components import (
    Components,
    build_components,
    pretrained_components,
    random_components,
)
from osediff_lab.paths import CONF_DIR
from osediff_lab.pipeline.colorfix import COLOR_FIXES, adain_color_fix, color_fix, wavelet_color_fix
from osediff_lab.pipeline.options import make_options
from osediff_lab.prompts import FixedPrompt, NullPrompt, build_prompt_provider, provider_from_config
from osediff_lab.prompts.dape import DapePrompt
from osediff_lab.prompts.llava import LlavaPrompt
from osediff_lab.resolvers import refuse_renamed_choices, renamed_choice_problems


class Darken:
    """A degradation defined outside src: bicubic downsampling, then every pixel ``amount`` darker ([-1, 1])."""

    def __init__(self, scale: int, amount: float) -> None:
        self.scale = scale
        self.amount = amount

    def __call__(self, hq: torch.Tensor) -> torch.Tensor:
        return BicubicDegradation(self.scale)(hq) - self.amount


class EveryNth:
    """A data source defined outside src: every ``step``-th image of ``root`` by name (it takes no name or key)."""

    def __init__(self, root: str, step: int) -> None:
        self.root = Path(root)
        self.step = step

    @classmethod
    def argument_problems(cls, args: Mapping[str, Any]) -> list[str]:
        return [] if args["step"] >= 1 else [f"data.step={args['step']} must be >= 1"]

    def files(self) -> list[Path]:
        return list_images(self.root)[:: self.step]


def journal_only(run_dir: Path, subdir: str) -> CSVLogger:
    """A logger factory defined outside src: CSV under ``<run_dir>/<subdir>``; it takes no run_config."""
    return CSVLogger(save_dir=str(run_dir), name=subdir, version="")


def no_model_built(monkeypatch) -> None:
    """Any attempt to build the base model fails the test: checks must come first."""

    def refuse(*args, **kwargs):
        raise AssertionError("a model was built before the config was checked")

    # train first: importing it while components is patched would bind the refusal there for good
    monkeypatch.setattr("osediff_lab.train.build_components", refuse)
    monkeypatch.setattr("osediff_lab.models.components.build_components", refuse)


# ---- degradation ----------------------------------------------------------------------------------
@pytest.mark.parametrize(("option", "cls"), [("bicubic", BicubicDegradation), ("none", PairedOnly),
                                             ("realesrgan", RealESRGANDegradation)])
def test_every_degradation_option_builds_its_class(option, cls):
    cfg = compose_config(TINY + [f"degradation={option}"])
    d = build_degradation(cfg.degradation, cfg.scale)
    assert type(d) is cls and d.scale == cfg.scale
    assert cfg.degradation.name == option  # the label stays for previews and checks


def test_realesrgan_settings_are_frozen_dataclasses_built_once():
    cfg = compose_config(["degradation=realesrgan", "degradation.first.blur_prob=0.5"])
    d = build_degradation(cfg.degradation, 4)
    assert isinstance(d.settings.first, Stage) and d.settings.first.blur_prob == 0.5
    assert d.settings.first.kernel_types == tuple(cfg.degradation.first.kernel_types)
    with pytest.raises(AttributeError):
        d.settings.first.blur_prob = 1.0  # type: ignore[misc]
    assert not hasattr(d, "cfg")


@pytest.mark.parametrize(
    ("override", "key"),
    [
        ("degradation.first.kernel_types=[iso,box]", "degradation.first.kernel_types"),
        ("degradation.second.resize_probs=[0.5,0.5]", "degradation.second.resize_probs"),
        ("degradation.resize_modes=[area,lanczos]", "degradation.resize_modes"),
        ("degradation.border=mirror", "degradation.border"),
        ("degradation.blur=sharp", "degradation.blur"),
        ("+degradation.first.blur_strength=2", "degradation.first"),
        ("+degradation.sharpen=true", "degradation.sharpen"),
    ],
)
def test_bad_degradation_argument_named_before_any_model(override, key, monkeypatch, tmp_path):
    no_model_built(monkeypatch)
    from osediff_lab.train import run

    cfg = compose_config(TINY + ["degradation=realesrgan", override], tmp_path)
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        run(cfg)
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        build_degradation(cfg.degradation, cfg.scale)  # building runs the same check


def test_degradation_from_outside_src_plugs_in_by_config_alone(tmp_path):
    overrides = ["degradation=bicubic", f"degradation._target_={__name__}.Darken", "+degradation.amount=0.25"]
    cfg = compose_config(TINY + overrides, tmp_path)
    assert config_problems(cfg) == []
    d = build_degradation(cfg.degradation, cfg.scale)
    assert isinstance(d, Darken) and d.amount == 0.25
    hq = torch.rand(2, 3, 32, 32) * 2 - 1
    torch.testing.assert_close(d(hq), BicubicDegradation(4)(hq) - 0.25)
    missing = compose_config(TINY + overrides[:2], tmp_path)
    assert any("degradation.amount is missing" in p for p in config_problems(missing))


def test_unknown_target_names_the_key(tmp_path):
    cfg = compose_config(TINY + ["degradation._target_=osediff_lab.data.degradation.Sharpen"], tmp_path)
    problems = component_problems(cfg.degradation, "degradation", given={"scale": 4})
    assert len(problems) == 1 and "degradation._target_=osediff_lab.data.degradation.Sharpen" in problems[0]
    with pytest.raises(ConfigError, match="degradation._target_"):
        build(cfg.degradation, "degradation", scale=4)


# ---- prompt -----------------------------------------------------------------------------------------
@pytest.mark.parametrize(("option", "cls"), [("none", NullPrompt), ("fixed", FixedPrompt), ("dape_tiny", DapePrompt),
                                             ("ram_tiny", DapePrompt), ("llava_tiny", LlavaPrompt)])
def test_every_tiny_prompt_option_builds_its_class(option, cls, tmp_path):
    cfg = compose_config(TINY + [f"prompt={option}"], tmp_path)
    assert config_problems(cfg) == []
    assert type(provider_from_config(cfg.prompt)) is cls


@pytest.mark.parametrize(("option", "file"), [("dape", "ram_swin_large_14m.pth"), ("ram", "ram_swin_large_14m.pth"),
                                              ("llava", "LLaVA checkpoint not found")])
def test_pretrained_prompt_options_name_their_missing_files_before_any_model(option, file, monkeypatch, tmp_path):
    no_model_built(monkeypatch)
    cfg = compose_config(TINY + [f"prompt={option}", f"paths.weights_dir={tmp_path}"], tmp_path)
    assert any(file in p for p in config_problems(cfg))
    with pytest.raises(ConfigError, match=file):
        provider_from_config(cfg.prompt)


@pytest.mark.parametrize("option", ["dape_tiny", "llava_tiny"])
def test_bad_prompt_argument_named_before_any_model(option, monkeypatch, tmp_path):
    no_model_built(monkeypatch)
    from osediff_lab.train import run

    for override, key in (("prompt.dtype=fp8", "prompt.dtype"), ("+prompt.temperature=0.7", "prompt.temperature")):
        cfg = compose_config(TINY + [f"prompt={option}", override], tmp_path)
        with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
            run(cfg)


def test_prompt_saved_without_target_builds_by_its_name(tmp_path):
    """LoRA sidecars of earlier runs hold the prompt config without ``_target_``."""
    saved = OmegaConf.to_container(compose_config(TINY + ["prompt=dape_tiny"], tmp_path).prompt, resolve=True)
    del saved["_target_"]
    assert type(build_prompt_provider(OmegaConf.create(saved))) is DapePrompt
    assert type(build_prompt_provider(OmegaConf.create({"name": "none"}))) is NullPrompt
    assert type(build_prompt_provider(OmegaConf.create({"name": "null"}))) is NullPrompt  # its name before prompt=none
    with pytest.raises(ConfigError, match="prompt.name 'clip'"):
        build_prompt_provider(OmegaConf.create({"name": "clip"}))


def test_prompt_null_is_refused_naming_prompt_none(capsys):
    """Hydra reads a bare `prompt=null` as 'no config' ("must be a string or a list"): each CLI stops first, naming the fix."""
    assert renamed_choice_problems(["train.py", "prompt=dape", "data.prompt=null", "method=osediff_no_vsd"]) == []
    assert renamed_choice_problems(["prompt=null"]) == ["prompt=null: the prompt option 'null' is now called 'none': prompt=none"]
    assert renamed_choice_problems(["+prompt='null',dape"]) == [
        "+prompt='null',dape: the prompt option 'null' is now called 'none': +prompt=none,dape"]
    with pytest.raises(SystemExit) as stop:
        refuse_renamed_choices(["train.py", "model=tiny", "prompt=null"])
    assert stop.value.code == 2 and "prompt=none" in capsys.readouterr().err
    refuse_renamed_choices(["train.py", "prompt=none"])  # the new name passes


@pytest.mark.slow
@pytest.mark.parametrize("module", ["train", "infer", "profile", "prompts.precompute", "data.preview"])
def test_every_cli_refuses_prompt_null_before_hydra(module, tmp_path):
    proc = subprocess.run([sys.executable, "-c", f"import runpy, sys; sys.argv = ['x', 'prompt=null']; "
                           f"runpy.run_module('osediff_lab.{module}', run_name='__main__')"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 2 and "prompt=none" in proc.stderr and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert not (tmp_path / "outputs").exists()  # stopped before Hydra made a run directory


# ---- colour fix (a registry of functions) -------------------------------------------------------------
def test_color_fix_registry_dispatches_and_names_the_key(monkeypatch):
    target, source = torch.rand(1, 3, 16, 16), torch.rand(1, 3, 16, 16)
    torch.testing.assert_close(color_fix("adain", target, source, 3), adain_color_fix(target, source))
    torch.testing.assert_close(color_fix("wavelet", target, source, 3), wavelet_color_fix(target, source, 3))
    assert color_fix("none", target, source, 3) is target
    with pytest.raises(ConfigError, match=r"pipeline\.color_fix='histogram' must be one of \['adain', 'none', 'wavelet'\]"):
        color_fix("histogram", target, source, 3)
    monkeypatch.setitem(COLOR_FIXES, "gray", lambda t, s, levels: t.mean(1, keepdim=True).expand_as(t))
    assert make_options({"color_fix": "gray"}).color_fix == "gray"  # the options check reads the registry
    assert color_fix("gray", target, source, 3).std(1).max() == 0


# ---- model ------------------------------------------------------------------------------------------
MODEL_FACTORIES = {"tiny": random_components, "sd21_shape": random_components, "tiny_sd_turbo": random_components,
                   "sd_turbo_shape": random_components, "nano": pretrained_components, "sd21_base": pretrained_components,
                   "sd_turbo": pretrained_components, "tiny_sdxl": random_components, "sdxl_shape": random_components,
                   "sdxl_base": pretrained_components, "tiny_sd3": random_components, "sd3_shape": random_components,
                   "sd3_medium": pretrained_components, "tiny_flux": random_components, "flux_shape": random_components,
                   "flux_dev": pretrained_components, "flux_schnell": pretrained_components}


def test_every_model_option_is_listed():
    assert sorted(MODEL_FACTORIES) == sorted(p.stem for p in (CONF_DIR / "model").glob("*.yaml"))


@pytest.mark.parametrize(("option", "factory"), sorted(MODEL_FACTORIES.items()))
def test_every_model_option_names_its_factory(option, factory, tmp_path):
    cfg = compose_config(TINY + [f"model={option}"], tmp_path)
    assert target(cfg.model, "model") is factory
    assert cfg.model.source in ("random", "pretrained")  # kept for the memory predictor and the sidecar


@pytest.mark.parametrize("option", ["tiny", "nano", "tiny_sd_turbo", "tiny_sdxl", "tiny_sd3", "tiny_flux"])
def test_small_model_options_build_frozen_components(option, tmp_path):
    cfg = compose_config(TINY + [f"model={option}"], tmp_path)
    components = build_components(cfg.model)
    assert isinstance(components, Components) and not any(p.requires_grad for p in components.denoiser.parameters())


def test_missing_base_weights_and_bad_model_keys_named_before_any_model(monkeypatch, tmp_path):
    monkeypatch.delenv("OSEDIFF_SD21_BASE", raising=False)
    cfg = compose_config(TINY + ["model=sd21_base"], tmp_path)
    assert any("model.pretrained_path" in p for p in config_problems(cfg))
    with pytest.raises(ConfigError, match="model.pretrained_path"):
        build_components(cfg.model)
    cfg = compose_config(TINY + ["+model.dropout=0.1"], tmp_path)
    assert any("model.dropout is not an argument" in p for p in config_problems(cfg))
    with pytest.raises(ConfigError, match="model.dropout"):
        build_components(cfg.model)


def test_model_saved_without_target_builds_by_its_source(tmp_path):
    """LoRA sidecars of earlier runs hold the model config without ``_target_`` (tiny's with pretrained_path)."""
    saved = OmegaConf.to_container(compose_config(TINY, tmp_path).model, resolve=True)
    del saved["_target_"]
    saved["pretrained_path"] = None
    assert isinstance(build_components(OmegaConf.create(saved)), Components)
    with pytest.raises(ConfigError, match="model.source"):
        build_components(OmegaConf.create({"name": "x", "source": "hub"}))


# ---- data sources -----------------------------------------------------------------------------------
def tiny(*overrides: str) -> list[str]:
    """TINY with its data or logger choice replaced by the first of ``overrides`` that names one."""
    groups = {o.split("=", 1)[0] for o in overrides if o.split("=", 1)[0] in ("data", "logger")}
    return [o for o in TINY if o.split("=", 1)[0] not in groups] + list(overrides)


@pytest.fixture
def photos(tmp_path, monkeypatch) -> Path:
    """A folder of four 80x80 photos, and no dataset variable set (so every shipped root is unset)."""
    for env in ("OSEDIFF_LSDIR", "OSEDIFF_FFHQ", "OSEDIFF_DIV2K"):
        monkeypatch.delenv(env, raising=False)
    folder = tmp_path / "photos"
    folder.mkdir()
    for i in range(4):
        Image.new("RGB", (80, 80), (40 * i, 90, 200 - 40 * i)).save(folder / f"{i:02d}.png")
    (tmp_path / "photos.txt").write_text("".join(f"photos/{i:02d}.png\n" for i in range(3)))
    return folder


@pytest.mark.parametrize(
    ("option", "cls", "settings", "key"),
    [
        ("demo", DemoImages, [], None),
        ("folder", FolderImages, ["data.root={photos}"], "data.root"),
        ("div2k", FolderImages, ["data.root={photos}"], "data.root"),
        ("lsdir", FolderImages, ["data.root={photos}"], "data.root"),
        ("ffhq", FFHQImages, ["data.root={photos}", "data.first_n=2"], "data.root"),
        ("lsdir_ffhq", MixedSources, ["data.sources.lsdir.root={photos}", "data.sources.ffhq.root={photos}",
                                      "data.sources.ffhq.first_n=2"], "data.sources.lsdir.root"),
        ("txt_list", TxtListImages, ["data.lists=[{{path: {photos}.txt, repeat: 2}}]"], "data.lists"),
    ],
)
def test_every_data_option_builds_its_source(option, cls, settings, key, photos, tmp_path):
    expected = {"demo": 12, "folder": 4, "div2k": 4, "lsdir": 4, "ffhq": 2, "lsdir_ffhq": 6, "txt_list": 6}[option]
    cfg = compose_config(tiny(f"data={option}", *(s.format(photos=photos) for s in settings)), tmp_path)
    assert config_problems(cfg) == []
    source = build_source(cfg.data)
    assert type(source) is cls and target(cfg.data, "data") is cls
    assert len(source.files()) == expected and cfg.data.name == option
    if key is not None:  # the shipped option without its root or lists: the ConfigError names the key
        unset = compose_config(tiny(f"data={option}"), tmp_path)
        assert any(key in p for p in config_problems(unset))
        with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
            source_files(unset.data)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["data=demo", "data.images=[nope.png]"], "data.images: not found"),
        (["data=ffhq", "data.root={photos}", "data.first_n=0"], "data.first_n=0 must be >= 1"),
        (["data=folder", "data.root={photos}", "+data.recursive=true"], "data.recursive is not an argument"),
        (["data=lsdir_ffhq", "data.sources=null"], "data.sources is empty: name at least one source"),
        (["data=lsdir_ffhq", "data.sources.lsdir.root={photos}", "data.sources.ffhq.root={photos}",
          "data.sources.ffhq.repeat=0"], "data.sources.ffhq.repeat=0 must be >= 1"),
        (["data=lsdir_ffhq", "data.sources.ffhq.root={photos}", "data.sources.lsdir._target_=mypkg.Nope"],
         "data.sources.lsdir._target_=mypkg.Nope is not importable"),
        (["data=txt_list", "data.lists=[{{path: {photos}.txt, repeat: 0}}]"], r"data.lists\[0\].repeat=0 must be >= 1"),
        (["data=txt_list", "data.lists=[]"], r"data.lists is empty: set data.lists='\[\{path: a.txt, repeat: 1\}\]'"),
    ],
)
def test_bad_data_argument_named_before_any_model(overrides, message, photos, monkeypatch, tmp_path):
    no_model_built(monkeypatch)
    from osediff_lab.train import run

    cfg = compose_config(tiny(*(o.format(photos=photos) for o in overrides)), tmp_path / "run")
    assert any(re.search(message, p) for p in config_problems(cfg))  # the config check names it
    with pytest.raises(ConfigError, match=message):
        run(cfg)


def test_empty_folder_is_named_before_any_model(photos, monkeypatch, tmp_path):
    no_model_built(monkeypatch)
    from osediff_lab.train import run

    (tmp_path / "empty").mkdir()
    cfg = compose_config(tiny("data=folder", f"data.root={tmp_path / 'empty'}"), tmp_path / "run")
    with pytest.raises(ConfigError, match=f"data 'folder': no images under data.root={tmp_path / 'empty'}"):
        run(cfg)


def test_data_source_from_outside_src_plugs_in_by_config_alone(photos, tmp_path):
    overrides = tiny("data=folder", f"data._target_={__name__}.EveryNth", f"data.root={photos}", "+data.step=2")
    cfg = compose_config(overrides, tmp_path)
    assert config_problems(cfg) == []
    dm = HQDataModule(cfg.data, seed=0)
    dm.setup("fit")
    assert dm.train_set.files == list_images(photos)[::2]
    batch = next(iter(dm.train_dataloader()))
    assert batch["hq"].shape == (2, 3, 64, 64)
    bad = compose_config(overrides[:-1] + ["+data.step=0"], tmp_path)
    assert "data.step=0 must be >= 1" in config_problems(bad)


# ---- loggers ------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("option", "factory", "cls"), [("csv", csv_logger, CSVLogger), ("wandb", wandb_logger, JournaledWandbLogger)])
def test_every_logger_option_builds_its_factory(option, factory, cls, tmp_path):
    cfg = compose_config(tiny(f"logger={option}", *(["logger.mode=disabled"] if option == "wandb" else [])), tmp_path)
    assert config_problems(cfg) == [] and target(cfg.logger, "logger") is factory
    logger = build_logger(cfg, tmp_path / "run")
    try:
        assert isinstance(logger, cls)
        assert isinstance(logger, WandbLogger) == (option == "wandb")
        assert Path(logger.save_dir) == tmp_path / "run"
    finally:
        close_logger(logger)


@pytest.mark.parametrize(
    ("overrides", "key"),
    [
        (["logger=wandb", "logger.mode=loud"], "logger.mode=loud must be one of"),
        (["logger=wandb", "logger.log_model=sometimes"], "logger.log_model=sometimes must be true, false or all"),
        (["logger=wandb", "+logger.entity=me"], "logger.entity is not an argument of wandb_logger"),
        (["logger=csv", "+logger.flush_every=5"], "logger.flush_every is not an argument of csv_logger"),
        (["logger=csv", "logger._target_=mypkg.TensorBoard"], "logger._target_=mypkg.TensorBoard is not importable"),
    ],
)
def test_bad_logger_argument_named_before_any_model(overrides, key, monkeypatch, tmp_path):
    no_model_built(monkeypatch)
    from osediff_lab.train import run

    cfg = compose_config(tiny(*overrides), tmp_path / "run")
    assert any(key in p for p in config_problems(cfg))
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        run(cfg)


def test_logger_from_outside_src_plugs_in_and_is_offered_only_what_it_takes(tmp_path):
    cfg = compose_config(tiny("logger=csv", f"logger._target_={__name__}.journal_only", "+logger.subdir=rows"), tmp_path)
    assert config_problems(cfg) == []
    logger = build_logger(cfg, tmp_path / "run")  # offered run_dir and run_config; takes run_dir alone
    assert type(logger) is CSVLogger and Path(logger.log_dir) == tmp_path / "run" / "rows"
    missing = compose_config(tiny("logger=csv", f"logger._target_={__name__}.journal_only"), tmp_path)
    assert any("logger.subdir is missing" in p for p in config_problems(missing))
