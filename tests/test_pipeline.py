"""Inference pipeline: the size rule, LoRA merge, tiling, colour fixes, precision and determinism."""

from __future__ import annotations

import copy

import pytest
import torch
from PIL import Image

from helpers import TINY, compose_config
from osediff_lab.errors import ConfigError
from osediff_lab.models.components import Components, build_components
from osediff_lab.models.generator import OSEDiffGenerator
from osediff_lab.models.lora import adapters_disabled
from osediff_lab.models.osediff import build_generator
from osediff_lab.pipeline import OSEDiffPipeline, adain_color_fix, plan_sizes, wavelet_color_fix
from osediff_lab.pipeline.colorfix import channel_stats, wavelet_split
from osediff_lab.pipeline.tiling import gaussian_weights, tile_starts, tiled_apply
from osediff_lab.prompts import NullPrompt

FAST = {"process_size": 64, "color_fix": "none"}


def perturb_trained(generator: OSEDiffGenerator, seed: int = 1) -> None:
    """Give every trained tensor (LoRA A/B, conv_in) a random offset, as training would: LoRA B starts at 0."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in sorted(generator.named_parameters()):
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * 0.05)


def tiny_model(overrides: list[str] | None = None, seed: int = 42) -> tuple[Components, OSEDiffGenerator, dict]:
    """Tiny base components and a LoRA generator with non-trivial trained weights."""
    cfg = compose_config(TINY + list(overrides or []))
    torch.manual_seed(seed)
    components = build_components(cfg.model)
    generator, targets = build_generator(components, cfg.generator, share_unet=True)
    perturb_trained(generator)
    return components, generator, targets


def make_pipeline(components: Components, generator: OSEDiffGenerator, **options) -> OSEDiffPipeline:
    """A pipeline over a copy of the generator (merging changes weights in place)."""
    opts = {"merge_lora": False, **FAST, **options}
    return OSEDiffPipeline(copy.deepcopy(generator), components.tokenizer, components.text_encoder, NullPrompt(), 4, opts)


@pytest.fixture(scope="module")
def model():
    components, generator, _ = tiny_model()
    return components, generator


def lq_batch(h: int, w: int, seed: int = 0) -> torch.Tensor:
    """A smooth-ish random LQ image in [0, 1] (random low-res noise, bicubic-upsampled)."""
    g = torch.Generator().manual_seed(seed)
    coarse = torch.rand(1, 3, max(2, h // 6), max(2, w // 6), generator=g)
    return torch.nn.functional.interpolate(coarse, size=(h, w), mode="bicubic", align_corners=False).clamp(0, 1)


# ---- sizes ------------------------------------------------------------------------------------
def test_size_plan_hand_worked():
    # 37 < 512 / 4: enlarge by 512 / (4 * 37) so the short side is 512; 212 * 3.459 = 733.4 -> 733 -> pad 736
    small = plan_sizes(37, 53, 4, 512, 8)
    assert (small.work, small.padded, small.out) == ((512, 733), (512, 736), (148, 212))
    assert small.enlarged
    big = plan_sizes(200, 301, 4, 512, 8)  # no enlargement; 1204 is padded to 1208, the output is not
    assert (big.work, big.padded, big.out) == ((800, 1204), (800, 1208), (800, 1204))
    assert not big.enlarged


@pytest.mark.parametrize(("h", "w", "process_size"), [(37, 53, 64), (21, 30, 64), (37, 53, 256)])
def test_output_is_exactly_scale_times_input(model, h, w, process_size):
    pipe = make_pipeline(*model, process_size=process_size)
    assert pipe(lq_batch(h, w)).shape == (1, 3, 4 * h, 4 * w)
    (sr,) = pipe([Image.new("L", (w, h), 128)])  # PIL sizes are (width, height); grayscale input
    assert sr.size == (4 * w, 4 * h) and sr.mode == "RGB"


# ---- LoRA merge -------------------------------------------------------------------------------
def test_merged_lora_matches_unmerged_and_lora_matters(model):
    components, generator = model
    lq = lq_batch(32, 32)
    unmerged = make_pipeline(components, generator, merge_lora=False)(lq)
    merged_pipe = make_pipeline(components, generator, merge_lora=True)
    merged = merged_pipe(lq)
    assert not any("lora" in n for n, _ in merged_pipe.generator.named_parameters())  # adapters folded in
    assert (merged - unmerged).abs().max() < 1e-4
    base_pipe = make_pipeline(components, generator)
    with adapters_disabled(base_pipe.generator):
        base = base_pipe(lq)
    assert (base - unmerged).abs().mean() > 1e-2  # the comparison is not vacuous


# ---- tiling -----------------------------------------------------------------------------------
def test_tile_starts_hand_worked():
    assert tile_starts(96, 96, 32) == [0]
    assert tile_starts(200, 96, 32) == [0, 64, 104]
    assert tile_starts(97, 96, 32) == [0, 1]
    with pytest.raises(ValueError):
        tile_starts(100, 32, 32)


def test_gaussian_weights_peak_at_centre():
    w = gaussian_weights(5, 7, 0.3)
    assert w.shape == (5, 7) and w[2, 3] == 1 and w.min() > 0
    assert torch.equal(w, w.flip(0)) and torch.equal(w, w.flip(1))


def test_tiled_apply_is_exact_for_pointwise_maps():
    z = torch.randn(2, 4, 19, 29)
    out = tiled_apply(lambda t: 3 * t - 1, z, tile=8, overlap=3, sigma=0.3)
    assert torch.allclose(out, 3 * z - 1, atol=1e-5)


def test_tile_at_least_the_image_gives_the_untiled_result(model):
    lq = lq_batch(24, 40)  # 96 x 160 output -> latent 12 x 20
    untiled = make_pipeline(*model, process_size=96)(lq)
    for tile in (20, 1000):
        tiled = make_pipeline(
            *model,
            process_size=96,
            latent_tiling={"tile": tile, "overlap": 4},
            vae_tiling={"encoder_tile": tile, "decoder_tile": tile},
        )(lq)
        assert torch.equal(tiled, untiled)


def test_latent_tiling_seam_error_is_small_with_overlap(model, capsys):
    lq = lq_batch(48, 48)  # 192 px -> latent 24 x 24, tiles of 12
    untiled = make_pipeline(*model, process_size=192)(lq)
    errors = {}
    for overlap in (0, 6):
        tiled = make_pipeline(*model, process_size=192, latent_tiling={"tile": 12, "overlap": overlap})(lq)
        errors[overlap] = (tiled - untiled).abs().mean().item()
    with capsys.disabled():
        print(f"\nlatent tiling mean |tiled - untiled| in [0,1]: overlap 0 -> {errors[0]:.4f}, overlap 6 -> {errors[6]:.4f}")
    assert errors[6] < errors[0]
    assert errors[6] < 0.02


def test_vae_tiling_turns_on_for_larger_inputs(model):
    lq = lq_batch(32, 32)  # 128 px -> latent 16
    untiled = make_pipeline(*model, process_size=128)(lq)
    tiled = make_pipeline(*model, process_size=128, vae_tiling={"encoder_tile": 8, "decoder_tile": 8})(lq)
    diff = (tiled - untiled).abs().mean()
    assert 0 < diff < 0.05


# ---- colour fixes -----------------------------------------------------------------------------
def test_adain_gives_the_channel_statistics_of_the_source():
    g = torch.Generator().manual_seed(0)
    target = torch.rand(2, 3, 20, 30, generator=g) * 0.3 + 0.6
    source = torch.rand(2, 3, 20, 30, generator=g) * 0.8
    fixed = adain_color_fix(target, source)
    (fm, fs), (sm, ss) = channel_stats(fixed), channel_stats(source)
    assert torch.allclose(fm, sm, atol=1e-5) and torch.allclose(fs, ss, atol=1e-5)
    # the spatial pattern is the target's: a per-channel affine map of it
    corr = torch.corrcoef(torch.stack([fixed[0, 0].flatten(), target[0, 0].flatten()]))[0, 1]
    assert corr > 0.9999


def test_pipeline_adain_output_takes_the_input_colours(model):
    lq = lq_batch(32, 32) * 0.5 + 0.3
    sr = make_pipeline(*model, process_size=128, color_fix="adain")(lq)
    up = torch.nn.functional.interpolate(lq, size=sr.shape[-2:], mode="bicubic", align_corners=False)
    (m_sr, s_sr), (m_up, s_up) = channel_stats(sr), channel_stats(up)
    assert torch.allclose(m_sr, m_up, atol=2e-3) and torch.allclose(s_sr, s_up, atol=2e-3)


def test_wavelet_split_is_exact_and_fix_removes_a_colour_cast():
    g = torch.Generator().manual_seed(0)
    source = torch.rand(1, 3, 80, 80, generator=g)
    high, low = wavelet_split(source, 5)
    assert torch.allclose(high + low, source, atol=1e-6)
    cast = torch.tensor([0.2, -0.1, 0.05]).view(1, 3, 1, 1)
    assert torch.allclose(wavelet_color_fix(source + cast, source), source, atol=1e-5)
    # Nyquist detail (a checkerboard) survives: the binomial blur removes it exactly away from the border
    yy, xx = torch.meshgrid(torch.arange(80), torch.arange(80), indexing="ij")
    checker = 0.1 * (-1.0) ** (yy + xx)
    fixed = wavelet_color_fix(source + cast + checker, source)
    inner = (slice(None), slice(None), slice(32, -32), slice(32, -32))  # 1 + 2 + 4 + 8 + 16 = 31 px reach
    assert torch.allclose(fixed[inner], (source + checker)[inner], atol=1e-5)


# ---- precision, determinism, options ----------------------------------------------------------
def test_two_runs_give_identical_bytes(model):
    image = Image.fromarray((lq_batch(20, 28)[0].permute(1, 2, 0).numpy() * 255).astype("uint8"))
    first = make_pipeline(*model, color_fix="adain").enhance_image(image)[0].tobytes()
    pipe = make_pipeline(*model, color_fix="adain")
    assert pipe.enhance_image(image)[0].tobytes() == first
    assert pipe.enhance_image(image)[0].tobytes() == first


def test_sampled_latent_is_reproducible_per_seed(model):
    lq = lq_batch(16, 16)
    a = make_pipeline(*model, latent="sample", seed=3)(lq)
    b = make_pipeline(*model, latent="sample", seed=3)(lq)
    c = make_pipeline(*model, latent="sample", seed=4)(lq)
    assert torch.equal(a, b) and not torch.equal(a, c)


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_reduced_precision_close_to_fp32(model, precision):
    lq = lq_batch(16, 16)
    ref = make_pipeline(*model)(lq)
    pipe = make_pipeline(*model, precision=precision, merge_lora=True)
    out = pipe(lq)
    decoder_dtype = pipe.generator.vae.decoder.conv_in.weight.dtype
    assert decoder_dtype == (torch.float32 if precision == "fp16" else torch.bfloat16)  # fp16 decoder upcast
    assert out.dtype == torch.float32 and torch.isfinite(out).all()
    assert (out - ref).abs().mean() < 0.03


def test_bad_options_name_the_key(model):
    with pytest.raises(ConfigError, match="pipeline.color_fix"):
        make_pipeline(*model, color_fix="histogram")
    with pytest.raises(ConfigError, match="pipeline.latent_tiling"):
        make_pipeline(*model, latent_tiling={"tile": 8, "overlap": 8})
