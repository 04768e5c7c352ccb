"""Prompt providers: threshold semantics, the prompt text format, the on-disk cache, the null prompt."""

from __future__ import annotations

import math

import pytest
import torch
from PIL import Image

from helpers import SHARED, TINY, compose_config
from osediff_lab.errors import ConfigError
from osediff_lab.models.components import build_components
from osediff_lab.models.text import encode_prompts
from osediff_lab.prompts import NullPrompt, build_prompt_provider
from osediff_lab.prompts.cache import CachedPrompt, PromptCache, pixel_key
from osediff_lab.prompts.dape import DapePrompt, format_tag_prompt
from osediff_lab.prompts.precompute import precompute
from osediff_lab.prompts.ram import select_tags, tag_vocabulary


def cfg_with(*overrides: str, tmp_path=None):
    extra = [f"prompt.cache.path={tmp_path / 'cache.sqlite'}"] if tmp_path else []
    return compose_config([*TINY, *overrides, *extra], tmp_path)


class Counting:
    """A deterministic provider that records how often it runs (its text depends on the image mean)."""

    def __init__(self) -> None:
        self.calls = 0

    def __call__(self, lq, hq=None, paths=None):
        self.calls += 1
        return [f"mean {x.mean().item():.4f}" for x in lq]


def test_threshold_is_strict_per_tag_and_exclusion_applies():
    names = ["a", "b", "c", "d"]
    thresholds = torch.tensor([0.5, 0.5, 0.85, 0.04])
    # sigmoid: 0.5 (equal: off), 0.525 (on), 0.881 (on), 0.047 (on) | 0.269, 0.731, 0.731 (off), 0.018 (off)
    logits = torch.tensor([[0.0, 0.1, 2.0, -3.0], [-1.0, 1.0, 1.0, -4.0]])
    assert select_tags(logits, thresholds, names) == [["b", "c", "d"], ["b"]]
    assert select_tags(logits, thresholds, names, exclude={2}) == [["b", "d"], ["b"]]
    just_above = torch.tensor([[math.log(0.86 / 0.14), -10.0, -10.0, -10.0]])
    assert select_tags(just_above, torch.tensor([0.85, 0.5, 0.5, 0.5]), names) == [["a"]]


def test_packaged_vocabulary_matches_ram():
    names, thresholds = tag_vocabulary(4585)
    assert len(names) == 4585 and len(set(names)) == 4585
    assert thresholds.shape == (4585,) and ((thresholds > 0) & (thresholds <= 1)).all()  # 1.0 = never emitted
    assert names[0] == "3D CG rendering" and thresholds[0].item() == pytest.approx(0.65)
    reference = SHARED / "reference"
    if reference.is_dir():  # the packaged copy is the reference, line for line
        assert names == (reference / "ram_tag_list.txt").read_text().splitlines()
        ref_thresholds = [float(v) for v in (reference / "ram_tag_list_threshold.txt").read_text().split()]
        assert thresholds.tolist() == pytest.approx(ref_thresholds)
    with pytest.raises(ConfigError, match="num_tags"):
        tag_vocabulary(5000)


def test_prompt_string_format():
    assert format_tag_prompt(["cat", "sofa"], "clean, high-resolution") == "cat, sofa, clean, high-resolution,"
    assert format_tag_prompt(["cat"], "") == "cat, ,"
    assert format_tag_prompt([], "") == ", ,"


def test_dape_tiny_provider_formats_the_tags_of_the_given_image():
    cfg = cfg_with("prompt=dape_tiny", "prompt.user_prompt=sharp")
    provider = build_prompt_provider(cfg.prompt)
    assert isinstance(provider, DapePrompt)
    x = torch.rand(2, 3, 48, 40)
    prompts = provider(x, torch.rand(2, 3, 48, 40))
    tags = provider.tags(x)
    assert prompts == [", ".join(t) + ", sharp," for t in tags]
    assert any(tags), "threshold 0.5 on random logits should switch some tags on"
    assert set(sum(tags, [])) <= set(tag_vocabulary(cfg.prompt.arch.num_tags)[0])


def test_cache_hits_are_identical_and_settings_changes_miss(tmp_path):
    cache = PromptCache(tmp_path / "c.sqlite")
    inner = Counting()
    cached = CachedPrompt(inner, cache, {"instruction": "describe"})
    x = torch.randint(0, 256, (3, 3, 8, 8)) / 255  # 8-bit images, as decoded from files
    first = cached(x)
    assert inner.calls == 1 and cached.misses == 3
    again = cached(x + 1e-5)  # float noise below 8-bit resolution keeps the key
    assert again == first and inner.calls == 1 and cached.hits == 3
    other = CachedPrompt(inner, cache, {"instruction": "describe briefly"})
    assert other(x) == first and inner.calls == 2 and other.misses == 3  # recomputed, not served stale
    part = cached(torch.cat([x[:1], torch.zeros(1, 3, 8, 8)]))  # one hit, one miss: only the miss is computed
    assert part[0] == first[0] and part[1] == "mean 0.0000" and inner.calls == 3
    assert pixel_key(x[0]) != pixel_key(x[1])


def _put_from_child(cache: PromptCache) -> None:
    cache.put_many("s", {"child": "from the child"})


def test_cache_keeps_one_connection_per_process_and_shares_the_file(tmp_path):
    import multiprocessing
    import pickle

    cache = PromptCache(tmp_path / "c.sqlite")
    cache.put_many("s", {"a": "first"})
    assert cache._connect() is cache._connect()  # one connection for every lookup in this process
    other = PromptCache(tmp_path / "c.sqlite")  # another process's view of the same file sees committed rows
    assert other.get_many("s", ["a"]) == {"a": "first"}
    child = multiprocessing.get_context("fork").Process(target=_put_from_child, args=(cache,))
    child.start()
    child.join(60)
    assert child.exitcode == 0
    assert cache.get_many("s", ["a", "child"]) == {"a": "first", "child": "from the child"}
    copy = pickle.loads(pickle.dumps(cache))  # e.g. spawned workers: the connection stays behind
    assert copy._db is None and len(copy) == 2
    for c in (cache, other, copy):
        c.close()


def test_cache_miss_can_be_an_error(tmp_path):
    cached = CachedPrompt(Counting(), PromptCache(tmp_path / "c.sqlite"), {"s": 1}, on_miss="error", fill_command="fill-it")
    with pytest.raises(KeyError, match="fill-it"):
        cached(torch.rand(1, 3, 4, 4))
    with pytest.raises(ConfigError, match="on_miss"):
        CachedPrompt(Counting(), PromptCache(tmp_path / "c.sqlite"), {}, on_miss="ignore")


def test_llava_tiny_cached_by_file_and_invalidated_by_instruction(tmp_path):
    files = []
    for i, colour in enumerate([(200, 30, 30), (20, 160, 60)]):
        p = tmp_path / f"img{i}.png"
        Image.new("RGB", (40, 30), colour).save(p)
        files.append(str(p))
    cfg = cfg_with("prompt=llava_tiny", tmp_path=tmp_path)
    provider = build_prompt_provider(cfg.prompt)
    assert isinstance(provider, CachedPrompt)
    crops = torch.rand(2, 3, 16, 16)  # what training passes: crops of those files, with the file paths
    first = provider(crops, crops, paths=files)
    assert provider.misses == 2 and all(isinstance(t, str) for t in first)
    assert provider(torch.rand(2, 3, 16, 16), paths=files) == first and provider.hits == 2

    changed = build_prompt_provider(cfg_with("prompt=llava_tiny", "prompt.instruction=Tags only.", tmp_path=tmp_path).prompt)
    changed(crops, paths=files)
    assert changed.misses == 2 and changed.hits == 0


def test_precompute_fills_the_cache_training_then_reads(tmp_path):
    cfg = cfg_with("prompt=llava_tiny", "data.images=[astronaut.png,coffee.png,astronaut.png]", "prompt.on_miss=error",
                   tmp_path=tmp_path)
    stats = precompute(cfg, device="cpu", progress=False)
    assert stats["files"] == 3 and stats["computed"] == 2 and stats["cached_before"] == 0
    assert precompute(cfg, device="cpu", progress=False)["computed"] == 0
    from osediff_lab.data.datamodule import source_files

    paths = [str(p) for p in source_files(cfg.data)]
    provider = build_prompt_provider(cfg.prompt)  # on_miss=error: any miss would raise
    texts = provider(torch.rand(3, 3, 8, 8), paths=paths)
    assert texts[0] == texts[2] and provider.hits == 3


def test_null_prompt_encodes_like_the_empty_string():
    cfg = cfg_with()
    components = build_components(cfg.model)
    provider = build_prompt_provider(cfg.prompt)
    assert isinstance(provider, NullPrompt)
    prompts = provider(torch.rand(2, 3, 8, 8))
    def encode(p: list[str]) -> torch.Tensor:
        return encode_prompts(components.tokenizer, components.text_encoder, p)

    torch.testing.assert_close(encode(prompts), encode(["", ""]))
    assert not torch.allclose(encode(["a cat"]), encode([""]))


def test_unknown_prompt_target_is_a_config_error():
    cfg = cfg_with()
    cfg.prompt._target_ = "osediff_lab.prompts.clip.ClipPrompt"
    with pytest.raises(ConfigError, match="prompt._target_"):
        build_prompt_provider(cfg.prompt)


def test_training_module_tags_the_configured_source(tmp_path):
    from osediff_lab.train import build_module

    cfg = cfg_with("prompt=dape_tiny", "prompt.source=hq", "method.lpips_weight=0")
    module = build_module(cfg)
    hq = torch.rand(2, 3, 64, 64) * 2 - 1
    batch = {"hq": hq, "lq_up": torch.zeros_like(hq), "path": ["a.png", "b.png"]}
    assert module.batch_prompts(batch) == module.prompts((hq + 1) / 2)
    cfg.prompt.source = "lq"
    assert module.batch_prompts(batch) == module.prompts(torch.full_like(hq, 0.5))
