"""Surprises a newcomer met: temporary folders left behind, conv_in without LoRA, degradation=none."""

from __future__ import annotations

import tempfile
from pathlib import Path

from helpers import TINY, compose_config
from osediff_lab.checks import config_problems
from osediff_lab.models.components import build_components
from osediff_lab.prompts.llava import build_llava
from osediff_lab.train import build_module


def leftovers(prefix: str) -> set[Path]:
    return set(Path(tempfile.gettempdir()).glob(prefix + "*"))


def test_tiny_tokenizer_and_toy_llava_remove_their_temporary_folders(tmp_path):
    before_tok, before_llava = leftovers("osediff_tokenizer_"), leftovers("osediff_llava_")
    cfg = compose_config(["model=tiny", "prompt=llava_tiny"], tmp_path)
    components = build_components(cfg.model)
    assert components.tokenizer("a photo").input_ids  # loaded, usable after its folder is gone
    provider = build_llava(cfg.prompt)
    assert provider is not None
    assert leftovers("osediff_tokenizer_") == before_tok
    assert leftovers("osediff_llava_") == before_llava


def test_conv_in_is_trained_in_full_also_without_its_lora(tmp_path):
    targets = "[to_q,to_k,to_v,to_out.0,conv1,conv2,conv_shortcut,conv_out,proj_in,proj_out,ff.net.0.proj,ff.net.2]"
    module = build_module(compose_config([*TINY, f"generator.lora.unet_targets={targets}"], tmp_path))
    names = module.trained_names
    assert "generator.unet.conv_in.weight" in names and not any("conv_in.lora_" in n and "unet" in n for n in names)


def test_degradation_none_is_rejected_before_building(tmp_path):
    text = " ".join(config_problems(compose_config([*TINY, "degradation=none"], tmp_path)))
    assert "degradation=none" in text and "degradation=realesrgan" in text
