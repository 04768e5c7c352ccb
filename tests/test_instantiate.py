"""Config groups build their components through ``_target_``: every option builds the right class, a bad
argument is a ConfigError naming its key before any model is built, and a class from outside src plugs in."""

from __future__ import annotations

import pytest
import torch

from helpers import TINY, compose_config
from osediff_lab.build import build, component_problems
from osediff_lab.checks import config_problems
from osediff_lab.data.degradation import BicubicDegradation, PairedOnly, build_degradation
from osediff_lab.data.realesrgan import RealESRGANDegradation, Stage
from osediff_lab.errors import ConfigError


class Darken:
    """A degradation defined outside src: bicubic downsampling, then every pixel ``amount`` darker ([-1, 1])."""

    def __init__(self, scale: int, amount: float) -> None:
        self.scale = scale
        self.amount = amount

    def __call__(self, hq: torch.Tensor) -> torch.Tensor:
        return BicubicDegradation(self.scale)(hq) - self.amount


def no_model_built(monkeypatch) -> None:
    """Any attempt to build the base model fails the test: checks must come first."""

    def refuse(*args, **kwargs):
        raise AssertionError("a model was built before the config was checked")

    monkeypatch.setattr("osediff_lab.models.components.build_components", refuse)
    monkeypatch.setattr("osediff_lab.train.build_components", refuse)


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
    problems = component_problems(cfg.degradation, "degradation", given=("scale",))
    assert len(problems) == 1 and "degradation._target_=osediff_lab.data.degradation.Sharpen" in problems[0]
    with pytest.raises(ConfigError, match="degradation._target_"):
        build(cfg.degradation, "degradation", scale=4)
