"""RAM/DAPE tagging path: checkpoint layout vs the reference JSON, LoRA and Swin details vs hand-worked values,
and a loader that rejects any mismatch by name."""

from __future__ import annotations

import json

import pytest
import torch
from timm.models.swin_transformer import PatchMerging, SwinTransformerBlock

from helpers import SHARED, TINY, compose_config
from osediff_lab.errors import MissingWeightsError
from osediff_lab.prompts.dape import build_tagger
from osediff_lab.prompts.lora_layers import LoRALinear, MergedLoRALinear
from osediff_lab.prompts.ram import RAMArch, RAMTagger
from osediff_lab.prompts.ram_checkpoint import StateDictMismatchError, load_tagger_state
from osediff_lab.prompts.tagging_head import CrossAttentionCore

SHAPES_JSON = SHARED / "reference" / "ram_dape_state_dict_shapes.json"


def prompt_cfg(name: str, *overrides: str):
    return compose_config([*TINY, f"prompt={name}", *overrides]).prompt


def tagger_of(cfg) -> RAMTagger:
    """The tagger of the ``prompt`` config ``cfg``, built as ``build_dape`` builds it."""
    return build_tagger(cfg.weights, cfg.seed, cfg.arch, cfg.ram_path, cfg.dape_path, cfg.ignore_prefixes)


@pytest.fixture(scope="module")
def tiny_cfg():
    return prompt_cfg("dape_tiny")


@pytest.fixture(scope="module")
def tiny_tagger(tiny_cfg):
    return tagger_of(tiny_cfg).eval()


def test_full_size_names_and_shapes_match_reference_json():
    if not SHAPES_JSON.is_file():
        pytest.skip(f"reference shapes not found at {SHAPES_JSON} (../shared is absent in a fresh clone)")
    reference = json.loads(SHAPES_JSON.read_text())
    tagging = {k: v for k, v in reference.items() if not k.startswith(("tag_encoder.", "text_decoder."))}
    with torch.device("meta"):
        model = RAMTagger(RAMArch.from_config(prompt_cfg("dape").arch))
    ours = {n: list(t.shape) for n, t in [*model.named_parameters(), *model.named_buffers()]}
    assert sorted(set(tagging) - set(ours)) == []
    assert sorted(set(ours) - set(tagging)) == []
    assert {k: v for k, v in ours.items() if tagging[k] != v} == {}
    assert len(ours) == 457  # every tagging-path tensor of the 1,290 in the checkpoint


def test_merged_qkv_lora_adapts_q_and_v_only():
    torch.manual_seed(1)
    dim, r = 4, 2
    layer = MergedLoRALinear(dim, 3 * dim, r, enabled=(True, False, True))
    assert layer.lora_A.shape == (2 * r, dim) and layer.lora_B.shape == (2 * dim, r)
    with torch.no_grad():
        layer.lora_B.normal_()
    x = torch.randn(5, dim)
    base = x @ layer.weight.T + layer.bias
    a, b = layer.lora_A, layer.lora_B
    q_delta = x @ a[:r].T @ b[:dim].T / r  # alpha 1, rank r: loralib scaling 1 / r
    v_delta = x @ a[r:].T @ b[dim:].T / r
    out = layer(x)
    torch.testing.assert_close(out[:, :dim], base[:, :dim] + q_delta)
    torch.testing.assert_close(out[:, dim : 2 * dim], base[:, dim : 2 * dim])
    torch.testing.assert_close(out[:, 2 * dim :], base[:, 2 * dim :] + v_delta)


def test_lora_linear_matches_hand_computation_and_starts_as_identity():
    torch.manual_seed(2)
    layer = LoRALinear(3, 5, rank=8)
    x = torch.randn(4, 3)
    torch.testing.assert_close(layer(x), x @ layer.weight.T + layer.bias)  # lora_B starts at zero
    with torch.no_grad():
        layer.lora_B.normal_()
    torch.testing.assert_close(layer(x), x @ layer.weight.T + layer.bias + x @ layer.lora_A.T @ layer.lora_B.T / 8)


def test_patch_merging_concatenates_in_the_original_swin_order():
    # RAM's checkpoint was trained with cat([x[0::2, 0::2], x[1::2, 0::2], x[0::2, 1::2], x[1::2, 1::2]]).
    merge = PatchMerging(3)
    seen = {}
    merge.norm.register_forward_hook(lambda m, args, out: seen.setdefault("x", args[0]))
    x = torch.randn(2, 4, 6, 3)
    merge(x)
    expected = torch.cat([x[:, 0::2, 0::2], x[:, 1::2, 0::2], x[:, 0::2, 1::2], x[:, 1::2, 1::2]], dim=-1)
    torch.testing.assert_close(seen["x"], expected)


def test_window_geometry_buffers_match_hand_derivation():
    res, win, shift = 8, 4, 2
    block = SwinTransformerBlock(dim=4, input_resolution=(res, res), num_heads=1, window_size=win, shift_size=shift)
    # Relative position index: (dy + win - 1) * (2 win - 1) + (dx + win - 1) for tokens i, j of a window.
    coords = [(y, x) for y in range(win) for x in range(win)]
    index = torch.tensor([[(a[0] - b[0] + win - 1) * (2 * win - 1) + (a[1] - b[1] + win - 1) for b in coords] for a in coords])
    assert torch.equal(block.attn.relative_position_index, index)

    # Shifted-window mask: tokens from different regions of the rolled map may not attend (-100).
    def band(v: int) -> int:
        return 0 if v < res - win else (1 if v < res - shift else 2)

    mask = torch.zeros(res // win * res // win, win * win, win * win)
    for wy in range(res // win):
        for wx in range(res // win):
            regions = [3 * band(wy * win + y) + band(wx * win + x) for y, x in coords]
            for i, ri in enumerate(regions):
                for j, rj in enumerate(regions):
                    mask[wy * (res // win) + wx, i, j] = 0.0 if ri == rj else -100.0
    assert torch.equal(block.attn_mask, mask)


def test_cross_attention_matches_softmax_formula():
    torch.manual_seed(3)
    core = CrossAttentionCore(hidden=8, heads=2, context_width=6, lora_rank=2)
    q_in, ctx = torch.randn(2, 5, 8), torch.randn(2, 7, 6)
    q = core.query(q_in).view(2, 5, 2, 4).transpose(1, 2)
    k = core.key(ctx).view(2, 7, 2, 4).transpose(1, 2)
    v = core.value(ctx).view(2, 7, 2, 4).transpose(1, 2)
    weights = torch.softmax(q @ k.transpose(-1, -2) / 2.0, dim=-1)  # sqrt(head_dim 4) = 2
    expected = (weights @ v).transpose(1, 2).reshape(2, 5, 8)
    torch.testing.assert_close(core(q_in, ctx), expected)


def test_tiny_tagger_logits_and_tokens(tiny_tagger, tiny_cfg):
    x = torch.rand(3, 3, 50, 70)
    tokens = tiny_tagger.visual_encoder(tiny_tagger.preprocess(x))
    side = tiny_cfg.arch.image_size // tiny_cfg.arch.patch_size // 2 ** (len(tiny_cfg.arch.depths) - 1)
    assert tokens.shape == (3, 1 + side * side, tiny_tagger.visual_encoder.width)
    torch.testing.assert_close(tokens[:, 0], tokens[:, 1:].mean(dim=1))  # first token is the average
    logits = tiny_tagger(x)
    assert logits.shape == (3, tiny_cfg.arch.num_tags) and torch.isfinite(logits).all()
    torch.testing.assert_close(tiny_tagger(x[1:2]), logits[1:2], atol=1e-5, rtol=1e-5)  # batch-independent


def test_mismatched_state_dict_is_rejected_with_every_name(tiny_tagger):
    state = {k: v.clone() for k, v in tiny_tagger.state_dict().items()}
    state.pop("fc.bias")
    state.pop("visual_encoder.layers.0.blocks.0.attn.qkv.lora_A")
    state["visual_encoder.head.weight"] = torch.zeros(2, 2)
    state["image_proj.weight"] = torch.zeros(3, 3)
    state["tag_encoder.embeddings.word_embeddings.weight"] = torch.zeros(2, 2)  # ignored part
    with pytest.raises(StateDictMismatchError) as err:
        load_tagger_state(RAMTagger(tiny_tagger.arch), state, "bad.pth", ("tag_encoder.", "text_decoder."))
    e = err.value
    assert e.missing == ["fc.bias", "visual_encoder.layers.0.blocks.0.attn.qkv.lora_A"]
    assert e.unexpected == ["visual_encoder.head.weight"]
    assert len(e.wrong) == 1 and e.wrong[0].startswith("image_proj.weight (3, 3)")
    for name in ("fc.bias", "attn.qkv.lora_A", "visual_encoder.head.weight", "image_proj.weight", "bad.pth"):
        assert name in str(e)


def test_geometry_buffers_are_accepted_and_checked(tiny_tagger):
    fresh = RAMTagger(tiny_tagger.arch)
    state = dict(tiny_tagger.state_dict())
    mask_name = "visual_encoder.layers.0.blocks.1.attn_mask"
    index_name = "visual_encoder.layers.0.blocks.0.attn.relative_position_index"
    buffers = dict(tiny_tagger.named_buffers())
    state[mask_name], state[index_name] = buffers[mask_name].clone(), buffers[index_name].clone()
    report = load_tagger_state(fresh, state, "ok.pth")
    assert len(report.loaded) == len(list(fresh.parameters()))
    state[index_name] = buffers[index_name].flip(0)
    with pytest.raises(StateDictMismatchError, match="relative_position_index"):
        load_tagger_state(fresh, state, "bad.pth")


def test_ram_then_dape_files_load_through_the_config(tiny_tagger, tmp_path):
    params = dict(tiny_tagger.named_parameters())
    ram = {k: v for k, v in params.items() if "lora_" not in k}
    ram |= {"tag_encoder.encoder.layer.0.output.dense.weight": torch.zeros(4, 4), "text_decoder.cls.predictions.bias": torch.zeros(3)}
    dape = {k: v for k, v in params.items() if "lora_" in k}
    assert dape  # the tiny preset has DAPE's LoRA layers
    torch.save({"model": ram}, tmp_path / "ram.pth")
    torch.save({"params": dape}, tmp_path / "dape.pth")
    cfg = prompt_cfg("dape_tiny", "prompt.weights=pretrained", f"prompt.ram_path={tmp_path / 'ram.pth'}",
                     f"prompt.dape_path={tmp_path / 'dape.pth'}")
    loaded = tagger_of(cfg).eval()
    x = torch.rand(2, 3, 64, 64)
    torch.testing.assert_close(loaded(x), tiny_tagger(x))

    # A "DAPE" file without LoRA tensors: the union misses exactly DAPE's LoRA tensors, each named.
    no_lora = prompt_cfg("dape_tiny", "prompt.weights=pretrained", f"prompt.ram_path={tmp_path / 'ram.pth'}",
                         f"prompt.dape_path={tmp_path / 'ram.pth'}")
    with pytest.raises(StateDictMismatchError) as err:
        tagger_of(no_lora)
    assert err.value.missing == sorted(dape) and not err.value.unexpected

    # Plain RAM (no DAPE file): the model is built without LoRA layers and RAM's file alone covers it.
    plain = prompt_cfg("dape_tiny", "prompt.weights=pretrained", f"prompt.ram_path={tmp_path / 'ram.pth'}", "prompt.dape_path=null")
    plain_tagger = tagger_of(plain)
    assert not any("lora_" in n for n, _ in plain_tagger.named_parameters())


def test_missing_checkpoint_names_the_file(tmp_path):
    cfg = prompt_cfg("dape", f"paths.weights_dir={tmp_path}")
    with pytest.raises(MissingWeightsError, match="ram_swin_large_14m.pth"):
        tagger_of(cfg)


def test_preprocess_resizes_and_normalises(tiny_tagger):
    x = torch.full((1, 3, 10, 20), 0.5)
    out = tiny_tagger.preprocess(x)
    assert out.shape == (1, 3, 64, 64)
    mean, std = torch.tensor([0.485, 0.456, 0.406]), torch.tensor([0.229, 0.224, 0.225])
    torch.testing.assert_close(out[0, :, 7, 9], (0.5 - mean) / std)
