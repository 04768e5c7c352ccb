"""The public releases' degradation quirks (docs/degradation_quirks.md), stage by stage against the behaviour
written out by hand: basicsr's DiffJPEG (a literal float64 reference below), the first-stage resize by
``scale_factor``, the Poisson level count, the unclamped LQ and the per-sample resize back; batched equal to one
sample at a time; and the release configs' values."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from omegaconf import open_dict
from torchvision.transforms.functional import rgb_to_grayscale

from helpers import compose_config
from osediff_lab.data import realesrgan
from osediff_lab.data.degradation import build_degradation
from osediff_lab.data.jpeg import CHROMA_TABLE, LUMA_TABLE, jpeg_compress
from osediff_lab.data.realesrgan import (
    distinct_8bit,
    gray_torchvision,
    poisson_noise,
    release_levels,
    release_poisson_noise,
    rescale_each,
    select_samples,
)
from osediff_lab.data.release_jpeg import release_jpeg, release_tables
from osediff_lab.data.resize import resize, resize_by_factor, upsample_input
from osediff_lab.errors import ConfigError

LUMA = np.array(LUMA_TABLE, dtype=np.float64).reshape(8, 8)
CHROMA = np.array(CHROMA_TABLE, dtype=np.float64).reshape(8, 8)


def photo(h: int, w: int) -> torch.Tensor:
    """A natural RGB crop (scikit-image's astronaut, bundled) in [0, 1], (1, 3, h, w)."""
    import skimage

    arr = np.ascontiguousarray(skimage.data.astronaut()[90 : 90 + h, 140 : 140 + w])
    return torch.from_numpy(arr).permute(2, 0, 1).float()[None] / 255


def make(name: str, **overrides):
    c = compose_config([f"degradation={name}"]).degradation.copy()
    with open_dict(c):
        for k, v in overrides.items():
            c[k] = v
    return build_degradation(c, 4)


# ---- the release's JPEG ---------------------------------------------------------------------------
def reference_diffjpeg(x: np.ndarray, quality: float) -> np.ndarray:
    """basicsr's DiffJPEG(differentiable=False) written out literally in float64, one image (3, H, W) in [0, 1]:
    zero padding to 16, JFIF YCbCr of 255 x, 2x2 chroma means, per 8x8 block the DCT sum, the transposed Annex K
    tables times (5000 / q or 200 - 2 q) / 100, rounding, the IDCT sum, each chroma sample repeated over its
    2x2 cell, back to RGB, clipped to [0, 255], / 255, cropped."""
    _, h, w = x.shape
    ph, pw = -h % 16, -w % 16
    rgb = np.pad(x * 255, ((0, 0), (0, ph), (0, pw)))
    r, g, b = rgb
    y = 0.299 * r + 0.587 * g + 0.114 * b
    cb = -0.168736 * r - 0.331264 * g + 0.5 * b + 128
    cr = 0.5 * r - 0.418688 * g - 0.081312 * b + 128
    factor = (5000 / quality if quality < 50 else 200 - 2 * quality) / 100
    alpha = np.array([1 / math.sqrt(2)] + [1] * 7)
    idx = np.arange(8)
    cos = np.cos((2 * idx[:, None] + 1) * idx[None, :] * np.pi / 16)  # cos[x, u]

    def code(plane: np.ndarray, table: np.ndarray) -> np.ndarray:
        out = np.empty_like(plane)
        for i in range(0, plane.shape[0], 8):
            for j in range(0, plane.shape[1], 8):
                f = plane[i : i + 8, j : j + 8] - 128
                c = 0.25 * np.outer(alpha, alpha) * np.einsum("xy,xu,yv->uv", f, cos, cos)
                c = np.round(c / (table.T * factor)) * (table.T * factor)
                out[i : i + 8, j : j + 8] = 0.25 * np.einsum("uv,xu,yv->xy", np.outer(alpha, alpha) * c, cos, cos) + 128
        return out

    def half(p: np.ndarray) -> np.ndarray:
        return (p[0::2, 0::2] + p[1::2, 0::2] + p[0::2, 1::2] + p[1::2, 1::2]) / 4

    y = code(y, LUMA)
    cb, cr = (np.kron(code(half(p), CHROMA), np.ones((2, 2))) for p in (cb, cr))
    out = np.stack([y + 1.402 * (cr - 128), y - 0.344136 * (cb - 128) - 0.714136 * (cr - 128), y + 1.772 * (cb - 128)])
    return (np.clip(out, 0, 255) / 255)[:, :h, :w]


@pytest.mark.parametrize(("h", "w", "quality"), [(40, 48, 30.0), (37, 29, 60.0), (21, 50, 75.3), (32, 32, 95.0)])
def test_release_jpeg_is_the_literal_diffjpeg(h, w, quality):
    x = photo(h, w)
    ours = release_jpeg(x, torch.tensor([quality]))[0].double().numpy()
    ref = reference_diffjpeg(x[0].double().numpy(), quality)
    np.testing.assert_allclose(ours, ref, atol=2e-5, rtol=0)
    assert not np.allclose(ours * 255, np.round(ours * 255), atol=1e-3), "the release rounds nothing to 8 bits"


def test_release_tables_are_continuous_and_the_luma_table_transposed():
    q = torch.tensor([30.0, 75.3, 95.0, 99.0])
    tables = release_tables(q).double()
    for i, f in enumerate([5000 / 30 / 100, (200 - 150.6) / 100, 0.1, 0.02]):
        np.testing.assert_allclose(tables[i, 0].numpy(), LUMA.T * f, rtol=1e-6)
        np.testing.assert_allclose(tables[i, 1].numpy(), CHROMA * f, rtol=1e-6)  # symmetric: its transpose is itself
    assert tables[3].min() < 1  # not clipped to [1, 255] as libjpeg's are


def cosine_image(amplitude: float, horizontal: bool) -> torch.Tensor:
    """A gray 16 x 16 image: 128 + amplitude * cos((2 n + 1) pi / 16) along columns (horizontal) or rows, in [0, 1]."""
    wave = torch.cos((2 * (torch.arange(16) % 8) + 1) * math.pi / 16) * amplitude
    y = 128 + (wave[None, :].expand(16, 16) if horizontal else wave[:, None].expand(16, 16))
    return (y / 255).expand(1, 3, 16, 16).clone()


def test_the_transposed_luma_table_quantizes_horizontal_frequency_1_with_12_and_vertical_with_11():
    """At quality 50 (factor 1) the DCT coefficient of amplitude A at horizontal frequency 1 is 4 sqrt(2) A: with
    17 / (4 sqrt(2)) it is 17, which step 12 (the release: LUMA[1][0]) rounds to 12, and step 11 (libjpeg's
    LUMA[0][1]) to 22; vertically the other way round. Decoded amplitude = rounded coefficient / (4 sqrt(2))."""
    a = 17 / (4 * math.sqrt(2))
    for horizontal, step in ((True, 12), (False, 22)):
        out = release_jpeg(cosine_image(a, horizontal), torch.tensor([50.0]))
        expected = cosine_image(step / (4 * math.sqrt(2)), horizontal)
        torch.testing.assert_close(out, expected, atol=2e-6, rtol=0)


def test_chroma_is_the_2x2_mean_repeated_over_its_cell():
    """Near quality 100 the quantisation steps vanish: the release's codec is then the colour conversion with
    chroma replaced by its 2 x 2 mean, constant over each cell (nearest-neighbour upsampling). Mid-range colours
    keep the result inside [0, 1] (no clipping)."""
    x = photo(32, 32) * 0.6 + 0.2
    out = release_jpeg(x, torch.tensor([99.999]))
    ycc = lambda t: torch.einsum("cd,bdhw->bchw", torch.tensor([[0.299, 0.587, 0.114], [-0.168736, -0.331264, 0.5],  # noqa: E731
                                                                [0.5, -0.418688, -0.081312]]), t)
    got, src = ycc(out), ycc(x)
    torch.testing.assert_close(got[:, 0], src[:, 0], atol=1e-4, rtol=0)
    means = F.avg_pool2d(src[:, 1:], 2).repeat_interleave(2, -2).repeat_interleave(2, -1)
    torch.testing.assert_close(got[:, 1:], means, atol=1e-4, rtol=0)
    assert (got[:, 1:, 0::2] - got[:, 1:, 1::2]).abs().max() < 1e-4  # constant down each cell ...
    assert (got[:, 1:, :, 0::2] - got[:, 1:, :, 1::2]).abs().max() < 1e-4  # ... and across it
    libjpeg = ycc(jpeg_compress(x, torch.tensor([100.0])))  # fancy upsampling: not constant over the cells
    assert (libjpeg[:, 1:, :, 0::2] - libjpeg[:, 1:, :, 1::2]).abs().max() > 5e-3


def test_sizes_not_a_multiple_of_16_are_zero_padded():
    x = photo(20, 21)
    out = release_jpeg(x, torch.tensor([40.0]))
    black = F.pad(x, (0, 11, 0, 12))  # to 32 x 32 with zeros
    torch.testing.assert_close(out, release_jpeg(black, torch.tensor([40.0]))[..., :20, :21], atol=0, rtol=0)
    edge = F.pad(x, (0, 11, 0, 12), mode="replicate")
    assert (out - release_jpeg(edge, torch.tensor([40.0]))[..., :20, :21]).abs().max() > 1e-2


def test_release_jpeg_per_sample_quality_in_one_batch():
    x = photo(24, 40).expand(3, -1, -1, -1)
    q = torch.tensor([35.0, 70.0, 90.0])
    batch = release_jpeg(x, q)
    for i in range(3):
        torch.testing.assert_close(batch[i : i + 1], release_jpeg(x[:1], q[i : i + 1]), atol=1e-6, rtol=0)


# ---- the first-stage resize by scale_factor ----------------------------------------------------------
@pytest.mark.parametrize("factor", [0.15, 0.37, 0.7131, 1.23, 1.5])
def test_resize_by_factor_gives_floor_of_size_times_factor_and_stretched_content(factor):
    """A ramp through bilinear interpolation stays a ramp: output pixel i holds the input coordinate it samples,
    (i + 0.5) / factor - 0.5 (clamped to the image), where a resize to that size samples (i + 0.5) w / w' - 0.5."""
    h, w = 40, 50
    ramp = torch.arange(w, dtype=torch.float64).expand(1, 1, h, w).contiguous()
    out = resize_by_factor(ramp, factor, "bilinear")
    wo = math.floor(w * factor)
    assert out.shape[-2:] == (math.floor(h * factor), wo)
    i = torch.arange(wo, dtype=torch.float64)
    torch.testing.assert_close(out[0, 0, 0], ((i + 0.5) / factor - 0.5).clamp(0, w - 1), atol=1e-9, rtol=0)
    exact = resize(ramp, (out.shape[-2], wo), "bilinear", antialias=False)
    torch.testing.assert_close(exact[0, 0, 0], ((i + 0.5) * w / wo - 0.5).clamp(0, w - 1), atol=1e-9, rtol=0)
    if w * factor != wo:
        assert (out - exact).abs().max() > 0.1
    torch.testing.assert_close(resize_by_factor(ramp, factor, "area"), resize(ramp, (out.shape[-2], wo), "area"))


def test_scale_factor_rule_in_the_pipeline_sizes_and_modes():
    d = make("realesrgan_osediff_release", seed=2)
    params = d.sample(6, (64, 48))
    xs = list(photo(64, 48).expand(6, -1, -1, -1).unbind(0))
    out = rescale_each(xs, params["first"]["factor"].tolist(), params["first"]["mode"], antialias=False)
    assert [tuple(o.shape[-2:]) for o in out] == params["sizes1"]
    hq = torch.rand(6, 3, 64, 48, generator=torch.Generator().manual_seed(1)) * 2 - 1
    size_rule = make("realesrgan_osediff_release", seed=2, resize_rule="size")
    areas = select_samples(params, list(range(6)))
    areas["first"]["mode"] = ["area"] * 6  # area ignores the factor: both rules agree
    torch.testing.assert_close(d.apply(hq, areas), size_rule.apply(hq, areas), atol=0, rtol=0)
    bilinear = select_samples(params, list(range(6)))
    bilinear["first"]["mode"] = ["bilinear"] * 6
    bilinear["first"]["factor"] = torch.full((6,), 0.37, dtype=torch.float64)
    bilinear["sizes1"] = [(23, 17)] * 6
    assert (d.apply(hq, bilinear) - size_rule.apply(hq, bilinear)).abs().max() > 1e-3


# ---- the Poisson level count -------------------------------------------------------------------------
def test_release_level_count_is_two_to_the_ceil_log2_of_the_distinct_values():
    counts = torch.tensor([1, 2, 3, 4, 5, 100, 127, 128, 129, 200, 256])
    assert release_levels(counts).tolist() == [2 ** math.ceil(math.log2(n)) for n in counts.tolist()]
    x = torch.zeros(2, 3, 10, 10)
    x[0].view(-1)[:100] = torch.arange(100) / 255  # 100 levels, the rest 0 (counted once)
    x[1] = 7 / 255
    x[1, 0, 0, 0] = 1.2  # clipped to 255
    assert distinct_8bit((x * 255).round().clamp(0, 255) / 255).tolist() == [100, 2]


def test_release_poisson_noise_written_out():
    """Noise = (Poisson(v L) / L - v) * scale around v = x rounded to 8 bits, L from v's distinct values; a
    flat image has one value and so L = 1: its noise std is scale * sqrt(v), not scale * sqrt(v / 256)."""
    x = photo(24, 24) * 0.4 + 0.2001  # fewer than 128 distinct 8-bit values
    v = (x * 255).round().clamp(0, 255) / 255
    levels = 2.0 ** math.ceil(math.log2(len(torch.unique(v))))
    assert levels == 128
    got = release_poisson_noise(x, torch.tensor([1.5], dtype=torch.float64), False, [torch.Generator().manual_seed(3)])
    expected = (torch.poisson(v * levels, generator=torch.Generator().manual_seed(3)) / levels - v) * 1.5
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=0)
    flat = torch.full((2, 3, 64, 64), 0.5)
    gens = [torch.Generator().manual_seed(i) for i in range(2)]
    noise = release_poisson_noise(flat, torch.tensor([1.0, 0.5], dtype=torch.float64), False, gens)
    v = round(0.5 * 255) / 255
    torch.testing.assert_close(noise.flatten(1).std(dim=1), torch.tensor([1.0, 0.5]) * math.sqrt(v), rtol=0.05, atol=0)
    fixed = poisson_noise(flat, torch.tensor([1.0, 0.5], dtype=torch.float64), False, 256.0, gens)
    assert fixed.std() < noise.std() / 10


def test_release_gray_poisson_uses_torchvisions_grayscale():
    x = photo(16, 16)
    torch.testing.assert_close(gray_torchvision(x), rgb_to_grayscale(x), atol=0, rtol=0)
    noise = release_poisson_noise(x, torch.tensor([1.0], dtype=torch.float64), True, [torch.Generator().manual_seed(0)])
    assert torch.equal(noise[:, 0], noise[:, 2])
    v = (rgb_to_grayscale(x) * 255).round() / 255
    levels = 2.0 ** math.ceil(math.log2(len(torch.unique(v))))
    expected = torch.poisson(v * levels, generator=torch.Generator().manual_seed(0)) / levels - v
    torch.testing.assert_close(noise[:, :1], expected, atol=1e-6, rtol=0)


# ---- the unclamped LQ and the per-sample resize back ------------------------------------------------
def test_unclamped_lq_keeps_only_the_overshoot_of_jpeg_first_samples():
    d = make("realesrgan_osediff_release", seed=4)
    clamped = make("realesrgan_osediff_release", seed=4, clamp_lq=True)
    hq = photo(64, 64).expand(8, -1, -1, -1) * 2 - 1
    params = d.sample(8, (64, 64))
    params["final"]["jpeg_first"] = torch.tensor([True, False] * 4)
    params["final"]["sinc"] = torch.ones(8, dtype=torch.bool)
    lq, lq_clamped = d.apply(hq, params), clamped.apply(hq, params)
    torch.testing.assert_close(lq.clamp(-1, 1), lq_clamped, atol=0, rtol=0)
    assert lq[0::2].abs().max() > 1 and lq[1::2].abs().max() <= 1


def test_resize_back_drawn_per_sample():
    lq = torch.rand(16, 3, 8, 8) * 2 - 1
    modes = ["area", "bilinear", "bicubic"]
    torch.manual_seed(3)
    out = upsample_input(lq, (32, 32), modes, quantize_8bit=True, per_sample=True)
    torch.manual_seed(3)
    picks = torch.randint(3, (16,)).tolist()
    assert len(set(picks)) == 3
    for i, p in enumerate(picks):
        alone = upsample_input(lq[i : i + 1], (32, 32), [modes[p]], quantize_8bit=True)
        torch.testing.assert_close(out[i : i + 1], alone, atol=0, rtol=0)
    torch.manual_seed(3)
    batch_wide = upsample_input(lq, (32, 32), modes)
    torch.manual_seed(3)
    one = modes[int(torch.randint(3, (1,)))]
    torch.testing.assert_close(batch_wide, upsample_input(lq, (32, 32), [one]), atol=0, rtol=0)


# ---- the whole release pipeline ----------------------------------------------------------------------
@pytest.mark.parametrize("name", ["realesrgan_osediff_release", "realesrgan_pisasr_release"])
def test_release_batch_equals_each_sample_processed_alone(name):
    d = make(name, seed=11)
    hq = torch.rand(8, 3, 64, 48, generator=torch.Generator().manual_seed(0)) * 2 - 1
    params = d.sample(8, (64, 48))
    params["first"]["gaussian"][:4] = False  # Poisson noise in both stages for half the batch
    params["second"]["gaussian"][:4] = False
    batched = d.apply(hq, params)
    assert batched.shape == (8, 3, 16, 12)
    for i in range(8):
        alone = d.apply(hq[i : i + 1], select_samples(params, [i]))
        torch.testing.assert_close(batched[i : i + 1], alone, atol=2e-5, rtol=0)


def test_release_pipeline_runs_every_jpeg_through_the_release_codec_and_its_poisson_rule(monkeypatch):
    """Wiring: the first-stage JPEG and the final one, in either order, go through ``release_diffjpeg``, never
    libjpeg; Poisson samples go through the release's level rule."""
    calls = {"libjpeg": 0, "release_diffjpeg": 0, "poisson": 0}

    def counting(name, fn):
        def wrapped(*args):
            calls[name] += 1
            return fn(*args)

        return wrapped

    for name in ("libjpeg", "release_diffjpeg"):
        monkeypatch.setitem(realesrgan.JPEG_CODECS, name, counting(name, realesrgan.JPEG_CODECS[name]))
    monkeypatch.setattr(realesrgan, "release_poisson_noise", counting("poisson", realesrgan.release_poisson_noise))
    d = make("realesrgan_osediff_release", seed=6, resize_per_sample=False)
    params = d.sample(4, (64, 64))
    params["final"]["jpeg_first"] = torch.tensor([True, True, False, False])
    params["first"]["gaussian"][:] = False
    d.apply(torch.rand(4, 3, 64, 64) * 2 - 1, params)
    assert calls["libjpeg"] == 0 and calls["release_diffjpeg"] == 3 and calls["poisson"] >= 1


def test_release_configs_hold_the_releases_values():
    """OSEDiff's dataloaders/params_realesrgan.yml and PiSA-SR's src/datasets/params.yml, typed out."""
    osediff = {"first": {"resize_probs": [0.2, 0.7, 0.1], "resize_range": [0.15, 1.5], "gaussian_noise_prob": 0.5,
                         "noise_range": [1, 30], "poisson_scale_range": [0.05, 3.0], "gray_noise_prob": 0.4,
                         "jpeg_range": [30, 95], "blur_sigma": [0.2, 3], "sinc_prob": 0.1, "blur_prob": 1.0},
               "second": {"blur_prob": 0.8, "resize_probs": [0.3, 0.4, 0.3], "resize_range": [0.3, 1.2],
                          "gaussian_noise_prob": 0.5, "noise_range": [1, 25], "poisson_scale_range": [0.05, 2.5],
                          "gray_noise_prob": 0.4, "jpeg_range": [30, 95], "blur_sigma": [0.2, 1.5], "sinc_prob": 0.1}}
    pisasr = {"first": {**osediff["first"], "resize_range": [0.3, 1.5], "noise_range": [1, 15],
                        "poisson_scale_range": [0.05, 2.0], "jpeg_range": [60, 95]},
              "second": {**osediff["second"], "blur_prob": 0.5, "resize_range": [0.6, 1.2], "noise_range": [1, 12],
                         "poisson_scale_range": [0.05, 1.0], "jpeg_range": [60, 100]}}
    for name, values in (("realesrgan_osediff_release", osediff), ("realesrgan_pisasr_release", pisasr)):
        c = compose_config([f"degradation={name}"]).degradation
        for stage, keys in values.items():
            for k, v in keys.items():
                assert c[stage][k] == v, (name, stage, k)
        for stage in ("first", "second"):
            assert list(c[stage].kernel_probs) == [0.45, 0.25, 0.12, 0.03, 0.12, 0.03]
            assert list(c[stage].betag) == [0.5, 4] and list(c[stage].betap) == [1, 2]
        assert c.final.sinc_prob == 0.8 and c.final.jpeg_first_prob == 0.5
        assert c.kernel_size == 21 and list(c.kernel_size_range) == [7, 21]
        assert list(c.sinc_omega_small) == [1 / 3, 1.0] and list(c.sinc_omega_large) == [0.2, 1.0]
        assert list(c.resize_modes) == ["area", "bilinear", "bicubic"] and c.antialias is False
        assert (c.jpeg_codec, c.resize_rule, c.poisson_levels, c.clamp_lq) == ("release_diffjpeg", "scale_factor", "release", False)
    paper = compose_config(["+experiment=osediff_paper"]).degradation
    assert (paper.name, paper.jpeg_codec, paper.resize_rule, paper.poisson_levels, paper.clamp_lq) == (
        "realesrgan", "libjpeg", "size", 256, True)
    assert compose_config(["+experiment=osediff_release"]).degradation.name == "realesrgan_osediff_release"


@pytest.mark.parametrize(("key", "value"), [("jpeg_codec", "pillow"), ("resize_rule", "nearest"),
                                            ("poisson_levels", "auto"), ("poisson_levels", -1), ("clamp_lq", "no")])
def test_bad_quirk_switches_are_config_errors_naming_the_key(key, value):
    with pytest.raises(ConfigError, match=f"degradation.{key}"):
        make("realesrgan", **{key: value})
