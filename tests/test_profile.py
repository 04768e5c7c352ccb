"""The complexity profiler: MACs against hand counts, the paper's SD2.1 figures, and the saved table."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from omegaconf import open_dict
from torch import nn

from helpers import compose_config
from osediff_lab.profile import count_macs, op_column, profile_report, profile_rows, run_profile


def test_conv_and_linear_macs_match_hand_counts():
    with torch.device("meta"):
        conv, lin = nn.Conv2d(3, 8, 3, padding=1), nn.Linear(10, 20)
        x, y = torch.zeros(1, 3, 16, 16), torch.zeros(2, 5, 10)
        assert count_macs(lambda: conv(x)).dense == 8 * 3 * 3 * 3 * 16 * 16  # out ch x in ch x kernel x pixels
        got = count_macs(lambda: lin(y))
    assert got.dense == 2 * 5 * 10 * 20 and got.attention == 0  # a Linear over a 3-D input is still dense


@pytest.mark.parametrize("kind", ["sdpa", "matmul"])
def test_attention_products_have_their_own_column(kind):
    """QK^T and AV for 2 heads, 6 queries, 7 keys, head dim 4: 2 x 6 x 7 x 4 MACs each."""
    with torch.device("meta"):
        q, k, v = torch.zeros(1, 2, 6, 4), torch.zeros(1, 2, 7, 4), torch.zeros(1, 2, 7, 4)
        if kind == "sdpa":
            got = count_macs(lambda: F.scaled_dot_product_attention(q, k, v))
        else:
            got = count_macs(lambda: (q @ k.transpose(-1, -2)).softmax(-1) @ v)
    assert got.attention == 2 * (2 * 6 * 7 * 4) and got.dense == 0


def test_unclassified_op_is_an_error():
    assert op_column("aten.addmm") == "dense" and op_column("aten._scaled_dot_product_flash_attention") == "attention"
    with pytest.raises(ValueError, match="does not classify"):
        op_column("aten.some_new_matmul")


@pytest.mark.slow
def test_sd21_counts_agree_with_the_paper_without_memory():
    """Full SD2.1-base and RAM Swin-L sizes on the meta device: the paper's Conv2d + Linear GMACs within 5%."""
    cfg = compose_config(["model=sd21_shape", "prompt=dape"])
    with open_dict(cfg):
        cfg.profile = compose_profile_section()
        cfg.profile.latency.enabled = False
    rows = {r["module"]: r for r in profile_rows(cfg)}
    for key in ("text_encoder", "vae_encoder", "unet", "vae_decoder", "prompt_backbone"):
        assert abs(rows[key]["rel_diff"]) < cfg.profile.tolerance == 0.05, (key, rows[key])
    table = profile_report(list(rows.values()), cfg)
    assert "UNet: 339.1 GMACs vs the paper's 355" in table and "outside" not in table  # the gap, explained
    # the VAE's single mid-block self-attention over 64 x 64 = 4096 tokens of width 512: 2 x 4096^2 x 512
    assert rows["vae_decoder"]["attention_gmacs"] == pytest.approx(2 * 4096**2 * 512 / 1e9)
    assert 860e6 < rows["unet"]["params"] < 870e6
    assert 8.0e6 < rows["total"]["trainable"] + rows["regularizer (training only)"]["trainable"] < 9.0e6


def compose_profile_section():
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from osediff_lab.paths import CONF_DIR

    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose(config_name="profile").profile


@pytest.mark.slow
def test_profile_writes_markdown_and_json_with_latency(tmp_path):
    cfg = compose_config(["model=tiny", "prompt=dape_tiny"])
    with open_dict(cfg):
        cfg.profile = compose_profile_section()
        cfg.profile.latency.size = 32
        cfg.profile.latency.repeats = 2
        cfg.profile.latency.warmup = 1
    rows = run_profile(cfg, tmp_path)
    saved = json.loads((tmp_path / "profile.json").read_text())
    assert saved["rows"] == json.loads(json.dumps(rows))
    md = (tmp_path / "profile.md").read_text()
    assert "| UNet |" in md and "attention GMACs" in md
    unet = next(r for r in rows if r["module"] == "unet")
    assert unet["paper_gmacs"] is None  # no paper column for the tiny preset
    assert unet["latency"]["min_ms"] <= unet["latency"]["median_ms"]


def test_auto_precision_and_device_resolution():
    from osediff_lab.dtypes import resolve_device, resolve_dtype

    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    assert resolve_dtype("auto", cuda) == torch.float16  # inference's auto (fp16 + upcast VAE decoder)
    assert resolve_dtype("auto", cuda, torch.bfloat16) == torch.bfloat16  # the profiler's latency auto
    assert resolve_dtype("auto", cpu, torch.bfloat16) == torch.float32
    assert resolve_dtype("bf16", cpu) == torch.bfloat16
    with pytest.raises(ValueError, match="profile.latency.precision"):
        resolve_dtype("fp64", cpu, key="profile.latency.precision")
    assert resolve_device("auto") == torch.device("cuda" if torch.cuda.is_available() else "cpu")
    assert resolve_device("cpu") == cpu


@pytest.mark.slow
@pytest.mark.parametrize("method", ["osediff", "osediff_gan", "pisasr_pixel"])
def test_the_profile_counts_the_configured_methods_groups(method):
    """The profile builds the configured method, not OSEDiff's parts: every group beyond the generator gets a
    training-only row with its tensor count, and the trainable rows sum to the method's generator group."""
    from osediff_lab.models.components import build_components
    from osediff_lab.profile import build_method

    cfg = compose_config(["model=tiny", "prompt=none", f"method={method}"])
    with open_dict(cfg):
        cfg.profile = compose_profile_section()
        cfg.profile.latency.enabled = False
    rows = {r["module"]: r for r in profile_rows(cfg)}
    groups = {name: sum(p.numel() for p in g.params)
              for name, g in build_method(cfg, build_components(cfg.model)).param_groups().items()}
    assert rows["total"]["trainable"] == groups.pop("generator")
    assert {k.removesuffix(" (training only)"): r["trainable"] for k, r in rows.items() if "training only" in k} == groups
