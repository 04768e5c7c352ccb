"""The backbone interface itself: folders and denoisers recognised by their family (a FLUX folder is not SD3's),
a preset whose backbone does not fit its folder named with the one that does, backbone names and options checked
before any model, SD3's joint-attention processors, a resolution-dependent shift refused by SD3 and admitted by a
backbone that brings its own schedule, and the weights manifest built from every release's folder files."""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, UNet2DConditionModel
from diffusers.models.attention_processor import JointAttnProcessor2_0
from omegaconf import open_dict
from torch import nn

from helpers import TINY, compose_config
from osediff_lab.backbones import backbone_of, family_of, recognise_folder, releases
from osediff_lab.backbones.flux import FluxBackbone
from osediff_lab.backbones.schedules import FlowMatchSchedule
from osediff_lab.backbones.sd import SDBackbone
from osediff_lab.backbones.sd3 import SD3Backbone
from osediff_lab.backbones.sdxl import SDXLBackbone
from osediff_lab.checks import config_problems
from osediff_lab.errors import ConfigError
from osediff_lab.models.components import build_components, load_pretrained
from osediff_lab.models.osediff import build_generator
from osediff_lab.weights.manifest import GROUPS, MANIFEST

pytestmark = pytest.mark.usefixtures("single_thread")


def folder(root: Path, *subfolders: str, denoiser_class: str | None = None) -> Path:
    """A folder with empty ``subfolders``; with ``denoiser_class`` a transformer/config.json naming it."""
    for sub in subfolders:
        (root / sub).mkdir(parents=True)
    if denoiser_class:
        (root / "transformer").mkdir(parents=True, exist_ok=True)
        (root / "transformer" / "config.json").write_text(json.dumps({"_class_name": denoiser_class}))
    return root


def test_folders_are_recognised_by_family_and_a_flux_folder_is_not_sd3s(tmp_path):
    assert recognise_folder(folder(tmp_path / "sd", "unet", "text_encoder")) is SDBackbone
    assert recognise_folder(folder(tmp_path / "sdxl", "unet", "text_encoder", "text_encoder_2")) is SDXLBackbone
    assert recognise_folder(folder(tmp_path / "sd3", "text_encoder_2", denoiser_class="SD3Transformer2DModel")) is SD3Backbone
    flux = folder(tmp_path / "flux", "text_encoder", "text_encoder_2", denoiser_class="FluxTransformer2DModel")
    assert recognise_folder(flux) is FluxBackbone and recognise_folder(tmp_path / "nowhere") is None
    with pytest.raises(ConfigError, match="no registered backbone .* recognises this folder; set model.backbone"):
        load_pretrained(folder(tmp_path / "other", "text_encoder"))


def test_a_preset_whose_backbone_does_not_fit_its_folder_names_the_one_that_does(tmp_path):
    sd = folder(tmp_path / "sd", "unet", "text_encoder")
    cfg = compose_config([*TINY, "model=sd3_medium", f"model.pretrained_path={sd}"], tmp_path)
    message = r"model.backbone=sd3 does not fit .* which holds a 'sd' folder; set model.backbone=sd"
    assert any(re.search(message, p) for p in config_problems(cfg))
    with pytest.raises(ConfigError, match=message):
        build_components(cfg.model)


@pytest.mark.parametrize(("overrides", "message"), [
    (["+model.load_t5=false"], r"model.load_t5 is not an argument of SDBackbone \(it takes \[\]\)"),
    (["model.backbone=flux2"], r"model.backbone='flux2' is neither a registered backbone"),
    (["model.backbone=osediff_lab.backbones.text.TextEncoders"], "is not a Backbone subclass"),
    (["model.backbone=osediff_lab.backbones.nothing.Here"], "model.backbone: 'osediff_lab.backbones.nothing.Here' is not importable"),
])
def test_backbone_names_and_options_are_checked_before_any_model(overrides, message, tmp_path):
    cfg = compose_config([*TINY, *overrides], tmp_path)
    assert any(re.search(message, p) for p in config_problems(cfg)), config_problems(cfg)
    with pytest.raises(ConfigError, match=message):
        build_components(cfg.model)


def test_an_option_in_the_backbone_mapping_and_beside_it_is_refused(tmp_path):
    cfg = compose_config([*TINY, "model=sd3_medium", f"model.pretrained_path={tmp_path}"], tmp_path)
    with open_dict(cfg):
        cfg.model.backbone = {"_target_": "osediff_lab.backbones.sd3.SD3Backbone", "t5_max_length": 8}
    assert any("model.backbone.t5_max_length is also set beside it" in p for p in config_problems(cfg))


def tiny_transformer() -> SD3Transformer2DModel:
    return SD3Transformer2DModel(sample_size=8, patch_size=2, in_channels=4, out_channels=4, num_layers=1, attention_head_dim=8,
                                 num_attention_heads=2, joint_attention_dim=16, caption_projection_dim=16,
                                 pooled_projection_dim=16, pos_embed_max_size=16)


def test_a_denoiser_built_outside_components_is_recognised_by_its_class_one_built_inside_carries_its_backbone():
    unet = UNet2DConditionModel(**compose_config([*TINY, "model=tiny_sdxl"]).model.arch.unet)
    assert family_of(tiny_transformer()) == "sd3" and family_of(unet) == "sdxl"
    assert family_of(nn.Linear(2, 2)) == "sd"  # the fallback: a UNet called with hidden states alone
    components = build_components(compose_config([*TINY, "model=tiny_sd3", "model.arch.text_encoder_3.max_length=8"]).model)
    assert backbone_of(components.denoiser) == SD3Backbone(t5_max_length=8)


def test_sd3_runs_its_own_joint_attention_processors():
    net = tiny_transformer()
    SD3Backbone().set_attention(net, "sdpa")
    assert all(isinstance(p, JointAttnProcessor2_0) for p in net.attn_processors.values())
    with pytest.raises(ConfigError, match=r"attention='plain' has no processor for the sd3 backbone's denoiser; use one of \['sdpa'\]"):
        SD3Backbone().set_attention(net, "plain")


@dataclass(frozen=True)
class OneSizeSD3(SD3Backbone):
    """SD3 with a scheduler that shifts by image size (use_dynamic_shifting), read at one size of ``tokens``
    image tokens: mu interpolated between base and max shift (FLUX's rule), shift = exp(mu)."""

    tokens: int = 256

    def schedule(self, scheduler):
        c = scheduler.config
        slope = (c.max_shift - c.base_shift) / (c.max_image_seq_len - c.base_image_seq_len)
        return FlowMatchSchedule(c.num_train_timesteps, math.exp(c.base_shift + slope * (self.tokens - c.base_image_seq_len)))


def test_sd3_refuses_a_resolution_dependent_shift_and_a_backbone_with_its_own_schedule_admits_it(tmp_path):
    cfg = compose_config([*TINY, "model=tiny_sd3", "+model.arch.scheduler.use_dynamic_shifting=true"], tmp_path)
    with pytest.raises(ConfigError, match=r"use_dynamic_shifting=True .*\(Backbone.schedule\)"):
        build_components(cfg.model)
    with open_dict(cfg):
        cfg.model.backbone = {"_target_": f"{__name__}.OneSizeSD3", "tokens": 1024}
    generator, _ = build_generator(build_components(cfg.model), cfg.generator)
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift  # diffusers' own mu for a token count

    mu = calculate_shift(1024)
    s = torch.arange(1, 1001, dtype=torch.float32) / 1000  # the training grid read from the clean end
    reference = FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True).time_shift(mu, 1.0, s)
    torch.testing.assert_close(generator.schedule.sigmas, reference)


def test_the_manifest_holds_every_registered_release_folder_with_the_subfolders_its_backbone_checks():
    for backbone, release in releases():
        entries = [MANIFEST[name] for name in GROUPS[release.group]]
        assert len(entries) == len(backbone.folder_files)
        assert {e.path.split("/")[1] for e in entries if e.path.count("/") > 1} >= set(backbone.folders())
        assert MANIFEST[f"{release.prefix}_{backbone.denoiser_folder}_config"].path == (
            f"{release.folder}/{backbone.denoiser_folder}/config.json")


@pytest.mark.parametrize(("model", "family"), [("tiny", "sd"), ("tiny_sdxl", "sdxl"), ("tiny_sd3", "sd3")])
def test_a_model_config_saved_before_model_backbone_builds_the_family_its_arch_describes(model, family):
    cfg = compose_config([*TINY, f"model={model}"]).model
    with open_dict(cfg):
        del cfg["backbone"]  # as the sidecars of earlier runs hold it
    assert build_components(cfg).family == family
