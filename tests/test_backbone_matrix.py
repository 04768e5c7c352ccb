"""The backbone x method matrix on the tiny twins: every family beyond SD2.1's epsilon UNet (SD-Turbo's
v-prediction, SDXL's added conditions, SD3's transformer and rectified flow) trains OSEDiff and PiSA-SR for 3 steps
with validation, resumes from its checkpoint, exports, re-imports for tiled inference, profiles and predicts its
memory. SD2.1's own twin, model=tiny, has each of these in its own file (test_training, test_validation,
test_checkpoint_formats, test_pipeline, test_methods, test_profile, test_memory).
The conditioning each family's denoiser receives is checked against diffusers' own conventions."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from diffusers import SD3Transformer2DModel
from omegaconf import open_dict

from helpers import TINY, compose_config
from osediff_lab.backbones.schedules import (
    DynamicShiftFlowSchedule,
    EpsilonSchedule,
    FlowMatchSchedule,
    VPredictionSchedule,
)
from osediff_lab.backbones.sdxl import size_time_ids
from osediff_lab.errors import ConfigError
from osediff_lab.memory import PeakTensorBytes, predict_training_memory, training_step
from osediff_lab.models.backbone import TextEmbeds, denoiser_output, family_of, lora_groups
from osediff_lab.models.components import build_components, save_pretrained
from osediff_lab.models.osediff import build_generator
from osediff_lab.pipeline import SRPipeline
from osediff_lab.profile import profile_rows
from osediff_lab.prompts import NullPrompt
from osediff_lab.train import build_module, run
from test_profile import compose_profile_section

pytestmark = pytest.mark.usefixtures("single_thread")
TWINS = {"tiny_sd_turbo": ("sd", VPredictionSchedule),
         "tiny_sdxl": ("sdxl", EpsilonSchedule), "tiny_sd3": ("sd3", FlowMatchSchedule),
         "tiny_flux": ("flux", DynamicShiftFlowSchedule)}
RUN = [*TINY, "trainer.max_steps=3", "trainer.log_every_n_steps=1", "callbacks.samples.every_n_steps=0",
       "callbacks.checkpoint.every_n_train_steps=3", "trainer.enable_progress_bar=false",
       "val=demo", "val.every_n_steps=3", "val.metrics=[psnr]", "val.crop_size=64", "val.grid=1", "val.log_images=0",
       "val.pipeline.process_size=64"]


def twin(model: str, *extra: str):
    return compose_config([*TINY, f"model={model}", *extra])


@pytest.mark.slow
@pytest.mark.parametrize("model", TWINS)
def test_osediff_on_every_twin_trains_validates_resumes_exports_and_infers_tiled(model, tmp_path):
    family, schedule = TWINS[model]
    cfg = compose_config([*RUN, f"model={model}"], tmp_path / "first")
    trainer, module, summary = run(cfg)
    assert trainer.global_step == 3 and family_of(module.generator.unet) == family
    assert type(module.generator.schedule) is schedule
    assert "val/psnr" in summary["last_metrics"], summary["last_metrics"]
    ckpt = Path(summary["checkpoint_dir"]) / "last.ckpt"
    resumed_cfg = compose_config([*RUN, f"model={model}", "trainer.max_steps=4", f"ckpt_path={ckpt}"], tmp_path / "second")
    trainer2, module2, summary2 = run(resumed_cfg)
    assert trainer2.global_step == 4
    first = {n: p for n, p in module.trained_state_dict().items()}
    moved = [n for n, p in module2.trained_state_dict().items() if not torch.equal(p, first[n])]
    assert moved, "the resumed step trained nothing"
    assert max((module2.trained_state_dict()[n] - first[n]).abs().max().item() for n in moved) < 0.5, "resume restarted"
    pipe = SRPipeline.from_checkpoint(summary2["lora"], device="cpu", latent_tiling={"tile": 4, "overlap": 2, "sigma": 0.1})
    assert family_of(pipe.generator.unet) == family
    out, _ = pipe.enhance(torch.rand(1, 3, 24, 20))
    assert out.shape == (1, 3, 96, 80) and torch.isfinite(out).all()
    sidecar = json.loads(Path(summary2["lora_sidecar"]).read_text())
    assert sidecar["base_model"]["name"] == model


@pytest.mark.slow
@pytest.mark.parametrize("model", TWINS)
def test_pisasr_trains_three_steps_on_every_twin_and_its_generator_infers_tiled(model):
    """PiSA-SR's pixel stage through the same training step the loop runs (SRModule.optimize_batch, real AdamW), then
    its live generator through the inference pipeline with latent tiling; its export, re-import and the two-stage
    schedule are the loop's and the pipeline's, tested for SD2.1's twin in tests/test_methods.py."""
    torch.manual_seed(0)
    module = build_module(twin(model, "method=pisasr_pixel", "data.crop_size=32", "data.batch_size=2")).train()
    trained = lambda: {n: p.detach() for n, p in module.named_parameters() if p.requires_grad}  # noqa: E731
    before = {n: p.clone() for n, p in trained().items()}
    step = training_step(module, torch.rand(2, 3, 32, 32) * 2 - 1)
    for _ in range(3):
        step()
    after = trained()
    assert before and all(".pixel." in n for n in before), "only the pixel LoRA trains in the pixel stage"
    assert any(not torch.equal(after[n], before[n]) for n in before), "three steps moved no pixel LoRA tensor"
    assert all(torch.isfinite(p).all() for p in after.values())
    options = {"process_size": 80, "latent_tiling": {"tile": 4, "overlap": 2, "sigma": 0.1}}
    pipe = SRPipeline(module.generator, module.text_encoders, NullPrompt(), 4, options, live=True)
    out, _ = pipe.enhance(torch.rand(1, 3, 24, 20))
    assert out.shape == (1, 3, 96, 80) and torch.isfinite(out).all()
    if model in ("tiny_sd3", "tiny_flux"):  # tiles must hold whole 2 x 2 patches: named before any work
        with pytest.raises(ConfigError, match=r"latent_tiling.tile=5 .* multiples of 2"):
            SRPipeline(module.generator, module.text_encoders, NullPrompt(), 4, {"latent_tiling": {"tile": 5, "overlap": 2}}, live=True)


@pytest.mark.parametrize("model", ["tiny_sdxl", "tiny_sd3"])
def test_a_saved_twin_reloads_from_its_folder_as_the_pretrained_preset_would(model, tmp_path):
    torch.manual_seed(0)
    saved = build_components(twin(model).model)
    folder = save_pretrained(saved, tmp_path / "base")
    preset = ["model=sdxl_base"] if model == "tiny_sdxl" else ["model=sd3_medium", f"model.t5_max_length={saved.backbone.t5_max_length}"]
    loaded = build_components(compose_config([*TINY, *preset, f"model.pretrained_path={folder}"]).model)
    assert loaded.family == saved.family and type(loaded.scheduler) is type(saved.scheduler)
    for a, b in zip(saved.text(["a photo"]).__dict__.values(), loaded.text(["a photo"]).__dict__.values(), strict=True):
        torch.testing.assert_close(a, b)
    if model == "tiny_sd3":
        no_t5 = build_components(compose_config([*TINY, *preset, f"model.pretrained_path={folder}", "model.load_t5=false"]).model)
        assert no_t5.text_encoder_3 is None
        hidden = no_t5.text(["a photo"]).hidden
        clip_tokens = saved.tokenizer.model_max_length
        assert hidden.shape[1] == clip_tokens + saved.backbone.t5_max_length and not hidden[:, clip_tokens:].any()


def test_sdxl_conditioning_is_diffusers_convention():
    """Penultimate hidden states of both CLIPs concatenated; pooled = the projection encoder's text_embeds; the
    UNet gets them with time ids (h, w, 0, 0, h, w) in pixels."""
    c = build_components(twin("tiny_sdxl").model)
    embeds = c.text(["a photo"])
    ids = [tok(["a photo"], padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
           for tok in (c.tokenizer, c.tokenizer_2)]
    out1 = c.text_encoder(ids[0], output_hidden_states=True)
    out2 = c.text_encoder_2(ids[1], output_hidden_states=True)
    torch.testing.assert_close(embeds.hidden, torch.cat([out1.hidden_states[-2], out2.hidden_states[-2]], -1))
    torch.testing.assert_close(embeds.pooled, out2.text_embeds)
    z = torch.zeros(2, 4, 6, 5)
    assert size_time_ids(z, 8).tolist() == [[48, 40, 0, 0, 48, 40]] * 2


def test_each_family_calls_its_denoiser_with_its_conditioning():
    """denoiser_output against diffusers' call written out by hand: SDXL's pooled text embedding and pixel-size
    time ids as added conditions, SD3's pooled projections and float timestep, SD2.1's hidden states alone."""
    z = torch.randn(2, 4, 6, 4)
    for model in ("tiny", "tiny_sdxl", "tiny_sd3"):
        c = build_components(twin(model).model)
        e = c.text(["a photo", "grass"])
        zz = torch.randn(2, c.vae.config.latent_channels, 6, 4) if model == "tiny_sd3" else z
        t = torch.tensor([999, 500]) if model != "tiny_sd3" else torch.tensor([1000.0, 500.0])
        with torch.no_grad():
            got = denoiser_output(c.denoiser, zz, t, e, 8)
            if model == "tiny_sd3":
                want = c.denoiser(hidden_states=zz, timestep=t, encoder_hidden_states=e.hidden, pooled_projections=e.pooled).sample
            elif model == "tiny_sdxl":
                ids = torch.tensor([[48.0, 32.0, 0.0, 0.0, 48.0, 32.0]] * 2)
                want = c.denoiser(zz, t, encoder_hidden_states=e.hidden,
                              added_cond_kwargs={"text_embeds": e.pooled, "time_ids": ids}).sample
            else:
                want = c.denoiser(zz, t, encoder_hidden_states=e.hidden).sample
        torch.testing.assert_close(got, want)


def test_sd3_conditioning_pads_clip_to_the_joint_width_and_appends_t5():
    c = build_components(twin("tiny_sd3").model)
    e = c.text(["a photo", "grass"])
    joint = c.denoiser.config.joint_attention_dim
    assert e.hidden.shape == (2, 77 + c.backbone.t5_max_length, joint) and e.pooled.shape == (2, c.denoiser.config.pooled_projection_dim)
    clip_width = c.text_encoder.config.hidden_size + c.text_encoder_2.config.hidden_size
    assert not e.hidden[:, :77, clip_width:].any(), "CLIP states are zero-padded to the joint width"
    t5_ids = c.tokenizer_3(["a photo", "grass"], padding="max_length", max_length=c.backbone.t5_max_length, truncation=True,
                           return_tensors="pt").input_ids
    torch.testing.assert_close(e.hidden[:, 77:], c.text_encoder_3(t5_ids)[0])


def test_lora_groups_split_sd3_blocks_into_halves():
    c = build_components(twin("tiny_sd3").model)
    names = ["pos_embed.proj", "transformer_blocks.0.attn.to_q", "transformer_blocks.1.attn.to_q", "proj_out",
             "context_embedder"]
    assert isinstance(c.denoiser, SD3Transformer2DModel) and len(c.denoiser.transformer_blocks) == 2
    assert lora_groups(c.denoiser, names) == {"encoder": ["pos_embed.proj", "transformer_blocks.0.attn.to_q"],
                                          "decoder": ["transformer_blocks.1.attn.to_q", "proj_out"],
                                          "others": ["context_embedder"]}
    generator, _ = build_generator(c, twin("tiny_sd3").generator)
    assert all(p.requires_grad for p in generator.unet.pos_embed.proj.parameters())  # the input layer trains in full


def test_sd3_generator_shifts_and_scales_latents_both_ways():
    c = build_components(twin("tiny_sd3").model)
    generator, _ = build_generator(c, twin("tiny_sd3", "generator.latent=mode").generator)
    x = torch.rand(1, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        posterior = c.vae.encode(x).latent_dist.mode()
        z = generator.encode(x)
        torch.testing.assert_close(z, (posterior - 0.0609) * 1.5305)
        torch.testing.assert_close(generator.decode(z), c.vae.decode(posterior).sample.clamp(-1, 1), atol=1e-5, rtol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("model", ["tiny_sdxl", "tiny_sd3", "tiny_flux"])  # SD2.1's family: tests/test_memory.py
def test_memory_prediction_matches_the_real_step_on_each_family(model):
    cfg = twin(model, "data.crop_size=32", "data.batch_size=1")
    predicted = predict_training_memory(cfg)
    torch.manual_seed(0)
    module = build_module(cfg).train()
    step = training_step(module, torch.rand(1, 3, 32, 32) * 2 - 1)
    with PeakTensorBytes([*module.parameters(), *module.buffers()]) as tracker:
        step()
        step()
    assert predicted.peak == pytest.approx(predicted.static + tracker.peak, rel=0.01)


@pytest.mark.parametrize("model", ["tiny_sdxl", "tiny_sd3", "tiny_flux"])  # SD2.1's family: tests/test_profile.py
def test_profile_counts_every_module_of_each_family(model):
    cfg = compose_config([*TINY, f"model={model}"])  # the null prompt: no prompt-extractor row
    with open_dict(cfg):
        cfg.profile = compose_profile_section()
        cfg.profile.latency.enabled = False
        cfg.profile.macs_size = 64
    rows = {r["module"]: r for r in profile_rows(cfg)}
    parts = ("text_encoder", "vae_encoder", "unet", "vae_decoder")
    assert all(rows[k]["gmacs"] > 0 and rows[k]["params"] > 0 for k in parts), rows
    assert rows["text_encoder"]["params"] == sum(p.numel() for m in build_components(cfg.model).text_modules() for p in m.parameters())
    assert rows["unet"]["trainable"] > 0


def test_embeddings_batch_like_tensors():
    e = TextEmbeds(torch.randn(1, 3, 4), torch.randn(1, 2))
    both = TextEmbeds.cat([e.expand(2), e])
    assert both.hidden.shape == (3, 3, 4) and both.pooled.shape == (3, 2) and len(both[1:]) == 2
    with pytest.raises(ValueError, match="pooled"):
        TextEmbeds.cat([e, TextEmbeds(torch.randn(1, 3, 4))])
