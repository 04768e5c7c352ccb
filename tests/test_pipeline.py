"""Inference pipeline: the size rule, LoRA merge, tiling, colour fixes, precision and determinism."""

from __future__ import annotations

import copy

import pytest
import torch
from PIL import Image

from helpers import TINY, compose_config
from osediff_lab.errors import ConfigError
from osediff_lab.models.components import Components, build_components
from osediff_lab.models.generator import OneStepGenerator
from osediff_lab.models.lora import adapters_disabled
from osediff_lab.models.osediff import build_generator
from osediff_lab.pipeline import SRPipeline, adain_color_fix, plan_sizes, wavelet_color_fix
from osediff_lab.pipeline.colorfix import channel_stats, wavelet_split
from osediff_lab.pipeline.tiling import gaussian_weights, tile_starts, tiled_apply
from osediff_lab.prompts import NullPrompt

pytestmark = pytest.mark.usefixtures("single_thread")

FAST = {"process_size": 32, "color_fix": "none"}  # small images: the CPU is shared


def perturb_trained(generator: OneStepGenerator, seed: int = 1) -> None:
    """Give every trained tensor (LoRA A/B, conv_in) a random offset, as training would: LoRA B starts at 0."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in sorted(generator.named_parameters()):
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * 0.05)


def tiny_model(overrides: list[str] | None = None, seed: int = 42) -> tuple[Components, OneStepGenerator, dict]:
    """Tiny base components and a LoRA generator with non-trivial trained weights."""
    cfg = compose_config(TINY + list(overrides or []))
    torch.manual_seed(seed)
    components = build_components(cfg.model)
    generator, targets = build_generator(components, cfg.generator, share_unet=True)
    perturb_trained(generator)
    return components, generator, targets


def make_pipeline(components: Components, generator: OneStepGenerator, **options) -> SRPipeline:
    """A pipeline over copies of the generator and text encoder (merging and casting change them in place)."""
    opts = {"merge_lora": False, **FAST, **options}
    text_encoder = copy.deepcopy(components.text)
    return SRPipeline(copy.deepcopy(generator), text_encoder, NullPrompt(), 4, opts)


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


def test_output_is_exactly_scale_times_input(model):
    pipe = make_pipeline(*model, process_size=32)
    assert pipe(lq_batch(37, 53)).shape == (1, 3, 148, 212)  # network at 152 x 216, cropped back
    pipe = make_pipeline(*model, process_size=64)
    (sr,) = pipe([Image.new("L", (9, 7), 128)])  # enlarged to 64 x 82 (pad 88), shrunk back; grayscale in
    assert sr.size == (36, 28) and sr.mode == "RGB"


# ---- LoRA merge -------------------------------------------------------------------------------
def test_merged_lora_matches_unmerged_and_lora_matters(model):
    components, generator = model
    lq = lq_batch(8, 8)
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
    lq = lq_batch(8, 12)  # 32 x 48 px -> latent 4 x 6
    untiled = make_pipeline(*model)(lq)
    for tile in (6, 1000):
        tiled = make_pipeline(
            *model,
            latent_tiling={"tile": tile, "overlap": 2},
            vae_tiling={"encoder_tile": tile, "decoder_tile": tile},
        )(lq)
        assert torch.equal(tiled, untiled)


def test_tiling_blends_away_seams_of_a_local_model(capsys):
    """A 3-layer conv net (receptive radius 3) tiled with hard seams vs gaussian-blended overlap."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(*[m for _ in range(3) for m in (torch.nn.Conv2d(4, 4, 3, padding=1), torch.nn.Tanh())])
    z = torch.nn.functional.interpolate(torch.randn(1, 4, 16, 16), size=(64, 64), mode="bicubic")
    with torch.no_grad():
        untiled = net(z)
        err = {ov: (tiled_apply(net, z, 24, ov, 0.1) - untiled).abs().max().item() for ov in (0, 8, 12)}
    with capsys.disabled():
        print(f"\nseam max |tiled - untiled| (tile 24, sigma 0.1): overlap 0 {err[0]:.4f}, 8 {err[8]:.5f}, 12 {err[12]:.5f}")
    assert err[0] > 0.05  # hard seams are real
    assert err[8] < err[0] / 20 and err[12] < 1e-3


def assert_close_to_untiled(tiled: torch.Tensor, untiled: torch.Tensor) -> None:
    """Tiles change the random tiny model's global context (measured mean gap ~0.12-0.15), but a tiled
    image must stay far closer to the untiled one than unrelated noise is (~0.28)."""
    noise = torch.rand(untiled.shape, generator=torch.Generator().manual_seed(0))
    assert (tiled - untiled).abs().mean() < 0.6 * (noise - untiled).abs().mean()


def test_pipeline_latent_tiling_runs_over_several_tiles(model):
    lq = lq_batch(16, 16)  # 64 px -> latent 8 x 8, tiles of 4 with overlap 2: 3 x 3 tiles
    tiled = make_pipeline(*model, latent_tiling={"tile": 4, "overlap": 2})(lq)
    untiled = make_pipeline(*model)(lq)
    assert tiled.shape == untiled.shape and torch.isfinite(tiled).all() and not torch.equal(tiled, untiled)
    assert_close_to_untiled(tiled, untiled)


def test_vae_tiling_turns_on_for_larger_inputs(model):
    lq = lq_batch(8, 8)  # 32 px -> latent 4: tiles of 2 latent px (16 px) split it
    untiled = make_pipeline(*model)(lq)
    for tiles in ({"encoder_tile": 2}, {"decoder_tile": 2}):
        tiled = make_pipeline(*model, vae_tiling=tiles)(lq)
        assert tiled.shape == untiled.shape and not torch.equal(tiled, untiled)
        assert_close_to_untiled(tiled, untiled)


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
    lq = lq_batch(8, 8) * 0.5 + 0.3
    sr = make_pipeline(*model, color_fix="adain")(lq)
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
    image = Image.fromarray((lq_batch(8, 10)[0].permute(1, 2, 0).numpy() * 255).astype("uint8"))
    first = make_pipeline(*model, color_fix="adain").enhance_image(image)[0].tobytes()
    pipe = make_pipeline(*model, color_fix="adain")
    assert pipe.enhance_image(image)[0].tobytes() == first
    assert pipe.enhance_image(image)[0].tobytes() == first


def test_sampled_latent_is_reproducible_per_seed(model):
    lq = lq_batch(8, 8)
    a = make_pipeline(*model, latent="sample", seed=3)(lq)
    b = make_pipeline(*model, latent="sample", seed=3)(lq)
    c = make_pipeline(*model, latent="sample", seed=4)(lq)
    assert torch.equal(a, b) and not torch.equal(a, c)


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_reduced_precision_close_to_fp32(model, precision):
    lq = lq_batch(8, 8)
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


def test_live_mode_leaves_a_training_model_as_it_was(model):
    components, generator = model
    live_gen = copy.deepcopy(generator).train()
    live_gen.latent = "sample"
    before = {n: p.clone() for n, p in live_gen.state_dict().items()}
    tiling = live_gen.vae.use_tiling
    text_encoder = copy.deepcopy(components.text)
    pipe = SRPipeline(live_gen, text_encoder, NullPrompt(), 4, FAST, live=True)
    out = pipe(lq_batch(8, 8))
    assert torch.equal(out, make_pipeline(*model)(lq_batch(8, 8)))  # latent mode used, same numbers
    assert live_gen.training and live_gen.latent == "sample" and live_gen.vae.use_tiling == tiling
    after = live_gen.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
