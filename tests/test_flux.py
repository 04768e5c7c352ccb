"""FLUX.1 as a backbone (backbones/flux.py): the denoiser call against diffusers' FluxPipeline math written out here
(2 x 2 packing, position ids, the size-dependent shift, the guidance input), its text conditioning, folders and
arches told apart from SD3's both ways, the real score of a guidance-distilled base (one call at guidance = CFG) against
a hand computation, flux_shape's parameter counts against the releases', and, marked slow, the GAN methods on tiny_flux
trained, resumed, exported, re-imported and run tiled through `python -m osediff_lab.infer`, and the profile CLI.
OSEDiff and PiSA-SR on tiny_flux, and its memory prediction, run in tests/test_backbone_matrix.py with the other twins."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel
from PIL import Image

from helpers import TINY, compose_config
from osediff_lab.backbones import recognise_arch, recognise_folder
from osediff_lab.backbones.flux import FluxBackbone
from osediff_lab.backbones.schedules import DynamicShiftFlowSchedule, FlowMatchSchedule
from osediff_lab.backbones.sd3 import SD3Backbone
from osediff_lab.checks import config_problems
from osediff_lab.errors import ConfigError
from osediff_lab.models.backbone import family_of, lora_groups
from osediff_lab.models.components import build_components, save_pretrained
from osediff_lab.models.lora import adapters_disabled
from osediff_lab.models.osediff import build_generator
from osediff_lab.pipeline import SRPipeline
from osediff_lab.prompts import NullPrompt
from osediff_lab.train import build_module, run

pytestmark = pytest.mark.usefixtures("single_thread")
FLUX = [*TINY, "model=tiny_flux"]


def flux(*extra: str):
    return compose_config([*FLUX, *extra])


# ---- FluxPipeline's math, written out (diffusers 0.42 pipeline_flux.py) ---------------------------------------------
def pipeline_pack(z: torch.Tensor) -> torch.Tensor:
    """Each 2 x 2 patch one token of 4C values, tokens row-major, a token's values channel-major then (row, column)."""
    b, c, h, w = z.shape
    tokens = torch.empty(b, (h // 2) * (w // 2), 4 * c)
    for i in range(h // 2):
        for j in range(w // 2):
            tokens[:, i * (w // 2) + j] = z[:, :, 2 * i:2 * i + 2, 2 * j:2 * j + 2].reshape(b, 4 * c)
    return tokens


def pipeline_unpack(tokens: torch.Tensor, h: int, w: int) -> torch.Tensor:
    b, _, width = tokens.shape
    z = torch.empty(b, width // 4, h, w)
    for i in range(h // 2):
        for j in range(w // 2):
            z[:, :, 2 * i:2 * i + 2, 2 * j:2 * j + 2] = tokens[:, i * (w // 2) + j].reshape(b, width // 4, 2, 2)
    return z


def pipeline_image_ids(rows: int, cols: int) -> torch.Tensor:
    return torch.tensor([[0.0, i, j] for i in range(rows) for j in range(cols)])


def pipeline_sigma(t: int, tokens: int, config) -> float:
    """FluxPipeline: mu = calculate_shift(image_seq_len, base/max seq len, base/max shift); the scheduler's sigma
    exp(mu) / (exp(mu) + (1 / s - 1)) of the unshifted s = (t + 1) / N."""
    m = (config.max_shift - config.base_shift) / (config.max_image_seq_len - config.base_image_seq_len)
    mu = config.base_shift + m * (tokens - config.base_image_seq_len)
    s = (t + 1) / config.num_train_timesteps
    return math.exp(mu) / (math.exp(mu) + (1 / s - 1))


def pipeline_velocity(net, z: torch.Tensor, sigma: torch.Tensor, embeds, guidance: float | None) -> torch.Tensor:
    """The transformer as FluxPipeline calls it on a (B, 16, h, w) latent at sigma (timesteps sigma N, passed / 1000)."""
    b, _, h, w = z.shape
    g = None if guidance is None else torch.full((b,), guidance)
    out = net(hidden_states=pipeline_pack(z), timestep=sigma, guidance=g, pooled_projections=embeds.pooled,
                     encoder_hidden_states=embeds.hidden, txt_ids=torch.zeros(embeds.hidden.shape[1], 3),
                     img_ids=pipeline_image_ids(h // 2, w // 2)).sample
    return pipeline_unpack(out, h, w)


def test_the_denoiser_call_is_flux_pipelines_packing_ids_shift_and_guidance():
    torch.manual_seed(0)
    cfg = flux()
    c = build_components(cfg.model)
    generator, _ = build_generator(c, cfg.generator)
    embeds = c.text(["a photo", "grass"])
    z = torch.randn(2, 16, 6, 4)
    t = torch.tensor([999, 300])
    sigma = torch.tensor([pipeline_sigma(int(k), 6, c.scheduler.config) for k in t])  # 3 x 2 tokens
    assert sigma[0] == 1.0 and 0 < sigma[1] < 1
    with torch.no_grad():
        torch.testing.assert_close(generator.predict(z, t, embeds), pipeline_velocity(c.denoiser, z, sigma, embeds, 1.0))  # model.guidance
        torch.testing.assert_close(generator.predict(z, t, embeds.with_guidance(4.0)), pipeline_velocity(c.denoiser, z, sigma, embeds, 4.0))
        assert not torch.allclose(pipeline_velocity(c.denoiser, z, sigma, embeds, 4.0), pipeline_velocity(c.denoiser, z, sigma, embeds, 1.0))
        x0 = generator.schedule.x0_from_output(z, generator.predict(z, t, embeds), t)
        torch.testing.assert_close(x0, z - sigma.view(2, 1, 1, 1) * pipeline_velocity(c.denoiser, z, sigma, embeds, 1.0))


def test_the_shift_follows_the_latent_size_as_diffusers_scheduler_and_can_be_fixed():
    c = build_components(flux().model)
    schedule = c.backbone.schedule(c.scheduler)
    assert isinstance(schedule, DynamicShiftFlowSchedule)
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift

    s = torch.arange(1, 1001, dtype=torch.float32) / 1000
    t = torch.arange(1000)
    for side in (32, 64, 128):  # 256, 1024 and 4096 packed tokens: 256, 512 and 1024 px
        z = torch.zeros(1000, 16, side, side, device="meta")
        mu = calculate_shift((side // 2) ** 2)
        want = FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True).time_shift(mu, 1.0, s)
        torch.testing.assert_close(schedule.model_timestep(t, z), want * 1000)
    with pytest.raises(ValueError, match="needs the latent"):
        schedule.model_timestep(t)
    fixed = FluxBackbone(guidance=1.0, shift_image_seq_len=4096).schedule(c.scheduler)  # OMGSR's 1024-px sigma everywhere
    small = torch.zeros(1, 16, 8, 8)
    assert fixed.sigma(torch.tensor([243]), small).item() == pytest.approx(
        FlowMatchSchedule(1000, math.exp(1.15)).sigmas[243].item(), rel=1e-6)
    x0, noise, k = torch.randn(2, 16, 8, 6), torch.randn(2, 16, 8, 6), torch.tensor([10, 700])
    x_t = schedule.add_noise(x0, noise, k)
    torch.testing.assert_close(schedule.x0_from_output(x_t, schedule.target(x0, noise, k), k), x0, atol=1e-5, rtol=0)


def test_text_is_t5_states_and_clip_pooled_output():
    c = build_components(flux().model)
    e = c.text(["a photo", "grass"])
    n = c.backbone.t5_max_length
    t5_ids = c.tokenizer_2(["a photo", "grass"], padding="max_length", max_length=n, truncation=True, return_tensors="pt").input_ids
    clip_ids = c.tokenizer(["a photo", "grass"], padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
    torch.testing.assert_close(e.hidden, c.text_encoder_2(t5_ids)[0])
    torch.testing.assert_close(e.pooled, c.text_encoder(clip_ids).pooler_output)
    assert e.guidance is None and e.hidden.shape == (2, n, c.denoiser.config.joint_attention_dim)


def test_flux_and_sd3_folders_arches_and_denoisers_are_never_mistaken(tmp_path):
    torch.manual_seed(0)
    saved = build_components(flux().model)
    folder = save_pretrained(saved, tmp_path / "flux")
    assert recognise_folder(folder) is FluxBackbone and not SD3Backbone.recognises_folder(folder)
    sd3 = save_pretrained(build_components(compose_config([*TINY, "model=tiny_sd3"]).model), tmp_path / "sd3")
    assert recognise_folder(sd3) is SD3Backbone and not FluxBackbone.recognises_folder(sd3)
    for model, family in (("tiny_flux", FluxBackbone), ("tiny_sd3", SD3Backbone)):
        assert recognise_arch(compose_config([*TINY, f"model={model}"]).model.arch) is family
    assert family_of(saved.denoiser) == "flux" and family_of(FluxTransformer2DModel(**flux().model.arch.transformer)) == "flux"
    loaded = build_components(compose_config([*TINY, "model=flux_dev", f"model.pretrained_path={folder}",
                                              f"model.t5_max_length={saved.backbone.t5_max_length}"]).model)
    assert loaded.family == "flux" and type(loaded.scheduler) is type(saved.scheduler)
    for a, b in zip(vars(saved.text(["a photo"])).values(), vars(loaded.text(["a photo"])).values(), strict=True):
        torch.testing.assert_close(a, b)
    wrong = compose_config([*TINY, "model=sd3_medium", f"model.pretrained_path={folder}"], tmp_path)
    assert any("model.backbone=sd3 does not fit" in p and "set model.backbone=flux" in p for p in config_problems(wrong))


def test_guidance_must_match_the_transformer(tmp_path):
    with pytest.raises(ConfigError, match="guidance-distilled .* set model.guidance"):
        build_components(flux("model.guidance=null").model)
    with pytest.raises(ConfigError, match=r"no guidance embedding \(FLUX.1-schnell\): set model.guidance=null"):
        build_components(flux("model.arch.transformer.guidance_embeds=false").model)
    schnell = build_components(flux("model.arch.transformer.guidance_embeds=false", "model.guidance=null",
                                    "model.arch.scheduler.use_dynamic_shifting=false", "model.arch.scheduler.shift=1.0").model)
    assert not schnell.backbone.guidance_distilled(schnell.denoiser)
    assert type(schnell.backbone.schedule(schnell.scheduler)) is FlowMatchSchedule


def test_the_real_score_of_a_guidance_distilled_base_is_one_call_at_the_cfg_value():
    """VSD (OSEDiff) and CSD (PiSA-SR) on tiny_flux: real x0 = z_t - sigma v(z_t, prompt, guidance = cfg), no negative
    prompt; CSD's second target is the negative prompt's at model.guidance."""
    torch.manual_seed(0)
    z_h, noise, t = torch.randn(2, 16, 4, 4), torch.randn(2, 16, 4, 4), torch.tensor([400, 800])
    for method in ("osediff", "pisasr_pixel"):
        module = build_module(flux(f"method={method}", "data.crop_size=32"))
        m = module.method
        c = m.generator
        embeds = module.text_encoders(["a photo", "grass"])
        neg = module.text_encoders([m.negative_prompt] * 2)
        sigma = torch.tensor([pipeline_sigma(int(k), 4, module.cfg.model.arch.scheduler) for k in t])
        z_t = (1 - sigma.view(2, 1, 1, 1)) * z_h + sigma.view(2, 1, 1, 1) * noise
        net = m.reg_unet if method == "osediff" else c.unet
        with torch.no_grad():
            with adapters_disabled(net):
                real = z_t - sigma.view(2, 1, 1, 1) * pipeline_velocity(net, z_t, sigma, embeds, m.cfg_scale)
                uncond = z_t - sigma.view(2, 1, 1, 1) * pipeline_velocity(net, z_t, sigma, neg, 1.0)
            if method == "osediff":
                got, _ = m.vsd_targets(z_h, embeds, t, noise)
                torch.testing.assert_close(got, real, atol=1e-5, rtol=1e-5)
            else:
                got_real, got_uncond = m.csd_targets(z_h, embeds, t, noise)
                torch.testing.assert_close(got_real, real, atol=1e-5, rtol=1e-5)
                torch.testing.assert_close(got_uncond, uncond, atol=1e-5, rtol=1e-5)
        assert m.cfg_scale != 1.0 and not torch.allclose(real, uncond)


def test_flux_shape_has_the_releases_parameter_counts():
    """FLUX.1-dev's diffusers configs built on the meta device: transformer 11.9B (19 double + 38 single blocks, 24 heads
    x 128, joint width 4096, pooled 768, 64 packed channels, guidance embedding), T5-XXL encoder 4.76B, CLIP-L text 123M,
    VAE 83.8M; schnell's transformer lacks the guidance embedder (10.2M fewer)."""
    cfg = compose_config(["model=flux_shape"])
    with torch.device("meta"):
        c = build_components(cfg.model)
        schnell = FluxTransformer2DModel(**{**cfg.model.arch.transformer, "guidance_embeds": False})
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert count(c.denoiser) == 11_901_408_320 and count(schnell) == 11_891_178_560
    assert count(c.text_encoder_2) == 4_762_310_656 and count(c.text_encoder) == 123_060_480 and count(c.vae) == 83_819_683
    assert c.backbone.t5_max_length == 512 and c.scaling_factor == 0.3611 and c.vae.config.shift_factor == 0.1159


def test_lora_groups_are_double_stream_single_stream_and_the_rest_and_the_input_layer_trains():
    c = build_components(flux().model)
    names = ["x_embedder", "transformer_blocks.0.attn.to_q", "single_transformer_blocks.1.proj_out", "proj_out",
             "context_embedder", "time_text_embed.guidance_embedder.linear_1", "norm_out.linear"]
    assert lora_groups(c.denoiser, names) == {"encoder": names[:2], "decoder": names[2:4], "others": names[4:]}
    generator, _ = build_generator(c, flux().generator)
    assert all(p.requires_grad for p in generator.unet.x_embedder.parameters())
    with pytest.raises(ConfigError, match=r"latent_tiling.tile=5 .* multiples of 2"):
        SRPipeline(generator, c.text, NullPrompt(), 4, {"latent_tiling": {"tile": 5, "overlap": 2}}, live=True)


RUN = [*FLUX, "trainer.log_every_n_steps=1", "callbacks.samples.every_n_steps=0", "callbacks.checkpoint.every_n_train_steps=1",
       "trainer.enable_progress_bar=false", "val=demo", "val.every_n_steps=2", "val.metrics=[psnr]", "val.crop_size=64",
       "val.grid=1", "val.log_images=0", "val.pipeline.process_size=64"]
GAN = {"hypir": ["method=hypir", "discriminator=convnext_tiny", "generator.lora.unet_rank=8", "generator.lora.unet_alpha=8"],
       "osediff_gan": ["method=osediff_gan"]}  # its own default: heads on the regularizer transformer's middle block


@pytest.mark.slow
@pytest.mark.parametrize("method", GAN)
def test_gan_methods_train_validate_resume_export_and_infer_tiled_through_the_cli(method, tmp_path):
    first = run(compose_config([*RUN, *GAN[method], "trainer.max_steps=2"], tmp_path / "run"))
    trainer, module, summary = first
    assert family_of(module.method.generator.unet) == "flux" and "val/psnr" in summary["last_metrics"]
    before = {n: p.clone() for n, p in module.trained_state_dict().items()}
    trainer2, module2, summary2 = run(compose_config([*RUN, *GAN[method], "trainer.max_steps=3"], tmp_path / "run"))
    assert trainer2.global_step == 3
    after = module2.trained_state_dict()
    moved = [n for n in before if not torch.equal(after[n], before[n])]
    assert moved and max((after[n] - before[n]).abs().max().item() for n in moved) < 0.5, "the third step did not resume"
    lora = Path(summary2["lora"])
    assert json.loads(lora.with_suffix(".json").read_text())["base_model"]["name"] == "tiny_flux"
    Image.fromarray((torch.rand(24, 20, 3) * 255).byte().numpy()).save(tmp_path / "lq.png")
    out = tmp_path / "sr"
    done = subprocess.run([sys.executable, "-m", "osediff_lab.infer", f"input={tmp_path / 'lq.png'}", f"output={out}",
                           f"ckpt={lora}", "pipeline.device=cpu", "pipeline.process_size=64", "pipeline.latent_tiling.tile=8",
                           "pipeline.latent_tiling.overlap=4"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert Image.open(out / "lq.png").size == (80, 96)


@pytest.mark.slow
def test_the_profile_cli_gives_rows_for_tiny_flux(tmp_path):
    done = subprocess.run([sys.executable, "-m", "osediff_lab.profile", "model=tiny_flux", "prompt=none", "profile.macs_size=64",
                           "profile.latency.size=32", "profile.latency.repeats=1", "profile.latency.warmup=0",
                           f"hydra.run.dir={tmp_path}"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    rows = {r["module"]: r for r in json.loads((tmp_path / "profile.json").read_text())["rows"]}
    assert all(rows[k]["params"] > 0 and rows[k]["gmacs"] > 0 for k in ("text_encoder", "vae_encoder", "unet", "vae_decoder"))


TINY_RECIPE = ["model=tiny_flux", "data=demo", "data.crop_size=64", "logger=csv", "loss.lpips.pretrained=false",
               "loss.lpips.net=alex", "prompt=none", "val=none", "trainer.precision=32", "generator.frozen_dtype=fp32"]
UNAVAILABLE = ("dinov3_dists_weight", "latent_reg_weight", "l1_weight")


def test_omgsr_release_refuses_the_losses_it_lacks_and_builds_on_the_tiny_twin_without_them(tmp_path):
    cfg = compose_config(["+experiment=omgsr_flux_release"], tmp_path)
    assert (cfg.model.name, cfg.generator.timestep, cfg.model.guidance, cfg.model.shift_image_seq_len) == ("flux_dev", 244, 1.0, 4096)
    assert (cfg.generator.lora.unet_rank, cfg.generator.lora.vae_rank, cfg.method.gan_weight) == (64, 64, 0.5)
    assert (cfg.data.crop_size, cfg.data.batch_size, cfg.optim.accumulate_grad_batches, cfg.trainer.max_steps) == (1024, 1, 4, 6000)
    assert (cfg.method.optim.generator.lr, cfg.method.optim.generator.weight_decay, cfg.trainer.precision) == (5e-5, 1e-4, "bf16-mixed")
    assert [cfg.method[k] for k in UNAVAILABLE] == [5.0, 5.0, 0.5]
    tiny = [*TINY_RECIPE, "discriminator=convnext_tiny"]
    refused = " ".join(config_problems(compose_config(["+experiment=omgsr_flux_release", *tiny], tmp_path)))
    assert all(f"method.{k} is not an argument of HYPIR: it has no such loss term" in refused for k in UNAVAILABLE), refused
    ours = compose_config(["+experiment=omgsr_flux_release", *tiny, *(f"~method.{k}" for k in UNAVAILABLE),
                           "method.l2_weight=1"], tmp_path)
    assert config_problems(ours) == []
    module = build_module(ours)
    assert family_of(module.method.generator.unet) == "flux" and module.method.generator.timestep == 244
    assert not module.method.generator.unet.x_embedder.base_layer.weight.requires_grad


def test_osediff_flux_builds_on_the_tiny_twin(tmp_path):
    cfg = compose_config(["+experiment=osediff_flux", *TINY_RECIPE, "data.batch_size=1"], tmp_path)
    assert config_problems(cfg) == [] and cfg.method.cfg_scale == 3.5
    module = build_module(cfg)
    assert module.method.generator.schedule.fixed_seq_len == 4096


def test_the_releases_separate_real_score_is_refused_on_a_guidance_distilled_base(tmp_path):
    cfg = compose_config([*TINY, "model=tiny_flux", "method.release_score_precision=true"], tmp_path)
    with pytest.raises(ConfigError, match="release_score_precision=true .* guidance-distilled"):
        build_module(cfg)


def test_flux_runs_its_own_attention_processors_and_fused_qkv_gives_the_same_output(tmp_path):
    from diffusers.models.transformers.transformer_flux import FluxAttnProcessor

    c = build_components(compose_config([*TINY, "model=tiny_flux"], tmp_path).model)
    net, backbone = c.denoiser.eval(), c.backbone
    z, t = torch.randn(1, 16, 8, 6), torch.tensor([0.7])
    embeds = c.text([""])
    with torch.no_grad():
        before = backbone.denoiser_output(net, z, t, embeds, 8)
        backbone.set_attention(net, "sdpa")
        assert all(isinstance(p, FluxAttnProcessor) for p in net.attn_processors.values())
        backbone.fuse_qkv(net)
        after = backbone.denoiser_output(net, z, t, embeds, 8)
    torch.testing.assert_close(after, before, atol=1e-5, rtol=1e-4)
    with pytest.raises(ConfigError, match=r"attention='plain' has no processor for the flux backbone's denoiser"):
        backbone.set_attention(net, "plain")
