"""Text embeddings cached on disk (text_cache): per text encoders' identity, bit for bit what the encoders give, and a
run whose prompts are all known trains without keeping its text encoders."""

from __future__ import annotations

import pytest
import torch
from omegaconf import OmegaConf

from helpers import TINY, compose_config
from osediff_lab.errors import ConfigError
from osediff_lab.memory import predict_training_memory, training_step
from osediff_lab.models.components import build_components
from osediff_lab.prompts.cache import CachedTextEncoders, EmbeddingCache, encoder_identity, run_prompts
from osediff_lab.train import build_module

pytestmark = pytest.mark.usefixtures("single_thread")
PROMPTS = ["", "a photo of grass", "the sky"]


@pytest.mark.slow
@pytest.mark.parametrize("model", ["tiny", "tiny_sd3"])
def test_cached_embeddings_are_the_encoders_bit_for_bit(tmp_path, model):
    cfg = compose_config([*TINY, f"model={model}"])
    torch.manual_seed(0)
    encoders = build_components(cfg.model).text
    want = encoders(PROMPTS)
    identity = encoder_identity(OmegaConf.to_container(cfg.model, resolve=True), 0)
    filled = CachedTextEncoders(EmbeddingCache(tmp_path / "e.sqlite"), identity, encoders)
    filled(PROMPTS[:2])
    reader = CachedTextEncoders(EmbeddingCache(tmp_path / "e.sqlite"), identity)  # another process: no encoders
    got = reader(PROMPTS[:2])
    assert torch.equal(got.hidden, want.hidden[:2]) and got.hidden.dtype == want.hidden.dtype
    assert (got.pooled is None) == (model == "tiny") and (got.pooled is None or torch.equal(got.pooled, want.pooled[:2]))
    with pytest.raises(KeyError, match="1 prompts have no cached text embedding.*keep_encoders=true"):
        reader(PROMPTS)


def test_identity_names_the_text_encoders(tmp_path):
    model = OmegaConf.to_container(compose_config([*TINY, "model=tiny_sd3"]).model, resolve=True)
    same = encoder_identity(model, 0)
    assert encoder_identity(model, 0) == same and encoder_identity(model, 1) != same  # a random twin's seed
    wider = {**model, "arch": {**model["arch"], "text_encoder_3": {**model["arch"]["text_encoder_3"], "d_model": 128}}}
    assert encoder_identity(wider, 0) != same
    denoiser = {**model, "arch": {**model["arch"], "transformer": {**model["arch"]["transformer"], "num_layers": 4}}}
    assert encoder_identity(denoiser, 0) == same  # the denoiser is not the text encoders
    folder = tmp_path / "base"
    (folder / "text_encoder").mkdir(parents=True)
    (folder / "text_encoder" / "model.safetensors").write_bytes(b"1")
    loaded = {"backbone": "sd", "source": "pretrained", "name": "x", "pretrained_path": str(folder)}
    before = encoder_identity(loaded)
    (folder / "text_encoder" / "model.safetensors").write_bytes(b"22")
    assert encoder_identity(loaded) != before  # new weights in the folder miss the cache


def test_run_prompts_known_only_for_image_independent_groups():
    method = {"negative_prompt": "bad"}
    assert run_prompts(OmegaConf.create({"name": "none"}), method) == ["", "bad"]
    assert run_prompts(OmegaConf.create({"name": "fixed", "text": "x"}), {}, ["y"]) == ["x", "", "y"]
    assert run_prompts(OmegaConf.create({"name": "dape"}), method) is None


@pytest.mark.slow
def test_training_without_the_text_encoders(tmp_path):
    cache = [f"text_cache.path={tmp_path / 'e.sqlite'}", "text_cache.enabled=true"]
    torch.manual_seed(0)
    plain = build_module(compose_config(TINY))
    torch.manual_seed(0)
    module = build_module(compose_config([*TINY, *cache, "text_cache.keep_encoders=false"]))
    assert isinstance(module.text_encoders, CachedTextEncoders) and module.text_encoders.encoders is None
    assert not list(module.text_encoders.parameters())  # no text encoder weights held
    negative = module.method.negative_prompt
    for prompts in ([""], [negative]):
        assert torch.equal(module.encode_text(prompts).hidden, plain.encode_text(prompts).hidden)
    training_step(module, torch.rand(2, 3, 64, 64) * 2 - 1)()  # the step's empty prompt and the VSD negative prompt
    with pytest.raises(ConfigError, match="keep_encoders=false needs every prompt known"):
        build_module(compose_config([*TINY, *cache, "text_cache.keep_encoders=false", "prompt=dape_tiny"]))
    full = predict_training_memory(compose_config(TINY), steps=1)
    cached = predict_training_memory(compose_config([*TINY, *cache, "text_cache.keep_encoders=false"]), steps=1)
    assert full.text > 0 and cached.text == 0 and full.static - cached.static == full.text
