"""Checkpoint formats: ours (safetensors + sidecar), Lightning .ckpt export, the official release; base loader."""

from __future__ import annotations

import copy
import json
import shutil

import pytest
import torch
from diffusers import AutoencoderKL
from safetensors.torch import load_file

from helpers import TINY, compose_config
from osediff_lab.errors import ConfigError, MissingWeightsError
from osediff_lab.export import main as export_main
from osediff_lab.models.components import build_components, save_pretrained
from osediff_lab.models.lora_files import config_hash, export_lora
from osediff_lab.models.osediff import build_osediff
from osediff_lab.pipeline import SRPipeline
from osediff_lab.prompts import NullPrompt
from osediff_lab.train import build_module
from test_pipeline import lq_batch, make_pipeline, perturb_trained, tiny_model

pytestmark = pytest.mark.usefixtures("single_thread")

OPTS = {"process_size": 32, "color_fix": "none", "merge_lora": False}
LQ = lq_batch(8, 12)


def trained_state(generator) -> dict[str, torch.Tensor]:
    """What training exports: the generator's trainable tensors, keyed relative to it."""
    return {n: p for n, p in generator.named_parameters() if p.requires_grad}


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    """The tiny base model (seed 42) as a diffusers directory, tokenizer included."""
    cfg = compose_config(TINY)
    torch.manual_seed(cfg.seed)
    path = tmp_path_factory.mktemp("base")
    return save_pretrained(build_components(cfg.model), path)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """An in-memory tiny OSEDiff built the way train.py builds it (seeded), with trained-looking LoRA."""
    cfg = compose_config(TINY)
    torch.manual_seed(cfg.seed)
    parts = build_osediff(build_components(cfg.model), cfg.generator)
    perturb_trained(parts.generator)
    reference = make_pipeline(parts.components, parts.generator, **OPTS)(LQ)
    return cfg, parts, reference


def test_ours_round_trip_rebuilds_the_tiny_base_from_the_sidecar(trained, tmp_path):
    cfg, parts, reference = trained
    weights, sidecar = export_lora(trained_state(parts.generator), cfg, parts.targets, tmp_path / "w.safetensors")
    meta = json.loads(sidecar.read_text())
    assert meta["seed"] == cfg.seed and meta["model_arch"]["name"] == "tiny" and "reg_unet.reg" not in meta["target_modules"]
    assert all(".lora_" in k or k.startswith("unet.conv_in.base_layer") for k in load_file(str(weights)))
    out = SRPipeline.from_checkpoint(weights, options=OPTS)(LQ)
    assert torch.equal(out, reference)
    merged = SRPipeline.from_checkpoint(weights, options={**OPTS, "merge_lora": True})(LQ)
    assert (merged - reference).abs().max() < 1e-4


def test_ours_on_a_diffusers_base_dir(trained, base_dir, tmp_path):
    cfg, parts, reference = trained
    weights, _ = export_lora(trained_state(parts.generator), cfg, parts.targets, tmp_path / "w.safetensors")
    # a base read back from its diffusers folder differs from the in-memory one by ~6e-8 in the time embedding
    # (diffusers' load path), which reaches the output as < 1e-6: the same weights, not the same bits
    torch.testing.assert_close(SRPipeline.from_checkpoint(weights, base=base_dir, options=OPTS)(LQ), reference,
                               rtol=0, atol=1e-5)


@pytest.mark.slow
def test_export_cli_from_a_lightning_checkpoint(tmp_path):
    cfg = compose_config(TINY, tmp_path)
    torch.manual_seed(cfg.seed)
    module = build_module(cfg)
    perturb_trained(module.generator)
    pipe = SRPipeline(copy.deepcopy(module.generator), module.text_encoders, NullPrompt(), 4, OPTS)
    reference = pipe(LQ)
    # what Lightning's checkpoint dump writes, then the module's own hook (keeps trained tensors only)
    checkpoint = {"state_dict": module.state_dict(), "hyper_parameters": dict(module.hparams), "epoch": 0}
    module.on_save_checkpoint(checkpoint)
    torch.save(checkpoint, tmp_path / "last.ckpt")
    weights, sidecar = export_main([f"ckpt={tmp_path / 'last.ckpt'}", f"out={tmp_path / 'lora.safetensors'}"])
    assert json.loads(sidecar.read_text())["config_hash"] == config_hash(cfg)  # as the end-of-training export's
    assert torch.equal(SRPipeline.from_checkpoint(weights, options=OPTS)(LQ), reference)
    assert torch.equal(SRPipeline.from_checkpoint(tmp_path / "last.ckpt", options=OPTS)(LQ), reference)


# ---- the official release format --------------------------------------------------------------
UNET_GREP = ["to_k", "to_q", "to_v", "to_out.0", "conv", "conv1", "conv2", "conv_shortcut", "conv_out", "proj_in", "proj_out", "ff.net.2", "ff.net.0.proj"]
VAE_GREP = ["conv1", "conv2", "conv_in", "conv_shortcut", "conv", "conv_out", "to_k", "to_q", "to_v", "to_out.0"]


def official_module_lists(unet, vae) -> dict[str, list[str]]:
    """Module lists as the release builds them: substring matches over weight names (bias/norm skipped),
    on the plain (not yet LoRA-wrapped) models; quant_conv is appended once per pattern, hence duplicates."""
    unet_groups: dict[str, list[str]] = {"encoder": [], "decoder": [], "others": []}
    for name, _ in unet.named_parameters():
        if "bias" in name or "norm" in name:
            continue
        for pattern in UNET_GREP:
            if pattern in name:
                group = "encoder" if ("down_blocks" in name or "conv_in" in name) else (
                    "decoder" if ("up_blocks" in name or "conv_out" in name) else "others"
                )
                unet_groups[group].append(name.removesuffix(".weight"))
                break
    vae_list = []
    for name, _ in vae.named_parameters():
        if "bias" in name or "norm" in name:
            continue
        for pattern in VAE_GREP:
            in_encoder = pattern in name and "encoder" in name
            if in_encoder or ("quant_conv" in name and "post_quant_conv" not in name):
                vae_list.append(name.removesuffix(".weight"))
    lists = {f"unet_lora_{g}_modules": names for g, names in unet_groups.items()}
    return lists | {"vae_lora_encoder_modules": vae_list}


def test_official_release_format_loads_with_identical_outputs(base_dir, tmp_path):
    # the release's LoraConfig has no lora_alpha: PEFT's default 8 with rank 4
    overrides = ["generator.lora.unet_alpha=8", "generator.lora.vae_alpha=8"]
    cfg = compose_config(TINY + overrides)
    torch.manual_seed(cfg.seed)
    plain = build_components(cfg.model)
    lists = official_module_lists(plain.denoiser, plain.vae)
    assert len(lists["vae_lora_encoder_modules"]) > len(set(lists["vae_lora_encoder_modules"]))  # duplicates
    components, generator, targets = tiny_model(overrides, seed=cfg.seed)
    for group in ("encoder", "decoder", "others"):  # our placement is the release's placement
        assert sorted(set(lists[f"unet_lora_{group}_modules"])) == sorted(targets[f"unet.default_{group}"])
    assert sorted(set(lists["vae_lora_encoder_modules"])) == sorted(targets["vae.default_encoder"])
    reference = make_pipeline(components, generator, **OPTS)(LQ)
    release = {
        "state_dict_unet": {k: v for k, v in generator.unet.state_dict().items() if "lora" in k or "conv_in" in k},
        "state_dict_vae": {k: v for k, v in generator.vae.state_dict().items() if "lora" in k},
        "rank_unet": 4,
        "rank_vae": 4,
        **lists,
    }
    assert "conv_in.base_layer.weight" in release["state_dict_unet"]
    torch.save(release, tmp_path / "osediff.pkl")
    pipe = SRPipeline.from_checkpoint(tmp_path / "osediff.pkl", base=base_dir, options=OPTS)
    assert pipe.upsampler == "pillow"  # pipeline.upsampler=auto: the release's own upsampling for its checkpoint
    pipe.upsampler = "torch"  # the same input as the reference pipeline's, to compare the networks
    torch.testing.assert_close(pipe(LQ), reference, rtol=0, atol=1e-5)  # the base read from disk: see above


class NotWeights:
    """Any class: weights-only loading must refuse to rebuild it."""


def test_official_format_is_loaded_weights_only(tmp_path):
    torch.save({"state_dict_unet": {}, "payload": NotWeights()}, tmp_path / "evil.pkl")
    with pytest.raises(ConfigError, match="weights-only"):
        SRPipeline.from_checkpoint(tmp_path / "evil.pkl")


def test_official_format_without_a_base_names_the_fix(tmp_path, monkeypatch):
    monkeypatch.delenv("OSEDIFF_SD21_BASE", raising=False)
    torch.save({"state_dict_unet": {}, "state_dict_vae": {}, "unet_lora_encoder_modules": [], "unet_lora_decoder_modules": [],
                "unet_lora_others_modules": [], "vae_lora_encoder_modules": [], "rank_unet": 4, "rank_vae": 4}, tmp_path / "o.pkl")
    with pytest.raises(MissingWeightsError, match="base="):
        SRPipeline.from_checkpoint(tmp_path / "o.pkl")


# ---- the base loader --------------------------------------------------------------------------
@pytest.fixture
def exported(trained, tmp_path):
    cfg, parts, _ = trained
    return export_lora(trained_state(parts.generator), cfg, parts.targets, tmp_path / "w.safetensors")[0]


def test_base_loader_rejects_a_prediction_type_without_a_schedule(base_dir, exported, tmp_path):
    """epsilon and v_prediction have a noise schedule (tests/test_backbones.py); x0 ('sample') prediction has none."""
    bad = shutil.copytree(base_dir, tmp_path / "x0pred")
    config = bad / "scheduler" / "scheduler_config.json"
    config.write_text(json.dumps(json.loads(config.read_text()) | {"prediction_type": "sample"}))
    with pytest.raises(ConfigError, match="prediction_type='sample'.*epsilon"):
        SRPipeline.from_checkpoint(exported, base=bad, options=OPTS)


def test_base_loader_rejects_other_latent_channels(base_dir, exported, tmp_path):
    bad = shutil.copytree(base_dir, tmp_path / "lat8")
    vae_cfg = AutoencoderKL.load_config(str(bad / "vae"))
    shutil.rmtree(bad / "vae")
    AutoencoderKL.from_config({**vae_cfg, "latent_channels": 8}).save_pretrained(bad / "vae")
    with pytest.raises(ConfigError, match="VAE latent channels 8 != denoiser in/out channels 4/4"):
        SRPipeline.from_checkpoint(exported, base=bad, options=OPTS)


def test_missing_base_dir_and_sidecar_are_named(exported, tmp_path):
    with pytest.raises(MissingWeightsError, match="nowhere"):
        SRPipeline.from_checkpoint(exported, base=tmp_path / "nowhere", options=OPTS)
    lonely = tmp_path / "lonely.safetensors"
    shutil.copy(exported, lonely)
    with pytest.raises(MissingWeightsError, match="lonely.json"):
        SRPipeline.from_checkpoint(lonely, options=OPTS)
