"""Real-ESRGAN degradation: kernels by their formulas, noise by its measured std, JPEG against Pillow,
reproducibility from the seed, and the LQ size contract."""

from __future__ import annotations

import io
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from omegaconf import open_dict
from PIL import Image

from helpers import compose_config
from osediff_lab.data.degradation import BicubicDegradation, build_degradation, degrade_pair
from osediff_lab.data.jpeg import jpeg_compress, quantization_tables
from osediff_lab.data.kernels import (
    KERNEL_TYPES,
    gaussian_kernel,
    generalized_gaussian_kernel,
    plateau_kernel,
    sample_kernels,
    sinc_kernel,
)
from osediff_lab.data.realesrgan import (
    PairPool,
    RealESRGANDegradation,
    blur_each,
    correlate,
    depthwise_correlate,
    describe,
    fft_size,
    filter_each,
    gaussian_noise,
    kernel_spec,
    poisson_noise,
    pulse,
    resize_each,
    select_samples,
    support,
)
from osediff_lab.errors import ConfigError


@pytest.fixture(scope="module")
def cfg():
    return compose_config(["degradation=realesrgan"])


def photo(size: int = 128) -> np.ndarray:
    """A natural 8-bit RGB crop (scikit-image's astronaut, bundled, no download)."""
    import skimage

    return np.ascontiguousarray(skimage.data.astronaut()[100 : 100 + size, 150 : 150 + size])


def to01(arr: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(arr.copy()).permute(2, 0, 1).float()[None] / 255


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    return 10 * math.log10(1 / ((a - b) ** 2).mean().item())


# ---- kernels ---------------------------------------------------------------------------------------
def test_every_kernel_sums_to_one():
    s = torch.tensor([0.3, 1.0, 2.5])
    th = torch.tensor([0.0, 0.7, -2.0])
    beta = torch.tensor([0.5, 1.0, 3.0])
    for k in (
        gaussian_kernel(21, s, s * 0.5 + 0.2, th),
        generalized_gaussian_kernel(21, s, s, th, beta),
        plateau_kernel(21, s, s + 0.3, th, beta),
        sinc_kernel(21, torch.tensor([0.3, 0.6, 1.0]) * math.pi),
    ):
        assert k.shape == (3, 21, 21)
        torch.testing.assert_close(k.sum(dim=(-2, -1)), torch.ones(3), atol=1e-6, rtol=0)


def test_isotropic_gaussian_is_the_outer_product_of_1d_gaussians():
    sigma = 1.7
    x = torch.arange(21, dtype=torch.float64) - 10
    g = torch.exp(-(x**2) / (2 * sigma**2))
    expected = torch.outer(g, g) / torch.outer(g, g).sum()
    k = gaussian_kernel(21, torch.tensor([sigma]), torch.tensor([sigma]), torch.tensor([1.234]))[0]
    torch.testing.assert_close(k.double(), expected, atol=1e-7, rtol=0)


def test_isotropic_kernels_are_symmetric():
    s, zero = torch.tensor([1.3]), torch.tensor([0.0])
    for k in (
        generalized_gaussian_kernel(21, s, s, zero, torch.tensor([2.5]))[0],
        plateau_kernel(21, s, s, zero, torch.tensor([1.5]))[0],
        sinc_kernel(21, torch.tensor([0.4 * math.pi]))[0],
    ):
        for view in (k.T, k.flip(0), k.flip(1), k.rot90()):
            torch.testing.assert_close(view, k, atol=1e-7, rtol=0)


def test_anisotropic_gaussian_covariance_matches_sigma_and_rotation():
    sx, sy, th = 3.0, 1.0, math.radians(30)
    k = gaussian_kernel(41, torch.tensor([sx]), torch.tensor([sy]), torch.tensor([th]))[0].double()
    ax = torch.arange(41, dtype=torch.float64) - 20
    yy, xx = torch.meshgrid(ax, ax, indexing="ij")
    cov = torch.tensor(
        [[(k * xx * xx).sum(), (k * xx * yy).sum()], [(k * xx * yy).sum(), (k * yy * yy).sum()]], dtype=torch.float64
    )
    r = torch.tensor([[math.cos(th), -math.sin(th)], [math.sin(th), math.cos(th)]], dtype=torch.float64)
    expected = r @ torch.diag(torch.tensor([sx**2, sy**2], dtype=torch.float64)) @ r.T
    torch.testing.assert_close(cov, expected, atol=0.02, rtol=0.01)


def test_generalized_and_plateau_shapes_by_hand():
    s = torch.tensor([2.0])
    zero = torch.tensor([0.0])
    beta = torch.tensor([2.0])
    q = lambda x, y: (x**2 + y**2) / 4.0  # noqa: E731  (Mahalanobis distance for sigma 2, isotropic)
    gen = generalized_gaussian_kernel(21, s, s, zero, beta)[0].double()
    pla = plateau_kernel(21, s, s, zero, beta)[0].double()
    # ratios between taps are normalisation-free: centre (10,10) vs offset (x=3, y=1) at [11, 13]
    assert gen[11, 13] / gen[10, 10] == pytest.approx(math.exp(-0.5 * q(3, 1) ** 2), rel=1e-6)
    assert pla[11, 13] / pla[10, 10] == pytest.approx(1 / (1 + q(3, 1) ** 2), rel=1e-6)


def test_sinc_spectrum_cuts_off_at_omega():
    n = 256
    f = torch.fft.fftfreq(n, dtype=torch.float64) * 2 * math.pi
    fy, fx = torch.meshgrid(f, f, indexing="ij")
    radius = (fx**2 + fy**2).sqrt()
    for frac in (0.3, 0.5, 0.8):
        omega = frac * math.pi
        spectrum = torch.fft.fft2(sinc_kernel(21, torch.tensor([omega]))[0].double(), s=(n, n)).abs()
        assert spectrum[radius < 0.8 * omega].min() > 0.7  # passband
        assert spectrum[(radius > 1.2 * omega) & (radius < math.pi)].max() < 0.12  # stopband
        assert 0.35 < spectrum[(radius > 0.97 * omega) & (radius < 1.03 * omega)].mean() < 0.6  # half amplitude at omega


def test_sampled_kernels_respect_window_types_and_normalisation(cfg):
    g = torch.Generator().manual_seed(0)
    settings = make(cfg).settings
    kernels, params = sample_kernels(400, kernel_spec(settings, settings.first), g)
    assert kernels.shape == (400, 21, 21)
    torch.testing.assert_close(kernels.sum(dim=(-2, -1)), torch.ones(400), atol=1e-5, rtol=0)
    ax = torch.arange(21) - 10
    for k, ks in zip(kernels, params["ksize"].tolist(), strict=True):
        assert ks % 2 == 1 and 7 <= ks <= 21
        outside = (ax.abs()[:, None] > ks // 2) | (ax.abs()[None, :] > ks // 2)
        assert k[outside].abs().sum() == 0 and k[10, 10] > 0
    kinds = params["type"]
    assert 0.04 < (kinds == -1).float().mean() < 0.18  # sinc_prob 0.1
    assert 0.3 < (kinds == KERNEL_TYPES.index("iso")).float().mean() < 0.5  # 0.45 of the remaining 0.9 ~ 0.405
    iso = kinds == 0
    torch.testing.assert_close(params["sigma_x"][iso], params["sigma_y"][iso])


# ---- batched operations --------------------------------------------------------------------------
def reference_filter(x: torch.Tensor, kernel: torch.Tensor, mode: str = "reflect") -> torch.Tensor:
    """One sample (1, C, H, W) correlated with one odd kernel by a plain depthwise convolution."""
    r, c = kernel.shape[-1] // 2, x.shape[1]
    return F.conv2d(F.pad(x, (r, r, r, r), mode=mode), kernel.expand(c, 1, -1, -1), groups=c)


@pytest.mark.parametrize("size", [7, 21])  # a grouped convolution, and the FFT (sizes above DIRECT_MAX)
def test_filter_each_applies_each_samples_own_kernel(size):
    x = torch.rand(3, 3, 24, 20)
    kernels = torch.rand(3, size, size)
    out = filter_each(x, kernels)
    for i in range(3):
        torch.testing.assert_close(out[i : i + 1], reference_filter(x[i : i + 1], kernels[i]), atol=1e-5, rtol=1e-5)
    padded_kernels = F.pad(kernels, (7, 7, 7, 7))  # zero taps around a kernel change nothing
    torch.testing.assert_close(filter_each(x, padded_kernels), out, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(filter_each(x, pulse(3, 21)), x)


def test_blur_each_groups_by_support_and_size():
    """Samples of different sizes and kernel supports (a pulse among them) each get their own correlation."""
    g = torch.Generator().manual_seed(0)
    xs = [torch.rand(3, 40, 36, generator=g), torch.rand(3, 40, 36, generator=g), torch.rand(3, 17, 29, generator=g),
          torch.rand(3, 40, 36, generator=g)]
    kernels = torch.zeros(4, 21, 21)
    kernels[0, 7:14, 7:14] = torch.rand(7, 7, generator=g)   # support 7
    kernels[1, 3:18, 5:16] = torch.rand(15, 11, generator=g)  # support 15 (non-square taps)
    kernels[2] = torch.rand(21, 21, generator=g)
    kernels[3, 10, 10] = 1  # no blur
    out = blur_each(xs, kernels)
    assert [o.shape for o in out] == [x.shape for x in xs]
    for x, k, o in zip(xs, kernels, out, strict=True):
        torch.testing.assert_close(o[None], reference_filter(x[None], k), atol=1e-5, rtol=1e-5)
    assert torch.equal(out[3], xs[3])
    assert support(kernels) == [3, 7, 10, 0]


@pytest.mark.parametrize(("b", "h"), [(1, 37), (1, 128), (2, 50), (8, 40)])
def test_rows_cut_into_strips_give_the_plain_convolution_bit_for_bit(b, h):
    """Few channels: the rows go through the convolution as overlapping strips stacked as channels (37 rows:
    two strips, the last one filled with zero rows; 8 samples: 24 channels, no strips). Each output pixel
    sees the same taps, so the result is the plain grouped convolution's, exactly."""
    g = torch.Generator().manual_seed(b * h)
    x, k = torch.rand(b, 3, h + 6, 29, generator=g), torch.rand(b, 7, 7, generator=g)
    plain = F.conv2d(x.reshape(1, 3 * b, h + 6, 29), k.repeat_interleave(3, 0)[:, None], groups=3 * b)
    assert torch.equal(depthwise_correlate(x, k), plain.view(b, 3, h, 23))


def test_plain_blur_is_the_full_kernel_convolution_and_auto_agrees_with_it(cfg):
    """blur=plain is Real-ESRGAN's filter2D (the test's reference filter); blur=auto (support crop, strips,
    FFT above DIRECT_MAX) gives the same degradation up to float rounding, which 8-bit JPEG can round to a
    neighbouring level in rare pixels."""
    g = torch.Generator().manual_seed(3)
    xs = [torch.rand(3, 40, 36, generator=g), torch.rand(3, 33, 29, generator=g)]
    kernels = torch.zeros(2, 21, 21)
    kernels[0, 7:14, 7:14], kernels[1] = torch.rand(7, 7, generator=g), torch.rand(21, 21, generator=g)
    for x, k, o in zip(xs, kernels, blur_each(xs, kernels, method="plain"), strict=True):
        assert torch.equal(o[None], reference_filter(x[None], k))
    auto, plain = make(cfg, seed=5), make(cfg, seed=5, blur="plain")
    hq = torch.rand(4, 3, 96, 96, generator=g) * 2 - 1
    params = auto.sample(4, (96, 96))
    diff = (auto.apply(hq, params) - plain.apply(hq, params)).abs()
    assert diff.max() <= 2 / 255 + 1e-6 and (diff > 1e-5).float().mean() < 0.01


def test_correlate_falls_back_to_replicate_on_tiny_images():
    x, k = torch.rand(1, 3, 6, 30), torch.rand(1, 15, 15)
    torch.testing.assert_close(correlate(x, k), reference_filter(x, k[0], "replicate"), atol=1e-5, rtol=1e-5)


def test_fft_sizes_have_only_small_prime_factors():
    assert [fft_size(n) for n in (1, 7, 17, 532, 553)] == [1, 8, 18, 540, 576]


def test_resize_each_matches_per_sample_interpolation():
    x = torch.rand(2, 3, 40, 40)
    xs = [x[0], x[1, :, :30, :36]]
    out = resize_each(xs, [(20, 22), (45, 50)], ["bilinear", "area"], antialias=False)
    assert [o.shape for o in out] == [(3, 20, 22), (3, 45, 50)]
    torch.testing.assert_close(out[0][None], F.interpolate(x[:1], size=(20, 22), mode="bilinear", align_corners=False))
    torch.testing.assert_close(out[1][None], F.interpolate(x[1:, :, :30, :36], size=(45, 50), mode="area"))


def test_gaussian_noise_std_matches_each_samples_sigma():
    gens = [torch.Generator().manual_seed(i) for i in range(4)]
    sigma = torch.tensor([1.0, 10.0, 30.0, 20.0]) / 255
    colour = gaussian_noise(torch.Size((2, 3, 128, 128)), sigma[:2], False, gens[:2])
    gray = gaussian_noise(torch.Size((2, 3, 128, 128)), sigma[2:], True, gens[2:])
    measured = torch.cat([colour, gray]).flatten(1).std(dim=1)
    torch.testing.assert_close(measured, sigma, rtol=0.03, atol=0)
    torch.testing.assert_close(gray[:, 0], gray[:, 2])  # gray: one field for every channel
    assert (colour[0, 0] - colour[0, 1]).abs().max() > 0
    again = gaussian_noise(torch.Size((1, 3, 128, 128)), sigma[1:2], False, [torch.Generator().manual_seed(1)])
    torch.testing.assert_close(again, colour[1:])  # each sample's field comes from its own generator only


def test_poisson_noise_std_follows_shot_noise_law():
    levels, v = 256.0, 0.5
    scale = torch.tensor([0.5, 2.0, 3.0])
    x = torch.full((3, 3, 128, 128), v)
    gens = [torch.Generator().manual_seed(i) for i in range(3)]
    noise = torch.cat([poisson_noise(x[:2], scale[:2], False, levels, gens[:2]),
                       poisson_noise(x[2:], scale[2:], True, levels, gens[2:])])
    expected = scale * math.sqrt(v / levels)
    torch.testing.assert_close(noise.flatten(1).std(dim=1), expected, rtol=0.04, atol=0)
    assert noise.flatten(1).mean(dim=1).abs().max() < 0.01
    torch.testing.assert_close(noise[2, 0], noise[2, 1])


def test_jpeg_quality_95_is_close_and_30_is_not():
    x = to01(photo())
    hi, lo = psnr(jpeg_compress(x, torch.tensor([95.0])), x), psnr(jpeg_compress(x, torch.tensor([30.0])), x)
    assert hi > 36
    assert lo < hi - 5 and lo < 32


def pillow_jpeg(img: np.ndarray, quality: int) -> tuple[torch.Tensor, dict]:
    """libjpeg through Pillow (defaults: 4:2:0, IJG tables, fancy upsampling): decoded image and its tables."""
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, "JPEG", quality=quality)
    decoded = Image.open(io.BytesIO(buf.getvalue()))
    return to01(np.array(decoded.convert("RGB"))), decoded.quantization


@pytest.mark.parametrize("quality", [10, 30, 49, 50, 60, 90, 100])
def test_jpeg_tables_are_libjpegs_at_integer_qualities(quality):
    _, tables = pillow_jpeg(photo(16), quality)
    ours = quantization_tables(torch.tensor([float(quality)]))[0].int()
    assert ours[0].flatten().tolist() == list(tables[0]) and ours[1].flatten().tolist() == list(tables[1])


def test_jpeg_agrees_with_libjpeg():
    """PSNR(ours, libjpeg's decode) >= 44 dB, the distortion each causes within 0.1 dB. What is left: libjpeg's
    integer DCT and its rounding of the chroma box average."""
    img = photo()
    x = to01(img)
    for q in (30, 60, 90):
        ref, _ = pillow_jpeg(img, q)
        ours = jpeg_compress(x, torch.tensor([float(q)]))
        assert psnr(ours, ref) >= 44
        assert abs(psnr(ours, x) - psnr(ref, x)) < 0.1
    batch = jpeg_compress(x.expand(2, -1, -1, -1), torch.tensor([30.0, 90.0]))  # per-sample quality in one batch
    assert torch.equal(batch[1:], jpeg_compress(x, torch.tensor([90.0])))
    assert torch.equal(batch * 255, (batch * 255).round())  # decoded to 8 bit
    odd = jpeg_compress(x[..., :45, :37], torch.tensor([60.0]))  # partial MCUs: edges replicated, then cropped
    assert odd.shape == (1, 3, 45, 37) and psnr(odd, x[..., :45, :37]) > 28


# ---- the pipeline --------------------------------------------------------------------------------
def make(cfg, **overrides) -> RealESRGANDegradation:
    c = cfg.degradation.copy()
    with open_dict(c):
        for k, v in overrides.items():
            c[k] = v
    return build_degradation(c, 4)


def test_build_from_config_and_lq_size_is_hq_over_scale(cfg):
    d = build_degradation(cfg.degradation, cfg.scale)
    assert isinstance(d, RealESRGANDegradation)
    for h, w in ((64, 64), (64, 96)):
        hq = torch.rand(3, 3, h, w) * 2 - 1
        lq = d(hq)
        assert lq.shape == (3, 3, h // 4, w // 4)
        assert lq.min() >= -1 and lq.max() <= 1
    with pytest.raises(ValueError, match="not divisible"):
        d(torch.zeros(1, 3, 62, 64))


def test_same_seed_same_batches_and_state_resumes(cfg):
    hq = torch.rand(2, 3, 48, 48) * 2 - 1
    a, b = make(cfg, seed=7), make(cfg, seed=7)
    torch.testing.assert_close(a(hq), b(hq), rtol=0, atol=0)
    assert a.last_params == b.last_params
    assert not torch.equal(make(cfg, seed=8)(hq), make(cfg, seed=7)(hq))
    state = a.state_dict()
    expected = a(hq)
    resumed = make(cfg, seed=0)
    resumed.load_state_dict(state)
    torch.testing.assert_close(resumed(hq), expected, rtol=0, atol=0)


def test_parameters_are_drawn_per_sample_and_described(cfg):
    d = make(cfg, seed=3)
    d(torch.rand(8, 3, 64, 64) * 2 - 1)
    assert len(d.last_params) == 8
    assert len({r["jpeg1"] for r in d.last_params}) == 8
    assert len({r["resize1"][1] for r in d.last_params}) > 1
    lines = describe(d.last_params[0])
    assert any("jpeg q" in line for line in lines) and lines[0].startswith("1:")


@pytest.mark.parametrize("per_sample_resize", [True, False])
def test_batch_equals_each_sample_processed_alone(cfg, per_sample_resize):
    """The batched path (groups by size, support, mode, noise kind) against the per-sample path: each sample
    alone through ``apply`` with its own parameters, batch of 8 with mixed sizes, kernels and orders."""
    d = make(cfg, seed=11, resize_per_sample=per_sample_resize)
    hq = torch.rand(8, 3, 64, 48, generator=torch.Generator().manual_seed(0)) * 2 - 1
    params = d.sample(8, (64, 48))
    if per_sample_resize:
        assert len(set(params["sizes1"])) > 1 and len(set(support(params["first"]["kernels"]))) > 1
    batched = d.apply(hq, params)
    assert batched.shape == (8, 3, 16, 12)
    for i in range(8):
        alone = d.apply(hq[i : i + 1], select_samples(params, [i]))
        torch.testing.assert_close(batched[i : i + 1], alone, atol=2e-5, rtol=0)


def test_batch_wide_resize_option_shares_one_factor(cfg):
    d = make(cfg, seed=3, resize_per_sample=False)
    lq = d(torch.rand(4, 3, 64, 64) * 2 - 1)
    assert lq.shape == (4, 3, 16, 16)
    for stage in ("resize1", "resize2"):
        assert len({r[stage] for r in d.last_params}) == 1
    assert len({r["jpeg1"] for r in d.last_params}) == 4  # the rest stays per sample


def test_bad_kernel_type_is_a_config_error(cfg):
    c = cfg.degradation.copy()
    with open_dict(c):
        c.first.kernel_types = ["iso", "box", "aniso", "plateau_iso", "plateau_aniso", "generalized_iso"]
    with pytest.raises(ConfigError, match="degradation.first.kernel_types"):
        build_degradation(c, 4)


def test_pair_pool_keeps_partners_together_and_mixes_batches():
    pool, g = PairPool(6), torch.Generator().manual_seed(0)
    returned: list[float] = []
    for step in range(10):
        ids = torch.arange(2 * step, 2 * step + 2, dtype=torch.float32)
        hq, lq = ids.view(2, 1, 1, 1).expand(2, 3, 8, 8), (10 * ids).view(2, 1, 1, 1).expand(2, 3, 2, 2)
        out_hq, out_lq = pool(hq, lq, g)
        torch.testing.assert_close(out_lq[:, :, 0, 0], 10 * out_hq[:, :, 0, 0])  # partners stay together
        got = out_hq[:, 0, 0, 0].tolist()
        if step < 3:
            assert got == ids.tolist()  # filling: passes through
        else:
            assert all(i < 2 * step for i in got)  # swapped for pairs of earlier batches
            returned += got
    assert len(set(returned)) == len(returned)  # once full, each stored pair is served once (Real-ESRGAN's queue)
    with pytest.raises(ValueError, match="multiple of the batch size"):
        PairPool(5)(hq, lq, g)


def test_pool_pairs_come_back_and_the_input_hq_is_left_alone(cfg):
    """Issue 26: the pool's (HQ, LQ) partners are returned (``pair`` / ``degrade_pair``), never written into the
    caller's HQ; the plain call refuses while the pool is on; a degradation without ``pair`` gives (hq, LQ)."""
    d = make(cfg, seed=5, pool={"enabled": True, "size": 2})
    first = torch.rand(2, 3, 32, 32) * 2 - 1
    _, lq_first = degrade_pair(d, first)
    second = torch.rand(2, 3, 32, 32) * 2 - 1
    kept = second.clone()
    hq, lq = degrade_pair(d, second)
    assert torch.equal(second, kept)
    assert {round(float(v), 5) for v in hq[:, 0, 0, 0]} == {round(float(v), 5) for v in first[:, 0, 0, 0]}
    assert {round(float(v), 5) for v in lq[:, 0, 0, 0]} == {round(float(v), 5) for v in lq_first[:, 0, 0, 0]}
    with pytest.raises(ValueError, match="pair"):
        d(second)
    x = torch.rand(1, 3, 16, 16) * 2 - 1
    same, down = degrade_pair(BicubicDegradation(4), x)
    assert same is x and down.shape == (1, 3, 4, 4)


def test_preview_writes_a_grid_with_one_column_per_sample(tmp_path):
    from osediff_lab.data.preview import run_preview

    cfg = compose_config(["degradation=realesrgan", "data=demo", "data.crop_size=64", "data.batch_size=2"], tmp_path)
    path = run_preview(cfg)
    assert path.parent == tmp_path / "preview" and path.suffix == ".png"
    with Image.open(path) as im:
        assert im.width >= 2 * 64 and im.height > 2 * 64  # HQ row, LQ row, parameter text
