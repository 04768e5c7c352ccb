"""The diffusion-feature discriminator on every backbone: each family names its denoiser's feature points
(``Backbone.feature_points``), a transformer's image tokens become a map, and the rest of the denoiser never runs."""

from __future__ import annotations

import pytest
import torch

from helpers import TINY, compose_config
from osediff_lab.backbones.base import token_map
from osediff_lab.discriminators.unet import UNetFeatureDiscriminator
from osediff_lab.errors import ConfigError
from osediff_lab.models.backbone import denoiser_output, vae_factor
from osediff_lab.models.components import build_components
from osediff_lab.train import run

DISCRIMINATOR = dict(unet="frozen", t_min=0, t_max=1000, head_depth=1, head_width=8, norm_groups=4, dtype="fp32",
                     loss="nonsaturating", real_target=1.0, r1_gamma=0.0)


def test_tokens_become_the_map_of_their_patches_row_by_row():
    """Token r * cols + c of a 6 x 4-cell latent is the map's column (r, c): worked by hand on a 12 x 8 latent."""
    tokens = torch.arange(2 * 24 * 3, dtype=torch.float32).view(2, 24, 3)
    grid = token_map(tokens, torch.zeros(2, 16, 12, 8), 2)
    assert grid.shape == (2, 3, 6, 4)
    for r, c, d in ((0, 0, 0), (0, 3, 1), (1, 0, 2), (5, 3, 2), (2, 1, 0)):
        assert grid[1, d, r, c] == tokens[1, r * 4 + c, d]


@pytest.mark.parametrize("model", ["tiny", "tiny_sdxl", "tiny_sd3", "tiny_flux"])
def test_every_family_names_a_mid_feature_and_its_maps_are_the_hooked_outputs(model, tmp_path):
    """The discriminator's features equal the feature points' outputs of a full denoiser pass on the same noised
    latent (a transformer's image tokens laid out by hand), on a non-square latent; the blocks after the last
    feature never run."""
    cfg = compose_config([*TINY, f"model={model}"], tmp_path)
    torch.manual_seed(0)
    c = build_components(cfg.model)
    points = c.backbone.feature_points(c.denoiser)
    assert "mid" in points
    layers = [next(n for n in points if n != "mid"), "mid"]
    disc = UNetFeatureDiscriminator(c, layers=layers, **DISCRIMINATOR)
    net = disc.denoiser
    channels = c.vae.config.latent_channels
    z = torch.randn(2, channels, 8, 4)
    embeds = c.text(["", ""])
    calls = []  # what runs after every feature: a UNet's up blocks, a transformer's output projection
    (net.up_blocks[0] if hasattr(net, "up_blocks") else net.proj_out).register_forward_hook(lambda *_: calls.append("tail"))
    torch.manual_seed(5)
    features = disc.features(z, embeds)
    assert calls == []
    torch.manual_seed(5)
    t = torch.randint(0, 1000, (2,))
    z_t = disc.schedule.add_noise(z, torch.randn_like(z), t)
    seen = {}
    net_points = c.backbone.feature_points(net)

    def keep(name: str):
        def hook(module, inputs, output) -> None:
            tokens = isinstance(output, tuple) and torch.is_tensor(output[-1]) and output[-1].dim() == 3
            out = output[-1] if tokens else output[0] if isinstance(output, tuple) else output
            if tokens:  # image tokens (B, N, D), laid out row by row by hand
                rows, cols = z_t.shape[-2] // 2, z_t.shape[-1] // 2
                out = torch.stack([torch.stack([out[:, r * cols + col] for col in range(cols)], -1) for r in range(rows)], -2)
            seen[name] = out

        return hook

    for name in layers:
        net_points[name][0].register_forward_hook(keep(name))
    with torch.no_grad():
        denoiser_output(net, z_t, disc.schedule.model_timestep(t, z_t), embeds, vae_factor(c.vae))
    assert calls == ["tail"]
    for name, feature in zip(layers, features, strict=True):
        assert feature.shape[1] == points[name][1]
        torch.testing.assert_close(feature, seen[name], atol=1e-5, rtol=1e-5)
    logits = disc.classify(features)
    assert all(logit.shape[0] == 2 and logit.shape[1] == 1 for logit in logits)


def test_an_unknown_feature_is_named_with_the_familys_features(tmp_path):
    c = build_components(compose_config([*TINY, "model=tiny_sd3"], tmp_path).model)
    with pytest.raises(ConfigError, match=r"\['down.0'\] are not features of this sd3 denoiser; it has \['block.0'"):
        UNetFeatureDiscriminator(c, layers=["down.0"], **DISCRIMINATOR)


@pytest.mark.slow
def test_osediff_gan_with_the_feature_discriminator_trains_on_a_transformer_base(tmp_path):
    """DMD2's recipe on SD3's twin: the heads read the regularizer transformer's middle block; two steps train all three
    groups."""
    cfg = compose_config([*TINY, "model=tiny_sd3", "method=osediff_gan", "trainer.max_steps=2", "callbacks.samples.every_n_steps=0",
                          "trainer.enable_progress_bar=false", "trainer.log_every_n_steps=1"], tmp_path)
    _, module, summary = run(cfg)
    assert summary["steps"] == 2
    assert module.method.discriminator.denoiser is module.method.reg_unet
    assert {"train/loss_gan", "train/loss_discriminator"} <= set(summary["last_metrics"]), sorted(summary["last_metrics"])

