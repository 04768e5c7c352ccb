"""Adversarial methods: the GAN losses and the multi-level loss against hand computations, HYPIR's heads (spectral norm,
blur-pool) and its ConvNeXt features against timm's own, the diffusion-feature discriminator against a full UNet pass,
frozen backbones that get no gradient and never change, G and D updates alternating as configured (counted), and
``hypir`` and ``osediff_gan`` trained on model=tiny: resumed bit-identically (discriminator and its optimiser
included), exported, re-imported and run through the inference pipeline. ``hypir_release``'s values are checked
against HYPIR's published config (configs/sd2_train.yaml, quoted below with its line numbers)."""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import pytest
import pytorch_lightning as pl
import timm
import torch
from diffusers import DDPMScheduler
from omegaconf import OmegaConf, open_dict
from peft import LoraConfig, inject_adapter_in_model
from safetensors.torch import load_file, save_file

from helpers import TINY, compose_config
from osediff_lab.checks import config_problems
from osediff_lab.discriminators import losses
from osediff_lab.discriminators.image import ConvNeXtDiscriminator
from osediff_lab.discriminators.layers import BlurPool, MultiLevelHeads, SpectralNormalized
from osediff_lab.errors import ConfigError, MissingWeightsError
from osediff_lab.models.components import build_components
from osediff_lab.pipeline import SRPipeline
from osediff_lab.train import build_module, run
from osediff_lab.weights import MANIFEST
from osediff_lab.weights.manifest import WeightFile

pytestmark = pytest.mark.usefixtures("single_thread")

RUN = [*TINY, "trainer.log_every_n_steps=1", "callbacks.samples.every_n_steps=0", "trainer.enable_progress_bar=false",
       "callbacks.checkpoint.every_n_train_steps=1"]
HYPIR = ["method=hypir", "discriminator=convnext_tiny", "generator.lora.unet_rank=8", "generator.lora.unet_alpha=8"]
OSEDIFF_GAN = ["method=osediff_gan"]


def sigmoid(x: float) -> float:
    return 1 / (1 + math.exp(-x))


def softplus(x: float) -> float:
    return math.log(1 + math.exp(x))


def bce(x: float, y: float) -> float:
    """-[y log s(x) + (1 - y) log(1 - s(x))], written out."""
    return -(y * math.log(sigmoid(x)) + (1 - y) * math.log(1 - sigmoid(x)))


def mean(values) -> float:
    values = list(values)
    return sum(values) / len(values)


# two levels: a (B=2, 2, 2) logit map and one logit per sample (B, 1), as HYPIR's heads give them
REAL = [torch.tensor([[[0.5, -1.0], [2.0, 0.0]], [[1.5, -0.5], [0.25, 3.0]]]), torch.tensor([[1.2], [-0.7]])]
FAKE = [torch.tensor([[[-2.0, 0.3], [0.1, -0.4]], [[0.9, -1.1], [-3.0, 0.6]]]), torch.tensor([[-0.2], [0.8]])]


def values(level: torch.Tensor) -> list[list[float]]:
    """Each sample's logits as a flat list."""
    return [row.flatten().tolist() for row in level]


def test_nonsaturating_and_hinge_losses_against_hand_computation():
    flat_real, flat_fake = [sum(values(r), []) for r in REAL], [sum(values(f), []) for f in FAKE]
    d_ns = sum(mean(softplus(-x) for x in r) for r in flat_real) + sum(mean(softplus(x) for x in f) for f in flat_fake)
    g_ns = sum(mean(softplus(-x) for x in f) for f in flat_fake)
    d_hinge = sum(mean(max(0.0, 1 - x) for x in r) for r in flat_real) + sum(mean(max(0.0, 1 + x) for x in f) for f in flat_fake)
    g_hinge = -sum(mean(f) for f in flat_fake)
    assert losses.discriminator_loss("nonsaturating", REAL, FAKE, 1.0).item() == pytest.approx(d_ns, rel=1e-6)
    assert losses.generator_loss("nonsaturating", FAKE, 1.0).item() == pytest.approx(g_ns, rel=1e-6)
    assert losses.discriminator_loss("hinge", REAL, FAKE, 1.0).item() == pytest.approx(d_hinge, rel=1e-6)
    assert losses.generator_loss("hinge", FAKE, 1.0).item() == pytest.approx(g_hinge, rel=1e-6)


def test_multilevel_sigmoid_loss_against_hand_computation():
    """vision-aided's multilevel_loss with alpha 0.8 (HYPIR's): per sample, the sum over levels of the mean BCE of
    the level's logits against 0.8 (real and the generator's loss) or 0 (fake); then the batch mean."""

    def by_hand(levels: list[torch.Tensor], target: float) -> float:
        per_sample = [sum(mean(bce(x, target) for x in values(level)[b]) for level in levels) for b in range(2)]
        return mean(per_sample)

    d = losses.discriminator_loss("multilevel_sigmoid", REAL, FAKE, 0.8).item()
    g = losses.generator_loss("multilevel_sigmoid", FAKE, 0.8).item()
    assert d == pytest.approx(by_hand(REAL, 0.8) + by_hand(FAKE, 0.0), rel=1e-6)
    assert g == pytest.approx(by_hand(FAKE, 0.8), rel=1e-6)
    # one sample, one logit 0: BCE(0, 0.8) = log 2 whatever the target
    assert losses.multilevel_sigmoid([torch.zeros(1, 1)], 0.8).item() == pytest.approx(math.log(2), rel=1e-6)


def test_r1_penalty_of_a_linear_discriminator_is_the_squared_weight_norm():
    """D(x) = <w, x> per sample: its input gradient is w, so R1 = ||w||^2; a second level of mean(x) adds 1/n."""
    w = torch.tensor([[[[0.5, -2.0], [1.0, 3.0]]]])
    x = torch.randn(3, 1, 2, 2, requires_grad=True)
    assert losses.r1_penalty([(x * w).sum((1, 2, 3))[:, None]], x).item() == pytest.approx(w.pow(2).sum().item(), rel=1e-6)
    two_levels = [(x * w).sum((1, 2, 3))[:, None], x[:, 0]]  # the map's per-sample mean has gradient 1/4 everywhere
    assert losses.r1_penalty(two_levels, x).item() == pytest.approx((w + 0.25).pow(2).sum().item(), rel=1e-6)


@pytest.mark.parametrize(("loss", "target", "key"), [("wasserstein", 1.0, "discriminator.loss"),
                                                     ("hinge", 0.8, "discriminator.real_target")])
def test_bad_loss_settings_name_their_key(loss, target, key, tmp_path):
    cfg = compose_config([*TINY, *HYPIR, f"discriminator.loss={loss}", f"discriminator.real_target={target}"], tmp_path)
    assert any(p.startswith(key) for p in config_problems(cfg))


def test_spectral_norm_is_exact_and_blur_pool_is_the_binomial_filter():
    heads = MultiLevelHeads([6, 5], 7, 4)
    normalised = [m for m in heads.modules() if hasattr(m, "parametrizations")]
    assert len(normalised) == 2 * 2 + 2  # two convs per map head, two linears on the pooled vector
    for m in normalised:
        assert isinstance(m.parametrizations.weight[0], SpectralNormalized)
        assert torch.linalg.svdvals(m.weight.detach().flatten(1))[0].item() == pytest.approx(1.0, abs=1e-5)
    a = torch.tensor([1.0, 3.0, 3.0, 1.0])
    blur = BlurPool(pad_off=1)
    torch.testing.assert_close(blur.kernel[0, 0], torch.outer(a, a) / 64)
    x = torch.ones(1, 2, 9, 9)
    y = blur(x)
    assert y.shape[-1] == 9 + 2 * 2 - 3  # zero padding 2 each side, 4x4 filter, stride 1
    assert torch.allclose(y[..., 2:-2, 2:-2], torch.ones(1, 2, 6, 6))  # the interior of a constant image stays


def test_hypir_heads_have_the_release_shapes():
    """MultiLevelDConv(level=4, in_ch1=[384, 768, 1536], in_ch2=1024, out_ch=512, down=2) (HYPIR model/D.py:61); at
    512 px ConvNeXt's stages 0-2 are 128, 64, 32 px and the heads give 32, 16, 8 px logit maps (worked out by hand:
    blur pad 2 -> n + 1, 3x3 stride 2 -> n / 2, blur pad 1 -> n / 2 - 1, 1x1 stride 2 -> n / 4)."""
    heads = MultiLevelHeads([384, 768, 1536], 1024, 512)
    shapes = {n: tuple(p.shape) for n, p in heads.named_parameters() if n.endswith("original")}
    assert shapes == {"maps.0.1.parametrizations.weight.original": (512, 384, 3, 3), "maps.0.4.parametrizations.weight.original": (1, 512, 1, 1),
                      "maps.1.1.parametrizations.weight.original": (512, 768, 3, 3), "maps.1.4.parametrizations.weight.original": (1, 512, 1, 1),
                      "maps.2.1.parametrizations.weight.original": (512, 1536, 3, 3), "maps.2.4.parametrizations.weight.original": (1, 512, 1, 1),
                      "pooled.0.parametrizations.weight.original": (512, 1024), "out.parametrizations.weight.original": (1, 512)}
    small = MultiLevelHeads([2, 2, 2], 3, 2)
    out = small([torch.zeros(1, 2, n, n) for n in (128, 64, 32)], torch.zeros(1, 3))
    assert [tuple(o.shape) for o in out] == [(1, 32, 32), (1, 16, 16), (1, 8, 8), (1, 1)]


def test_convnext_features_are_timms_stages_and_image_embedding(tmp_path):
    cfg = compose_config([*TINY, *HYPIR], tmp_path)
    args = OmegaConf.to_container(cfg.discriminator, resolve=True)
    disc = ConvNeXtDiscriminator(**{k: v for k, v in args.items() if k not in ("_target_", "name")})
    x = torch.rand(2, 3, 64, 64) * 2 - 1
    with torch.no_grad():
        features = disc.features(x, None)
        mean, std = torch.tensor(args["mean"]).view(1, 3, 1, 1), torch.tensor(args["std"]).view(1, 3, 1, 1)
        final, stages = disc.backbone.forward_intermediates(((x + 1) / 2 - mean) / std)
        embedding = disc.backbone.forward_head(final)
    for ours, theirs in zip(features[:-1], stages[:3], strict=True):
        torch.testing.assert_close(ours, theirs)
    torch.testing.assert_close(features[-1], embedding)
    assert features[-1].shape == (2, 16)


def test_pretrained_backbone_is_read_from_the_cache_and_a_missing_one_is_named(tmp_path, monkeypatch):
    """The manifest entry is timm's hub id of the OpenCLIP tower; a missing file is named with its fetch command
    (config check and build); a file in the cache is loaded with the network blocked."""
    assert MANIFEST["convnext_xxlarge_clip"].hf_repo == timm.models.get_pretrained_cfg("convnext_xxlarge.clip_laion2b_soup").hf_hub_id
    cfg = compose_config([*TINY, "method=hypir", f"paths.weights_dir={tmp_path}"], tmp_path)
    problems = [p for p in config_problems(cfg) if "convnext_xxlarge_clip" in p]
    assert problems and "python -m osediff_lab.weights fetch convnext_xxlarge_clip" in problems[0]
    with pytest.raises((ConfigError, MissingWeightsError), match="fetch convnext_xxlarge_clip"):
        build_module(cfg)

    # the same path on a small architecture: a file placed where the cache keeps hub snapshots
    entry = WeightFile("test_atto", "test", hf_repo="timm/convnext_atto.d2_in1k", hf_file="model.safetensors")
    monkeypatch.setitem(MANIFEST, entry.name, entry)
    saved = timm.create_model("convnext_atto.d2_in1k", pretrained=False)
    snapshot = tmp_path / "huggingface/hub/models--timm--convnext_atto.d2_in1k/snapshots/0"
    snapshot.mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in saved.state_dict().items()}, str(snapshot / "model.safetensors"))
    disc = ConvNeXtDiscriminator({"source": "pretrained", "architecture": "convnext_atto.d2_in1k", "weights": entry.name,
                                  "dtype": "bf16"}, [0, 1, 2], 4, [0.5] * 3, [0.5] * 3, "multilevel_sigmoid", 0.8, 0.0,
                                 weights_dir=str(tmp_path))
    loaded = disc.backbone.state_dict()
    assert all(torch.equal(loaded[k], v.to(torch.bfloat16)) for k, v in saved.state_dict().items())
    assert not any(p.requires_grad for p in disc.backbone.parameters()) and not disc.backbone.training


def test_unet_features_are_the_blocks_outputs_and_the_up_blocks_never_run(tmp_path):
    """The hooks' features equal the down/mid block outputs of a full UNet pass on the same noised latent; the
    discriminator stops after the last one. ``frozen`` is a copy of the base without its adapters."""
    cfg = compose_config([*TINY, "method=osediff_gan", "discriminator.unet=frozen", "discriminator.layers=[down.0,mid]"], tmp_path)
    torch.manual_seed(0)
    base = copy.deepcopy(build_components(cfg.model).denoiser).eval()
    torch.manual_seed(0)
    method = build_module(cfg).method
    disc = method.discriminator
    assert disc.denoiser is not method.reg_unet and "reg" not in str(list(disc.denoiser.named_modules()))
    assert all(torch.equal(p, base.state_dict()[k]) for k, p in disc.denoiser.state_dict().items())
    z, hidden = torch.randn(2, 4, 8, 8), torch.randn(2, 77, 32)
    calls = []
    disc.denoiser.up_blocks[0].register_forward_hook(lambda *_: calls.append("up"))
    torch.manual_seed(5)
    features = disc.features(z, hidden)
    assert calls == []
    torch.manual_seed(5)
    t = torch.randint(0, 1000, (2,))
    abar = method.generator.schedule.alphas_cumprod[t].view(2, 1, 1, 1)
    z_t = abar.sqrt() * z + (1 - abar).sqrt() * torch.randn_like(z)
    seen = {}

    def keep(name: str):
        def hook(module, inputs, output) -> None:
            seen[name] = output[0] if isinstance(output, tuple) else output

        return hook

    base.down_blocks[0].register_forward_hook(keep("down.0"))
    base.mid_block.register_forward_hook(keep("mid"))
    with torch.no_grad():
        base(z_t, t, encoder_hidden_states=hidden)
    torch.testing.assert_close(features[0], seen["down.0"], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(features[1], seen["mid"], atol=1e-5, rtol=1e-5)


def test_hypir_refuses_a_regularizer_discriminator_before_building(tmp_path):
    cfg = compose_config([*TINY, "method=hypir", "discriminator=unet_features"], tmp_path)
    assert any("discriminator.unet=regularizer" in p and "frozen" in p for p in config_problems(cfg))
    with open_dict(cfg):
        cfg.discriminator.unet = "frozen"
    assert not [p for p in config_problems(cfg) if "discriminator" in p]


def test_hypir_generator_is_the_schedulers_x0_at_t200_with_lora_on_the_release_targets(tmp_path):
    """z_H = DDPMScheduler.step(UNet(z_L, 200), 200, z_L).pred_original_sample (HYPIR trainer/sd2.py:85-90; a fresh
    LoRA adds 0); its LoRA wraps what PEFT's own matching of HYPIR's target list wraps, at scale 256 / 256 = 1, and
    only the LoRA trains (conv_in and the VAE stay frozen)."""
    cfg = compose_config([*TINY, "method=hypir", "discriminator=convnext_tiny"], tmp_path)
    torch.manual_seed(0)
    components = build_components(cfg.model)
    base = copy.deepcopy(components.denoiser).eval()
    torch.manual_seed(0)
    gen = build_module(cfg).method.generator
    z_l, hidden = torch.randn(2, 4, 8, 8), torch.randn(2, 77, 32)
    scheduler = DDPMScheduler.from_config(OmegaConf.to_container(cfg.model.arch.scheduler))
    with torch.no_grad():
        expected = scheduler.step(base(z_l, 200, encoder_hidden_states=hidden).sample, 200, z_l).pred_original_sample
        torch.testing.assert_close(gen.denoise(z_l, hidden), expected, atol=1e-5, rtol=1e-5)

    reference = copy.deepcopy(base)
    targets = list(cfg.generator.lora.unet_targets)
    inject_adapter_in_model(LoraConfig(r=256, lora_alpha=256, init_lora_weights="gaussian", target_modules=targets), reference)
    wrapped = {n for n, m in reference.named_modules() if hasattr(m, "lora_A")}
    ours = {n for n, m in gen.unet.named_modules() if hasattr(m, "lora_A")}
    assert ours == wrapped and "conv_in" not in ours
    assert {s for m in gen.unet.modules() if hasattr(m, "scaling") for s in m.scaling.values()} == {1.0}
    trained = [n for n, p in gen.named_parameters() if p.requires_grad]
    assert trained and all(".lora_" in n and n.startswith("unet.") for n in trained)


class StepOrder(pl.Callback):
    """Records which group's optimiser stepped, in order, and the frozen backbone's tensors at the start."""

    def __init__(self) -> None:
        self.order: list[str] = []
        self.backbone: dict[str, torch.Tensor] = {}

    def on_train_start(self, trainer, pl_module) -> None:
        for name, opt in zip(pl_module.groups, trainer.optimizers, strict=True):
            opt.register_step_post_hook(lambda *_, name=name: self.order.append(name))
        self.backbone = {k: v.clone() for k, v in pl_module.method.discriminator.backbone.state_dict().items()}


def group_steps(trainer, module) -> dict[str, set[int]]:
    """Each group's optimiser step count (from its state)."""
    return {name: {int(s["step"]) for s in opt.state.values()} for name, opt in zip(module.groups, trainer.optimizers, strict=True)}


@pytest.mark.slow
def test_hypir_alternates_g_and_d_as_configured_and_its_backbone_never_changes(tmp_path):
    cfg = compose_config([*RUN, *HYPIR, "trainer.max_steps=2", "method.optim.discriminator.updates=2",
                          f"+callbacks.order._target_={__name__}.StepOrder"], tmp_path)
    trainer, module, _ = run(cfg)
    recorder = next(c for c in trainer.callbacks if isinstance(c, StepOrder))
    assert recorder.order == ["generator", "discriminator", "discriminator"] * 2
    assert group_steps(trainer, module) == {"generator": {2}, "discriminator": {4}}
    backbone = module.method.discriminator.backbone
    assert all(p.grad is None and not p.requires_grad for p in backbone.parameters()), "the frozen backbone got a gradient"
    assert all(torch.equal(v, recorder.backbone[k]) for k, v in backbone.state_dict().items()), "the frozen backbone changed"
    assert not backbone.training and any(n.startswith("method.discriminator.heads.") for n in module.trained_names)


def test_osediff_gan_steps_generator_regularizer_discriminator_and_a_frozen_unet_stays(tmp_path):
    """Every step: the generator, the regularizer, then the discriminator's heads; with ``unet: frozen`` the copy
    gets no gradient and never changes while the heads learn."""
    module = build_module(compose_config([*TINY, *OSEDIFF_GAN, "discriminator.unet=frozen"], tmp_path)).train()
    disc = module.method.discriminator
    unet_before = {k: v.clone() for k, v in disc.denoiser.state_dict().items()}
    heads_before = {k: v.clone() for k, v in disc.heads.state_dict().items()}
    optimizers = module.build_optimizers()
    order = []
    for name, opt in optimizers.items():
        opt.register_step_post_hook(lambda *_, name=name: order.append(name))
    hq = torch.rand(2, 3, 64, 64) * 2 - 1
    for _ in range(2):
        logs = module.optimize_batch(module.on_after_batch_transfer({"hq": hq.clone()}, 0), optimizers, prompts=["", ""])
    assert order == ["generator", "regularizer", "discriminator"] * 2
    assert {"train/loss_gan", "train/loss_discriminator", "train/d_logit_real", "train/d_logit_fake"} <= set(logs)
    assert all(p.grad is None for p in disc.denoiser.parameters())
    assert all(torch.equal(v, unet_before[k]) for k, v in disc.denoiser.state_dict().items())
    assert any(not torch.equal(v, heads_before[k]) for k, v in disc.heads.state_dict().items())


def optimizer_tensors(trainer, module) -> dict[str, torch.Tensor]:
    """Every optimiser's state tensors, keyed by group, parameter index and state name."""
    return {f"{g}.{i}.{k}": v for g, opt in zip(module.groups, trainer.optimizers, strict=True)
            for i, s in opt.state_dict()["state"].items() for k, v in s.items() if torch.is_tensor(v)}


@pytest.mark.slow
@pytest.mark.parametrize(("name", "overrides", "stem"), [("hypir", HYPIR, "hypir_lora"), ("osediff_gan", OSEDIFF_GAN, "osediff_gan_lora")])
def test_method_trains_resumes_bit_identically_exports_and_infers(name, overrides, stem, tmp_path):
    straight = run(compose_config([*RUN, *overrides, "trainer.max_steps=3"], tmp_path / "straight"))
    run(compose_config([*RUN, *overrides, "trainer.max_steps=2"], tmp_path / "resumed"))
    resumed = run(compose_config([*RUN, *overrides, "trainer.max_steps=3"], tmp_path / "resumed"))
    (trainer, module, summary), (trainer2, module2, _) = straight, resumed
    a, b = module.trained_state_dict(), module2.trained_state_dict()
    assert set(a) == set(b) and any(k.startswith("method.discriminator.heads.") for k in a)
    assert all(torch.equal(a[k], b[k]) for k in a), "resume is not bit-identical"
    oa, ob = optimizer_tensors(trainer, module), optimizer_tensors(trainer2, module2)
    assert set(oa) == set(ob) and any(k.startswith("discriminator.") for k in oa)
    assert all(torch.equal(oa[k], ob[k]) for k in oa), "an optimiser's state is not bit-identical after resume"
    assert group_steps(trainer2, module2)["discriminator"] == {3}

    lora = Path(summary["lora"])
    sidecar = json.loads(lora.with_suffix(".json").read_text())
    assert lora.name == f"{stem}.safetensors" and sidecar["method"]["_target_"].endswith(type(module.method).__name__)
    exported = load_file(str(lora))
    assert not any("discriminator" in k for k in exported)
    pipe = SRPipeline.from_checkpoint(lora, options={"device": "cpu", "precision": "fp32", "merge_lora": False})
    loaded = dict(pipe.generator.named_parameters())
    assert all(torch.equal(loaded[k].detach(), v) for k, v in exported.items())
    assert pipe.generator.timestep == module.method.generator.timestep
    sr, _ = pipe.enhance(torch.rand(1, 3, 16, 16))
    assert sr.shape[-2:] == (64, 64) and torch.isfinite(sr).all()
    if name == "hypir":  # the LoRA only: no VAE adapter, no conv_in
        assert sidecar["timestep"] == 200 and not sidecar["train_vae_encoder"]
        assert exported and all(k.startswith("unet.") and ".lora_" in k for k in exported)


# HYPIR's published config, github XPixelGroup/HYPIR@b61d107 configs/sd2_train.yaml (line: text), and the code lines
# that give the values the config leaves to defaults.
RELEASE = {
    "model.name": ("sd21_base", ":73 base_model_path: stabilityai/stable-diffusion-2-1-base"),
    "generator.timestep": (200, ":74 model_t: 200 / :75 coeff_t: 200"),
    "generator.lora.unet_rank": (256, ":76 lora_rank: 256"),
    "generator.lora.unet_alpha": (256, "trainer/sd2.py:50 lora_alpha=self.config.lora_rank"),
    "generator.lora.init": ("gaussian", "trainer/sd2.py:51 init_lora_weights='gaussian'"),
    "generator.lora.unet_targets": (["to_k", "to_q", "to_v", "to_out.0", "conv", "conv1", "conv2", "conv_shortcut", "conv_out",
                                     "proj_in", "proj_out", "ff.net.2", "ff.net.0.proj"], ":77 lora_modules"),
    "generator.train_vae_encoder": (False, "trainer/sd2.py:37-58: LoRA on the UNet only"),
    "generator.latent": ("sample", "trainer/base.py:263 latent_dist.sample()"),
    "callbacks.ema.decay": (0.999, ":78 use_ema: true / :79 ema_decay: 0.999"),
    "method.lpips_weight": (5.0, ":83 lambda_lpips: 5"),
    "method.gan_weight": (0.5, ":82 lambda_gan: 0.5"),
    "method.l2_weight": (1.0, ":84 lambda_l2: 1"),
    "method.optim.generator.lr": (1e-5, ":85 lr_G: 1e-5"),
    "method.optim.discriminator.lr": (1e-5, ":86 lr_D: 1e-5"),
    "method.optim.generator.betas": ([0.9, 0.999], ":88-89 opt_kwargs: betas: [0.9, 0.999]"),
    "method.optim.discriminator.betas": ([0.9, 0.999], ":88-89"),
    "method.optim.generator.weight_decay": (0.01, ":87 adam -> torch.optim.AdamW (trainer/base.py:163-164), default 1e-2"),
    "method.optim.discriminator.weight_decay": (0.01, "trainer/base.py:178-182"),
    "method.optim.discriminator.updates": (1, "trainer/base.py:327-331: G and D alternate"),
    "trainer.precision": ("bf16-mixed", ":91 mixed_precision: bf16"),
    "seed": (231, ":92 seed: 231"),
    "trainer.max_steps": (30000, ":93 max_train_steps: 30000"),
    "optim.accumulate_grad_batches": (1, ":94 gradient_accumulation_steps: 1"),
    "generator.gradient_checkpointing": (True, ":95 gradient_checkpointing: true"),
    "optim.grad_clip": (1.0, ":96 max_grad_norm: 1.0"),
    "callbacks.checkpoint.every_n_train_steps": (500, ":99 checkpointing_steps: 500"),
    "data.batch_size": (6, ":5 batch_size: 6"),
    "data.crop_size": (512, ":17 out_size: 512"),
    "data.flip": (True, ":19 use_hflip: true"),
    "scale": (4, ":60 stage2_scale: 4"),
    "discriminator.real_target": (0.8, "model/D.py:62 multilevel_loss(alpha=0.8)"),
    "discriminator.head_width": (512, "model/D.py:61 out_ch=512"),
    "discriminator.backbone.dtype": ("bf16", "trainer/base.py:144 precision='bf16'"),
    "degradation.kernel_size": (21, ":22 blur_kernel_size: 21"),
    "degradation.first.kernel_types": (["iso", "aniso", "generalized_iso", "generalized_aniso", "plateau_iso", "plateau_aniso"], ":23"),
    "degradation.first.kernel_probs": ([0.45, 0.25, 0.12, 0.03, 0.12, 0.03], ":24"),
    "degradation.first.sinc_prob": (0.1, ":25"),
    "degradation.first.blur_sigma": ([0.2, 3.0], ":26 blur_sigma: [0.2, 3]"),
    "degradation.first.betag": ([0.5, 4.0], ":27"),
    "degradation.first.betap": ([1.0, 2.0], ":28"),
    "degradation.second.kernel_types": (["iso", "aniso", "generalized_iso", "generalized_aniso", "plateau_iso", "plateau_aniso"], ":31"),
    "degradation.second.kernel_probs": ([0.45, 0.25, 0.12, 0.03, 0.12, 0.03], ":32"),
    "degradation.second.sinc_prob": (0.1, ":33"),
    "degradation.second.blur_sigma": ([0.2, 1.5], ":34"),
    "degradation.second.betag": ([0.5, 4.0], ":35"),
    "degradation.second.betap": ([1.0, 2.0], ":36"),
    "degradation.final.sinc_prob": (0.8, ":38 final_sinc_prob: 0.8"),
    "degradation.pool.enabled": (True, ":49 queue_size: 256"),
    "degradation.pool.size": (256, ":49 queue_size: 256"),
    "degradation.first.resize_probs": ([0.2, 0.7, 0.1], ":51"),
    "degradation.first.resize_range": ([0.15, 1.5], ":52"),
    "degradation.first.gaussian_noise_prob": (0.5, ":53"),
    "degradation.first.noise_range": ([1.0, 30.0], ":54 noise_range: [1, 30]"),
    "degradation.first.poisson_scale_range": ([0.05, 3.0], ":55 poisson_scale_range: [0.05, 3]"),
    "degradation.first.gray_noise_prob": (0.4, ":56"),
    "degradation.first.jpeg_range": ([30.0, 95.0], ":57 jpeg_range: [30, 95]"),
    "degradation.second.blur_prob": (0.8, ":61 second_blur_prob: 0.8"),
    "degradation.second.resize_probs": ([0.3, 0.4, 0.3], ":62"),
    "degradation.second.resize_range": ([0.3, 1.2], ":63"),
    "degradation.second.gaussian_noise_prob": (0.5, ":64"),
    "degradation.second.noise_range": ([1.0, 25.0], ":65 noise_range2: [1, 25]"),
    "degradation.second.poisson_scale_range": ([0.05, 2.5], ":66"),
    "degradation.second.gray_noise_prob": (0.4, ":67"),
    "degradation.second.jpeg_range": ([30.0, 95.0], ":68"),
}


def test_hypir_release_values_are_the_published_configs(tmp_path):
    cfg = compose_config(["+experiment=hypir_release"], tmp_path)
    wrong = {key: (OmegaConf.select(cfg, key), want, source) for key, (want, source) in RELEASE.items()
             if (v := OmegaConf.select(cfg, key)) != want or type(v) is not type(want) and not isinstance(want, list)}
    assert not wrong, wrong
    assert cfg.method._target_ == "osediff_lab.methods.hypir.HYPIR" and cfg.discriminator.loss == "multilevel_sigmoid"
    assert cfg.loss.lpips.net == "vgg"  # trainer/base.py:129 lpips.LPIPS(net="vgg")
    realesrgan = OmegaConf.load(Path(__file__).parents[1] / "conf/degradation/realesrgan.yaml")
    assert set(cfg.degradation) == set(realesrgan)  # every key of the Real-ESRGAN degradation, none more


def test_the_release_recipe_builds_on_the_tiny_twin(tmp_path):
    """hypir_release's method, discriminator loss and degradation on model=tiny with the ConvNeXt twin: the checks
    pass and one step runs (bf16 autocast, as the recipe's precision)."""
    cfg = compose_config(["+experiment=hypir_release", "model=tiny", "data=demo", "discriminator=convnext_tiny",
                          "loss.lpips.pretrained=false", "loss.lpips.net=alex", "data.crop_size=64", "data.batch_size=2", "generator.lora.unet_rank=4",
                          "generator.lora.unet_alpha=4", "degradation.pool.size=4", "logger=csv"], tmp_path)
    assert config_problems(cfg) == []
    module = build_module(cfg).train()
    optimizers = module.build_optimizers()
    hq = torch.rand(2, 3, 64, 64) * 2 - 1
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logs = module.optimize_batch(module.on_after_batch_transfer({"hq": hq}, 0), optimizers, prompts=["", ""])
    assert all(torch.isfinite(torch.as_tensor(v)).all() for v in logs.values())
    assert {"train/loss_l2", "train/loss_lpips", "train/loss_gan", "train/loss_discriminator"} <= set(logs)
