"""What a run sets up and what it refuses, as a newcomer met them: the tiny tokenizer's and toy LLaVA's temporary
folders removed, conv_in trained in full without its LoRA, degradation=none refused, auto-resume refusing a changed
config or other LoRA ranks, the memory options training and drawing their sample grid."""

from __future__ import annotations

import tempfile
from pathlib import Path

import pytest

from helpers import TINY, compose_config
from osediff_lab.checks import config_problems
from osediff_lab.models.components import build_components
from osediff_lab.prompts import provider_from_config
from osediff_lab.train import build_module


def leftovers(prefix: str) -> set[Path]:
    return set(Path(tempfile.gettempdir()).glob(prefix + "*"))


def test_tiny_tokenizer_and_toy_llava_remove_their_temporary_folders(tmp_path):
    before_tok, before_llava = leftovers("osediff_tokenizer_"), leftovers("osediff_llava_")
    cfg = compose_config(["model=tiny", "prompt=llava_tiny"], tmp_path)
    components = build_components(cfg.model)
    assert components.tokenizer("a photo").input_ids  # loaded, usable after its folder is gone
    provider = provider_from_config(cfg.prompt)
    assert provider is not None
    assert leftovers("osediff_tokenizer_") == before_tok
    assert leftovers("osediff_llava_") == before_llava


def test_conv_in_is_trained_in_full_also_without_its_lora(tmp_path):
    targets = "[to_q,to_k,to_v,to_out.0,conv1,conv2,conv_shortcut,conv_out,proj_in,proj_out,ff.net.0.proj,ff.net.2]"
    module = build_module(compose_config([*TINY, f"generator.lora.unet_targets={targets}"], tmp_path))
    names = module.trained_names
    assert "method.generator.unet.conv_in.weight" in names and not any("conv_in.lora_" in n and "unet" in n for n in names)


def test_degradation_none_is_rejected_before_building(tmp_path):
    text = " ".join(config_problems(compose_config([*TINY, "degradation=none"], tmp_path)))
    assert "degradation=none" in text and "degradation=realesrgan" in text


@pytest.mark.slow
def test_auto_resume_refuses_a_run_whose_config_changed(tmp_path):
    from osediff_lab.errors import ConfigError
    from osediff_lab.lit.resume import config_changes
    from osediff_lab.train import run

    fast = [*TINY, "data.crop_size=32", "trainer.max_steps=1", "callbacks.samples.every_n_steps=0",
            "callbacks.checkpoint.every_n_train_steps=1", "trainer.enable_progress_bar=false"]
    run(compose_config(fast, tmp_path))
    with pytest.raises(ConfigError, match=r"method.vsd_weight: 1.0 -> 0.5(.|\n)*resume=false"):
        run(compose_config([*fast, "trainer.max_steps=2", "method.vsd_weight=0.5"], tmp_path))
    assert config_changes({"trainer": {"max_steps": 1}, "a": 1, "old": 2}, {"trainer": {"max_steps": 9}, "a": 1}) == []
    assert config_changes({"optim": {"grad_clip": 1.0}}, {"optim": {"grad_clip": 0.5}}) == ["optim.grad_clip: 1.0 -> 0.5"]


@pytest.mark.slow
def test_resume_with_other_lora_ranks_is_one_clear_error(tmp_path):
    from osediff_lab.train import run

    fast = [*TINY, "data.crop_size=32", "trainer.max_steps=1", "callbacks.samples.every_n_steps=0",
            "callbacks.checkpoint.every_n_train_steps=1", "trainer.enable_progress_bar=false"]
    run(compose_config(fast, tmp_path / "a"))
    ckpt = tmp_path / "a" / "checkpoints" / "last.ckpt"
    with pytest.raises(RuntimeError, match=r"other LoRA ranks or layers: \d+ tensors differ in shape.*generator\.lora\.unet_rank=4 \(now 2\)"):
        run(compose_config([*fast, "trainer.max_steps=2", f"ckpt_path={ckpt}", "generator.lora.unet_rank=2"],
                           tmp_path / "b"))


@pytest.mark.slow
def test_memory_options_train_and_draw_their_sample_grid(tmp_path):
    """The README's memory options on the tiny model (frozen weights in bf16 beside fp32 LoRA): the step and
    the live pipeline behind the end-of-run sample grid both run (the grid crashed with a dtype mismatch)."""
    from osediff_lab.train import run

    cfg = compose_config([*TINY, "data.crop_size=32", "trainer.max_steps=1", "generator.frozen_dtype=bf16",
                          "trainer.precision=bf16-mixed", "generator.gradient_checkpointing=true",
                          "callbacks.samples.every_n_steps=0", "trainer.enable_progress_bar=false"], tmp_path)
    _, _, summary = run(cfg)
    assert summary["steps"] == 1 and summary["last_sample_grid"].endswith("step_000001.png")


def test_a_shape_mismatch_names_every_differing_setting_of_any_method():
    from osediff_lab.lit.contents import config_differences

    saved = {"method": {"lora_rank_pix": 4, "alpha": 8, "optim": {"lr": 1}}, "generator": {"lora": {"unet_rank": 4}},
             "data": {"root": "a"}}
    now = {"method": {"lora_rank_pix": 8, "alpha": 8, "optim": {"lr": 1}, "extra": True}, "generator": {"lora": {"unet_rank": 4}},
           "data": {"root": "b"}}
    assert config_differences(saved, now, ("generator", "method", "model")) == [
        "method.extra=None (now True)", "method.lora_rank_pix=4 (now 8)"]
