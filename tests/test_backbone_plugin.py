"""A base-model family defined in this file alone (no src/ edits) plugs in through config: SD2.1's family with
its own denoiser call (the UNet sees the timestep times ``time_scale``) and its own folder rule (a marker file).
Named by ``model.backbone``, it trains 2 steps of OSEDiff through ``osediff_lab.train.run``, its export infers
through the pipeline on the base rebuilt from the sidecar (every denoiser call, training's and inference's,
goes through it), and its saved folder is told apart from SD2.1's."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from omegaconf import open_dict
from torch import nn

from helpers import TINY, compose_config, x0_from_eps
from osediff_lab.backbones import backbone_of, family_of
from osediff_lab.backbones.embeds import TextEmbeds
from osediff_lab.backbones.sd import SDBackbone
from osediff_lab.models.components import build_components, load_pretrained, save_pretrained
from osediff_lab.pipeline import SRPipeline
from osediff_lab.train import run

pytestmark = pytest.mark.usefixtures("single_thread")

# ---- a backbone defined here, not in src/ ---------------------------------------------------------------------

MARKER = "time_scaled.json"
SEEN: list[float] = []  # every timestep value the plugin's denoiser call passed on


@dataclass(frozen=True)
class TimeScaledSD(SDBackbone):
    """SD2.1's family whose UNet is conditioned on the timestep times ``time_scale``; its folders carry MARKER."""

    time_scale: float = 1.0

    name = "time_scaled_sd"

    @classmethod
    def recognises_folder(cls, path: Path) -> bool:
        return super().recognises_folder(path) and (path / MARKER).is_file()

    def denoiser_output(self, net: nn.Module, z_t: torch.Tensor, timestep: torch.Tensor, embeds: TextEmbeds,
                        factor: int) -> torch.Tensor:
        SEEN.extend((timestep * self.time_scale).flatten().tolist())
        return super().denoiser_output(net, z_t, timestep * self.time_scale, embeds, factor)


# ---- tests ----------------------------------------------------------------------------------------------------
SCALE = 0.25
RUN = [*TINY, "trainer.max_steps=2", "trainer.log_every_n_steps=1", "callbacks.samples.every_n_steps=0",
       "callbacks.checkpoint.every_n_train_steps=2", "trainer.enable_progress_bar=false"]


@pytest.mark.slow
def test_a_family_defined_here_trains_exports_and_infers_through_config_alone(tmp_path):
    cfg = compose_config(RUN, tmp_path)
    with open_dict(cfg):
        cfg.model.backbone = {"_target_": f"{__name__}.TimeScaledSD", "time_scale": SCALE}
    SEEN.clear()
    trainer, module, summary = run(cfg)
    assert trainer.global_step == 2 and family_of(module.generator.unet) == "time_scaled_sd"
    assert SEEN and max(SEEN) <= 999 * SCALE, "a training call of the denoiser bypassed the backbone"
    sidecar = json.loads(Path(summary["lora_sidecar"]).read_text())
    assert sidecar["model_arch"]["backbone"] == {"_target_": f"{__name__}.TimeScaledSD", "time_scale": SCALE}

    SEEN.clear()
    pipe = SRPipeline.from_checkpoint(summary["lora"], device="cpu", merge_lora=False)
    generator = pipe.generator
    assert backbone_of(generator.unet) == TimeScaledSD(SCALE)
    out, _ = pipe.enhance(torch.rand(1, 3, 16, 16))
    assert out.shape == (1, 3, 64, 64) and torch.isfinite(out).all()
    assert set(SEEN) == {generator.timestep * SCALE}
    z, embeds, t = torch.randn(1, 4, 8, 8), pipe.text_encoders([""]), torch.tensor([generator.timestep])
    with torch.no_grad():  # the one step by hand: the UNet at the scaled timestep, then epsilon's x0
        eps = generator.unet(z, t * SCALE, encoder_hidden_states=embeds.hidden).sample
        torch.testing.assert_close(generator.denoise(z, embeds), x0_from_eps(z, eps, t, generator.schedule.alphas_cumprod))


def test_its_folder_rule_tells_its_folders_from_sd_ones_and_config_names_it_with_options(tmp_path):
    folder = save_pretrained(build_components(compose_config(TINY).model), tmp_path / "base")
    assert type(load_pretrained(folder).backbone) is SDBackbone  # no marker: SD2.1's folder
    (folder / MARKER).write_text("{}")
    assert load_pretrained(folder).backbone == TimeScaledSD()
    cfg = compose_config([*TINY, "model=sd21_base", f"model.pretrained_path={folder}", "model.backbone=time_scaled_sd",
                          "+model.time_scale=0.5"])
    loaded = build_components(cfg.model)
    assert loaded.backbone == TimeScaledSD(0.5) and family_of(loaded.denoiser) == "time_scaled_sd"
