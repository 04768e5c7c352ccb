"""PiSA-SR (Sun et al., CVPR 2025, arXiv 2412.03017; release github csslc/PiSA-SR@9c76e12): SR as the residual
between LQ and HQ latents, learnt by two LoRA sets on the SD UNet in two stages. Stage ``pixel`` trains the
pixel-level LoRA with the L2 loss; stage ``semantic`` freezes it (loaded from the pixel stage's export) and trains
the semantic-level LoRA with L2, LPIPS and classifier score distillation (CSD: the pretrained UNet's classifier-free
guidance direction against the negative prompt, whose own prediction is the "fake" score; ``pisasr.py:132-171``).

Per batch (``train_pisasr.py:146-182``, ``pisasr.py:275-293``): z_L a draw from the VAE posterior, the generator
given the null prompt with probability ``null_text_ratio`` (one coin per batch) and the caption otherwise, while
the CSD always conditions on the caption. The draws a step makes can be passed in (``StepDraws``), so a step can be
compared with another implementation's.
"""

from __future__ import annotations

import dataclasses
import random
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from omegaconf import DictConfig, OmegaConf
from torch import nn

from osediff_lab.errors import ConfigError
from osediff_lab.methods.base import GENERATOR, Method, ParamGroup, weighted_total
from osediff_lab.models.backbone import TextEmbeds, as_embeds
from osediff_lab.models.components import Components
from osediff_lab.models.lora_files import load_lora_tensors
from osediff_lab.models.pisasr import PIXEL, SEMANTIC, build_pisa_generator
from osediff_lab.models.vsd import sample_timesteps, vsd_loss

STAGES = (PIXEL, SEMANTIC)
NULL_PROMPT = ""  # the generator's prompt when the null-text coin comes up (dataset.py:77)


@dataclass(frozen=True)
class StepDraws:
    """The random draws of one training step; each one not given is drawn as the release draws it."""

    csd_t: torch.Tensor | None = None  # CSD timesteps, one per sample, in [csd_t_min, csd_t_max)
    csd_noise: torch.Tensor | None = None  # the noise of z_t, shaped as z_H
    null_text: bool | None = None  # the generator gets the null prompt (python's random() < null_text_ratio)
    posterior_noise: torch.Tensor | None = None  # the standard normal draw of z_L = mean + std * noise, shaped as z_L


def stage_problems(stage: str, pixel_lora_from: str | None) -> list[str]:
    """The stage must be known, and the semantic stage needs the pixel stage's export, which must exist."""
    if stage not in STAGES:
        return [f"method.stage='{stage}' must be one of {list(STAGES)}"]
    if stage == SEMANTIC and not pixel_lora_from:
        return ["method.stage=semantic trains on a frozen pixel-level LoRA: set method.pixel_lora_from="
                "<the pixel stage's lora/osediff_lora.safetensors>"]
    if pixel_lora_from and not Path(str(pixel_lora_from)).expanduser().is_file():
        return [f"method.pixel_lora_from={pixel_lora_from} does not exist (the pixel stage's lora/osediff_lora.safetensors)"]
    return []


def csd_problems(csd_weight: float, cfg_scale: float, negative_prompt: str, prompt_name: str | None,
                 prompt_text: str | None) -> list[str]:
    """A weighted CSD whose two scores are identical by construction (its loss and gradient exactly 0): CFG at scale
    0, or every caption equal to the negative prompt (prompt=none against an empty one, prompt=fixed's text)."""
    if csd_weight <= 0:
        return []
    if cfg_scale == 0:
        return [f"method.cfg_scale=0 with method.csd_weight={csd_weight}: CFG at scale 0 is the negative prompt's "
                "score itself, so CSD's two scores are identical and it trains nothing"]
    caption = {"none": NULL_PROMPT, "fixed": prompt_text}.get(str(prompt_name))
    if caption is not None and caption == negative_prompt:
        return [f"method.csd_weight={csd_weight} with prompt={prompt_name} (every caption is '{caption}') and "
                f"method.negative_prompt='{negative_prompt}': CSD's conditional and unconditional scores are identical, "
                "its loss and gradient exactly 0. Set method.negative_prompt (the release's list, training_utils.py:24), "
                "a prompt group that captions each image (prompt=ram), or method.csd_weight=0"]
    return []


class PiSASR(Method):
    """PiSA-SR's generator and one training stage's losses; no regularizer (CSD needs no fake score)."""

    @classmethod
    def argument_problems(cls, args: Any) -> list[str]:
        problems = super().argument_problems(args) + stage_problems(args.stage, args.get("pixel_lora_from"))
        for key in ("l2_weight", "lpips_weight", "csd_weight"):
            if args[key] < 0:
                problems.append(f"method.{key}={args[key]} is negative; loss weights must be >= 0")
        if args.l2_weight + args.lpips_weight + args.csd_weight <= 0:
            problems.append("method.l2_weight, method.lpips_weight and method.csd_weight are all 0: nothing to train")
        if not 0 <= args.csd_t_min < args.csd_t_max <= 1000:
            problems.append(f"method.csd_t_min={args.csd_t_min} / method.csd_t_max={args.csd_t_max}: need 0 <= min < max <= 1000")
        if args.lora.rank < 1:
            problems.append(f"method.lora.rank={args.lora.rank} must be >= 1")
        if not 0 <= args.timestep < 1000:
            problems.append(f"method.timestep={args.timestep} must be in [0, 1000)")
        if args.latent not in ("mode", "sample"):
            problems.append(f"method.latent='{args.latent}' must be 'mode' or 'sample'")
        if not 0 <= args.null_text_ratio <= 1:
            problems.append(f"method.null_text_ratio={args.null_text_ratio} must be in [0, 1]")
        if args.get("release_one_optimizer") and args.get("frozen_dtype", "fp32") != "fp32":
            problems.append(f"method.release_one_optimizer=true steps the frozen LoRA set too, which "
                            f"method.frozen_dtype={args.frozen_dtype} would store in low precision: use fp32")
        return problems + csd_problems(args.csd_weight, args.cfg_scale, args.negative_prompt, args.get("prompt_name"),
                                       args.get("prompt_text"))

    def __init__(
        self,
        components: Components,
        encode_text: Callable[[list[str]], TextEmbeds],
        lpips: nn.Module | None,
        stage: str,
        lora: DictConfig,
        timestep: int,
        l2_weight: float,
        lpips_weight: float,
        csd_weight: float,
        cfg_scale: float,
        csd_t_min: int,
        csd_t_max: int,
        negative_prompt: str,
        optim: Mapping[str, Mapping[str, Any]],
        latent: str,
        null_text_ratio: float,
        prompt_name: str | None,
        prompt_text: str | None,
        release_one_optimizer: bool = False,
        release_unsynced_semantic_grads: bool = False,
        pixel_lora_from: str | None = None,
        frozen_dtype: str = "fp32",
        gradient_checkpointing: bool = False,
    ) -> None:
        problems = stage_problems(stage, pixel_lora_from) + csd_problems(csd_weight, cfg_scale, negative_prompt,
                                                                         prompt_name, prompt_text)
        if problems:
            raise ConfigError("; ".join(problems))
        if lpips_weight > 0 and lpips is None:
            raise ConfigError("method.lpips_weight > 0 needs an LPIPS network")
        generator, targets = build_pisa_generator(components, lora, timestep, latent)
        super().__init__(generator, targets, encode_text, lpips, optim)
        if pixel_lora_from:
            self.load_pixel_lora(pixel_lora_from)
        for name, p in generator.unet.named_parameters():
            p.requires_grad_(f".lora_A.{stage}." in name or f".lora_B.{stage}." in name)
        self.apply_memory_options(frozen_dtype, gradient_checkpointing)
        self.stage = stage
        self.weights = {"l2": l2_weight, "lpips": lpips_weight, "csd": csd_weight}
        self.cfg_scale, self.csd_t = cfg_scale, (csd_t_min, csd_t_max)
        self.negative_prompt = negative_prompt
        self.null_text_ratio = null_text_ratio
        self.release_one_optimizer = release_one_optimizer
        self.release_unsynced_semantic_grads = release_unsynced_semantic_grads
        if release_one_optimizer:
            self._keep_zero_grads()

    def lora_tensors(self) -> list[nn.Parameter]:
        """Every LoRA tensor of both sets, in the generator's order."""
        return [p for n, p in self.generator.named_parameters() if ".lora_A." in n or ".lora_B." in n]

    def param_groups(self) -> dict[str, ParamGroup]:
        """The trained LoRA set; with ``release_one_optimizer`` both sets, as the release's one AdamW lists them
        (``train_pisasr.py:84-91``). With ``release_unsynced_semantic_grads`` the semantic stage's gradients are not
        averaged over GPUs: the release froze that set before DDP wrapped the model (``:81``, ``:119``), so DDP
        never registered it and each GPU trains its own (rank 0's is saved, ``:199``)."""
        params = self.lora_tensors() if self.release_one_optimizer else [p for p in self.generator.parameters() if p.requires_grad]
        group = self.group(GENERATOR, params)
        if self.stage == SEMANTIC and self.release_unsynced_semantic_grads:
            group = ParamGroup(group.params, dataclasses.replace(group.settings, sync_grads=False))
        return {GENERATOR: group}

    def _keep_zero_grads(self) -> None:
        """The release's ``zero_grad(set_to_none=False)`` (``train_pisasr.py:182``; ``--set_grads_to_none`` is unset,
        ``training_utils.py:93``): a frozen LoRA tensor that had a gradient keeps a zero one, so its AdamW keeps
        stepping it (weight decay, and the stage-1 momentum when the run continues stage 1's optimiser). A hook on
        the trained tensors gives the frozen ones a zero gradient at every backward; before stage 2 the semantic
        set never had one (its gradient stays None, as in the release's stage 1)."""
        trained = [p for p in self.lora_tensors() if p.requires_grad]
        frozen = [p for p in self.lora_tensors() if not p.requires_grad]
        if self.stage != SEMANTIC or not trained:
            return

        def fill(_: torch.Tensor) -> None:
            for p in frozen:
                if p.grad is None:
                    p.grad = torch.zeros_like(p)

        for p in trained:
            p.register_post_accumulate_grad_hook(fill)

    def load_pixel_lora(self, path: str) -> None:
        """The pixel-level LoRA tensors of the pixel stage's export (its semantic tensors are not used)."""
        n = load_lora_tensors(self.generator, path, "method.pixel_lora_from", only=f".{PIXEL}.")
        want = sum(1 for k, _ in self.generator.named_parameters() if f".{PIXEL}." in k)
        if n != want:
            raise ConfigError(f"method.pixel_lora_from={path} holds {n} of this generator's {want} pixel-level LoRA "
                              "tensors; train the pixel stage with the same method.lora and model")

    @classmethod
    def inference_generator(cls, components: Components, sidecar: Mapping[str, Any]) -> tuple[nn.Module, dict[str, list[str]]]:
        """Both LoRA sets as the export's ``method`` block describes them (an export from before ``method.latent``
        existed was trained on the posterior's mode)."""
        method = sidecar["method"]
        return build_pisa_generator(components, OmegaConf.create(method["lora"]), int(method["timestep"]),
                                    method.get("latent", "mode"))

    @classmethod
    def inference_prompt(cls, sidecar: Mapping[str, Any]) -> dict[str, Any]:
        """The empty prompt, as the release runs inference (test_pisasr.py:50)."""
        return {"name": "none"}

    def export_state_dict(self) -> dict[str, torch.Tensor]:
        """Both LoRA sets (the frozen pixel-level one too): inference weighs them with lambda_pix / lambda_sem."""
        return {n: p for n, p in self.generator.named_parameters() if ".lora_A." in n or ".lora_B." in n}

    @torch.no_grad()
    def csd_targets(
        self, z_h: torch.Tensor, embeds: TextEmbeds, t: torch.Tensor | None = None, noise: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """x0 predictions of the pretrained UNet (the generator's adapters off) at timesteps ``t`` with ``noise``
        (each drawn when not given): CFG at ``cfg_scale`` between the negative prompt and ``embeds`` (the "real"
        score), and the negative prompt's own (the "fake" one); ``pisasr.py:139-163``."""
        schedule = self.generator.schedule
        t = sample_timesteps(z_h.shape[0], *self.csd_t, z_h.device) if t is None else t.to(z_h.device)
        noise = torch.randn_like(z_h) if noise is None else noise
        z_t = schedule.add_noise(z_h.detach(), noise, t)
        pred_cfg, pred_uncond = self.guided_prediction(self.generator.unet, z_t, t, embeds, self.negative_prompt, self.cfg_scale)
        return schedule.x0_from_output(z_t, pred_cfg, t), schedule.x0_from_output(z_t, pred_uncond, t)

    def generator_prompt(self, embeds: TextEmbeds, null_text: bool | None = None) -> tuple[TextEmbeds, bool]:
        """The generator's conditioning: the null prompt when the coin (python's ``random() < null_text_ratio``,
        ``pisasr.py:284-287``; or ``null_text``) says so, else the captions ``embeds``; and the coin."""
        null = random.random() < self.null_text_ratio if null_text is None else bool(null_text)
        return (self.fixed_prompt_embedding(NULL_PROMPT).expand(len(embeds)) if null else embeds), null

    def generator_losses(
        self, batch: dict[str, Any], embeds: TextEmbeds, draws: StepDraws | None = None
    ) -> tuple[dict[str, torch.Tensor], None]:
        """Weighted L2, LPIPS and CSD terms (each only when weighted) and ``total`` (``batch``: ``hq``, ``lq_up``
        in [-1, 1]); ``draws``: the step's random draws, each drawn here when not given."""
        draws = draws or StepDraws()
        embeds = as_embeds(embeds)
        gen_embeds, null = self.generator_prompt(embeds, draws.null_text)
        z_l = self.generator.encode(batch["lq_up"], noise=draws.posterior_noise)
        z_h = self.generator.denoise(z_l, gen_embeds)
        x_h = self.generator.decode(z_h)
        hq = batch["hq"]
        terms: dict[str, torch.Tensor] = {"l2": F.mse_loss(x_h.float(), hq.float())}
        if self.weights["lpips"] > 0:
            terms["lpips"] = self.lpips_loss(x_h, hq)
        self.metrics = {"null_text": torch.tensor(float(null), device=z_h.device)}
        if self.weights["csd"] > 0:
            x0_cfg, x0_uncond = self.csd_targets(z_h, embeds, draws.csd_t, draws.csd_noise)  # the caption, always
            terms["csd"], w = vsd_loss(z_h, x0_cfg, x0_uncond)
            self.metrics["csd_weight_factor"] = w.mean().detach()
        return weighted_total(terms, self.weights), None
