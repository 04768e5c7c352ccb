"""OSEDiffModule: manual optimisation alternating one generator step and N regularizer steps.

Owns the generator (LoRA UNet + LoRA VAE encoder), the regularizer UNet (frozen pretrained weights
for the real score, 'reg' LoRA for the fake score), the frozen text encoder and LPIPS. The math lives
in ``osediff_lab.models.vsd``; this file only wires it to optimisers, logging and checkpoints.
"""

from __future__ import annotations

import contextlib
import logging
import math
import warnings
from typing import Any

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from diffusers.optimization import get_scheduler
from omegaconf import DictConfig, OmegaConf
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from osediff_lab.data.degradation import Degradation
from osediff_lab.data.resize import upsample_input
from osediff_lab.dtypes import DTYPES
from osediff_lab.lit.distributed import average_gradients, gather_objects, own_rank_state
from osediff_lab.lit.validation import build_validator
from osediff_lab.models.lora import adapters_disabled, frozen_base_copy
from osediff_lab.models.lora_files import load_lora_tensors
from osediff_lab.models.osediff import OSEDiffParts, cast_frozen, trainable_parameters
from osediff_lab.models.text import PromptEmbedder, encode_prompts
from osediff_lab.models.vsd import (
    add_noise,
    classifier_free_guidance,
    diffusion_loss,
    sample_timesteps,
    vsd_loss,
    x0_from_eps,
)
from osediff_lab.pipeline import OSEDiffPipeline
from osediff_lab.prompts import PromptProvider

log = logging.getLogger(__name__)


RANK_KEYS = ("unet_rank", "vae_rank", "reg_rank")


class NonFiniteLossError(RuntimeError):
    """Too many consecutive optimiser steps had a non-finite loss or gradient."""


def poison_if_nonfinite(loss: torch.Tensor, params: list[nn.Parameter]) -> None:
    """Make the gradients non-finite when ``loss`` is, without a host sync: a NaN loss whose graph happens
    to give finite gradients must still skip the step, on every rank alike."""
    target = next((p for p in params if p.grad is not None), params[0])
    if target.grad is None:
        target.grad = torch.zeros_like(target)
    target.grad.add_(torch.where(torch.isfinite(loss.detach()), 0.0, float("nan")).to(target.grad.dtype))


class OSEDiffModule(pl.LightningModule):
    """Training system for OSEDiff. Batches carry ``hq`` in [-1, 1]; ``lq`` is made on device if absent."""

    def __init__(
        self,
        parts: OSEDiffParts,
        lpips_model: nn.Module | None,
        prompts: PromptProvider,
        degradation: Degradation,
        cfg: DictConfig,
    ) -> None:
        super().__init__()
        self.cfg = cfg
        self.loss_cfg = cfg.loss
        self.optim_cfg = cfg.optim
        self.automatic_optimization = False
        self.strict_loading = False
        self.tokenizer = parts.components.tokenizer
        self.text_encoder = parts.components.text_encoder
        self.generator = parts.generator
        self.reg_unet = parts.reg_unet
        self.lpips = lpips_model
        self.prompts = prompts
        self.degradation = degradation
        self.lora_targets = parts.targets
        self.register_buffer("alphas_cumprod", parts.components.scheduler.alphas_cumprod.float().clone(), persistent=False)
        if cfg.generator.gradient_checkpointing:
            self.generator.unet.enable_gradient_checkpointing()
            self.generator.vae.enable_gradient_checkpointing()
        frozen_dtype = DTYPES[cfg.generator.frozen_dtype]
        if frozen_dtype != torch.float32:
            for module in (self.text_encoder, self.generator, self.reg_unet):
                cast_frozen(module, frozen_dtype)
        # The release: a separate frozen copy of the pretrained UNet for the real score, stored in fp16.
        self.real_unet = frozen_base_copy(self.reg_unet, torch.float16) if cfg.loss.release_score_precision else None
        if cfg.generator.lora.get("reg_init_from"):
            n = load_lora_tensors(self.reg_unet, cfg.generator.lora.reg_init_from, "generator.lora.reg_init_from")
            log.info("regularizer LoRA warm-started from %s (%d tensors)", cfg.generator.lora.reg_init_from, n)
        self.gen_params = [p for _, p in trainable_parameters(self.generator)]
        if self.optim_cfg.conv_in_lora_twice:  # the release lists conv_in's LoRA tensors twice
            self.gen_params += [p for n, p in trainable_parameters(self.generator) if n.startswith("unet.conv_in.lora_")]
        self.reg_params = [p for _, p in trainable_parameters(self.reg_unet)]
        self.trained_names = [n for n, _ in trainable_parameters(self)]
        self.embedder = PromptEmbedder(self.tokenizer, self.text_encoder, max_cached=4096)
        self._bad_steps = 0
        self.batches_trained = 0  # training batches done (also skipped ones): the step axis of the logs
        self.unreadable: dict[str, str] = {}  # training images data workers found unreadable (path -> reason)
        self._grad_norms: dict[int, torch.Tensor] = {}
        self._skipped: set[int] = set()  # ids of optimisers whose last step was skipped (non-finite gradients)
        self.check_finite = True  # off only for the memory predictor's replay on fake tensors, which hold no values
        self.save_hyperparameters({"config": OmegaConf.to_container(cfg, resolve=True)})
        self._pipeline: OSEDiffPipeline | None = None
        self._negative: torch.Tensor | None = None
        self.validator = build_validator(cfg)  # metric networks kept outside the module's state

    def train(self, mode: bool = True) -> OSEDiffModule:
        """Frozen feature extractors stay in eval mode (LPIPS has dropout) whatever Lightning asks."""
        super().train(mode)
        self.text_encoder.eval()
        if self.lpips is not None:
            self.lpips.eval()
        return self

    # ---- inputs -------------------------------------------------------------------------------
    def on_after_batch_transfer(self, batch: dict[str, Any], dataloader_idx: int) -> dict[str, Any]:
        """Degrade on the training device (batched) unless the batch is already paired; add x_L except for
        validation batches (the inference pipeline upsamples those itself)."""
        for report in batch.pop("unreadable", []):  # files a data worker skipped, with the reason
            for line in filter(None, report.split("\n")):
                path, _, reason = line.partition("\t")
                self.unreadable[path] = reason
        if "lq" not in batch:
            batch["lq"] = self.degradation(batch["hq"])
        trainer = self.attached_trainer()
        if trainer is None or not trainer.evaluating:
            g = self.cfg.generator
            batch["lq_up"] = upsample_input(
                batch["lq"], batch["hq"].shape[-2:], list(g.input_upsample_modes), g.input_quantize_8bit
            )
        return batch

    def encode_text(self, prompts: list[str]) -> torch.Tensor:
        """Text embeddings per prompt on this module's device (cached by string)."""
        return self.embedder(prompts)

    def negative_embedding(self) -> torch.Tensor:
        """The real score's negative prompt, encoded once (kept outside the string cache, which DAPE churns)."""
        if self._negative is None or self._negative.device != self.device:
            self._negative = encode_prompts(self.tokenizer, self.text_encoder, [self.loss_cfg.negative_prompt])
        return self._negative

    def batch_prompts(self, batch: dict[str, Any]) -> list[str]:
        """Prompts for the batch: from the LQ image or, when prompt.source=hq, the HQ image (public release)."""
        lq01 = (batch["lq_up"] + 1) / 2
        hq01 = (batch["hq"] + 1) / 2
        source = (self.cfg.get("prompt") or {}).get("source", "lq")
        if source == "hq":  # the HQ crop comes from a file: cached prompts are keyed by that file's content
            return self.prompts(hq01, hq01, paths=batch.get("path"))
        return self.prompts(lq01, hq01)

    # ---- losses -------------------------------------------------------------------------------
    def unet_eps(self, z_t: torch.Tensor, t: torch.Tensor, embeds: torch.Tensor, unet: nn.Module | None = None) -> torch.Tensor:
        """Epsilon prediction of ``unet`` (default: the regularizer UNet with its active adapters)."""
        unet = self.reg_unet if unet is None else unet
        return unet(z_t, t, encoder_hidden_states=embeds.to(z_t.dtype)).sample

    def fake_eps(self, z_t: torch.Tensor, t: torch.Tensor, embeds: torch.Tensor) -> torch.Tensor:
        """The fake score's epsilon (regularizer UNet with its LoRA). With ``loss.release_score_precision`` it
        runs outside autocast in fp32, as the release calls the fake score and the regularizer loss."""
        if not self.loss_cfg.release_score_precision:
            return self.unet_eps(z_t, t, embeds)
        with torch.autocast(self.device.type, enabled=False):
            return self.unet_eps(z_t.float(), t, embeds)

    @torch.no_grad()
    def vsd_targets(
        self, z_h: torch.Tensor, embeds: torch.Tensor, t: torch.Tensor | None = None, noise: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """x0 predictions of the real score (frozen UNet, CFG with the negative prompt) and the fake score
        (the regularizer UNet with its LoRA) at timesteps ``t`` with ``noise`` (drawn when not given)."""
        lc = self.loss_cfg
        b = z_h.shape[0]
        t = sample_timesteps(b, lc.vsd_t_min, lc.vsd_t_max, z_h.device) if t is None else t.to(z_h.device)
        noise = torch.randn_like(z_h) if noise is None else noise
        z_t = add_noise(z_h.detach(), noise, t, self.alphas_cumprod)
        eps_fake = self.fake_eps(z_t, t, embeds).to(z_t.dtype)
        neg = self.negative_embedding().expand(b, -1, -1)
        z_both, t_both, c_both = torch.cat([z_t, z_t]), torch.cat([t, t]), torch.cat([neg, embeds])
        if self.real_unet is not None:  # the release: a separate frozen UNet, run in pure fp16
            with torch.autocast(self.device.type, enabled=False):
                eps_both = self.unet_eps(z_both.half(), t_both, c_both, unet=self.real_unet).to(z_t.dtype)
        else:
            with adapters_disabled(self.reg_unet):
                eps_both = self.unet_eps(z_both, t_both, c_both)
        eps_uncond, eps_cond = eps_both.chunk(2)
        eps_real = classifier_free_guidance(eps_uncond, eps_cond, lc.cfg_scale)
        return x0_from_eps(z_t, eps_real, t, self.alphas_cumprod), x0_from_eps(z_t, eps_fake, t, self.alphas_cumprod)

    def generator_losses(self, batch: dict[str, Any], embeds: torch.Tensor) -> tuple[dict[str, torch.Tensor], torch.Tensor, torch.Tensor]:
        """Weighted generator loss terms, x_H in [-1, 1] and z_H."""
        lc = self.loss_cfg
        x_h, z_h = self.generator(batch["lq_up"], embeds)
        hq = batch["hq"]
        terms: dict[str, torch.Tensor] = {"l2": F.mse_loss(x_h.float(), hq.float())}
        if lc.lpips_weight > 0:
            lp_dtype = next(self.lpips.parameters()).dtype  # loss.lpips.dtype: LPIPS runs in its own precision
            terms["lpips"] = self.lpips(x_h.to(lp_dtype), hq.to(lp_dtype)).float().mean()
        if lc.vsd_weight > 0:
            z_vsd = z_h if lc.vsd_space == "latent" else self.reencode(x_h)
            x0_real, x0_fake = self.vsd_targets(z_vsd, embeds)
            terms["vsd"], w = vsd_loss(z_vsd, x0_real, x0_fake)
            self.log("train/vsd_weight_factor", w.mean(), on_step=True)
        weights = {"l2": lc.l2_weight, "lpips": lc.lpips_weight, "vsd": lc.vsd_weight}
        terms["total"] = sum(weights[k] * v for k, v in terms.items())
        return terms, x_h, z_h

    def reencode(self, x_h: torch.Tensor) -> torch.Tensor:
        """Image-space VSD: the pretrained VAE encoder's latent of x_H in [-1, 1] (the generator's
        encoder LoRA disabled), with gradients flowing back through the decoder to the generator."""
        vae = self.generator.vae
        with adapters_disabled(vae):
            return vae.encode(x_h.to(vae.dtype)).latent_dist.mode() * self.generator.scaling_factor

    def regularizer_loss(
        self, z_h: torch.Tensor, embeds: torch.Tensor, t: torch.Tensor | None = None, noise: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Diffusion loss of the fake-score UNet on detached generator latents at timesteps ``t`` with
        ``noise`` (drawn when not given)."""
        lc = self.loss_cfg
        z0 = z_h.detach()
        t = sample_timesteps(z0.shape[0], lc.reg_t_min, lc.reg_t_max, z0.device) if t is None else t.to(z0.device)
        noise = torch.randn_like(z0) if noise is None else noise
        z_t = add_noise(z0, noise, t, self.alphas_cumprod)
        return diffusion_loss(self.fake_eps(z_t, t, embeds.detach()), noise)

    # ---- optimisation -------------------------------------------------------------------------
    def attached_trainer(self) -> pl.Trainer | None:
        """The trainer this module runs under, or None (the memory predictor and benchmarks run it bare)."""
        try:
            return self.trainer
        except RuntimeError:  # Lightning: "... is not attached to a `Trainer`"
            return None

    def _ddp_no_sync(self):
        """Keep DDP's reducer out of our backward passes: each optimiser syncs its own grads instead."""
        trainer = self.attached_trainer()
        model = trainer.strategy.model if trainer is not None else None
        return model.no_sync() if isinstance(model, DistributedDataParallel) else contextlib.nullcontext()

    def _step(self, name: str, opt, loss: torch.Tensor, params: list[nn.Parameter], terms: dict[str, torch.Tensor]) -> bool:
        """Backward, average over ranks, clip, step; a step whose gradients are not finite is skipped and counted.

        Without a loss scaler the skip is decided in ``on_before_optimizer_step`` by one fused check (the
        clipping norm). Under fp16 the GradScaler decides: it unscales, finds the overflow, skips the step
        and halves the scale, so the next step can succeed. A non-finite loss poisons the gradients, so
        every rank (after the all-reduce) takes the same decision and none waits on the others.
        """
        opt.zero_grad(set_to_none=True)
        with self._ddp_no_sync():
            self.backward_loss(loss)
        poison_if_nonfinite(loss, params)
        if name != "regularizer" or self.optim_cfg.sync_regularizer_grads:
            average_gradients(params)
        scaler = self.grad_scaler()
        scale_before = scaler.get_scale() if scaler is not None else None
        raw = getattr(opt, "optimizer", opt)  # Lightning wraps each optimiser; the bare step gets plain ones
        self._skipped.discard(id(raw))
        if name == "generator" and self.attached_trainer() is not None:
            opt.step()  # through Lightning: its precision plugin steps the scaler, and global_step counts it
        else:
            self.uncounted_step(raw)
        skipped = scaler.get_scale() < scale_before if scaler is not None else id(raw) in self._skipped
        if not skipped:
            return True
        bad = [k for k, v in terms.items() if not torch.isfinite(v)] or ["gradient"]
        self._bad_steps += 1
        log.warning("step %d: non-finite %s in the %s step; optimiser step skipped", self.batches_trained, ", ".join(bad), name)
        opt.zero_grad(set_to_none=True)
        limit = self.optim_cfg.max_consecutive_bad_steps
        if self._bad_steps >= limit:
            raise NonFiniteLossError(
                f"{self._bad_steps} consecutive non-finite steps (last: {name}, {', '.join(bad)}) at step "
                f"{self.batches_trained}; the last good checkpoint is kept. Lower the learning rate or raise "
                "optim.max_consecutive_bad_steps"
            )
        return False

    def backward_loss(self, loss: torch.Tensor) -> None:
        """Lightning's backward (loss scaling, strategy hooks) under a trainer, plain autograd without one."""
        if self.attached_trainer() is not None:
            self.manual_backward(loss)
        else:
            loss.backward()

    def uncounted_step(self, optimizer: torch.optim.Optimizer) -> None:
        """An optimiser step that Lightning does not count, so ``global_step`` counts generator steps whatever
        ``loss.reg_steps_per_gen_step``: what Lightning's precision plugin does for a step (unscale, clip,
        step, update the scale), with torch's public GradScaler API."""
        scaler = self.grad_scaler()
        if scaler is None:
            self.on_before_optimizer_step(optimizer)
            optimizer.step()
            return
        scaler.unscale_(optimizer)
        self.on_before_optimizer_step(optimizer)
        scaler.step(optimizer)  # skips the update when unscale_ found an inf or NaN
        scaler.update()

    def grad_scaler(self) -> torch.amp.GradScaler | None:
        """The fp16 loss scaler of the trainer's precision plugin (None for fp32/bf16 or without a trainer)."""
        trainer = self.attached_trainer()
        scaler = getattr(trainer.precision_plugin, "scaler", None) if trainer is not None else None
        return scaler if scaler is not None and scaler.is_enabled() else None

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        """Clip after AMP unscaling (Lightning calls this between unscale and step) and record the norm.

        The norm doubles as the fused finiteness check: it is finite exactly when every gradient is. Without
        a scaler a non-finite norm drops the gradients, so the optimiser leaves every parameter (and its
        moments) untouched; under fp16 the scaler has already seen the overflow and skips the step itself.
        """
        params = [p for g in optimizer.param_groups for p in g["params"]]
        clip = self.optim_cfg.grad_clip
        norm = torch.nn.utils.clip_grad_norm_(params, clip if clip and clip > 0 else math.inf)
        self._grad_norms[id(optimizer)] = norm.detach()
        if self.grad_scaler() is None and self.check_finite and not bool(torch.isfinite(norm)):
            for p in params:
                p.grad = None
            self._skipped.add(id(optimizer))

    def train_step(
        self, batch: dict[str, Any], optimizers: tuple, schedulers: tuple = (), prompts: list[str] | None = None
    ) -> dict[str, Any]:
        """The training step (used by Lightning, the memory predictor and the benchmarks alike): one generator
        update, then ``loss.reg_steps_per_gen_step`` regularizer updates on its detached latents. ``batch`` has
        ``hq`` and ``lq_up`` in [-1, 1]; ``prompts`` default to the prompt provider's. Returns the step's
        metrics (``train/*``)."""
        opt_g, opt_r = optimizers
        embeds = self.encode_text(self.batch_prompts(batch) if prompts is None else prompts)

        terms, _, z_h = self.generator_losses(batch, embeds)
        ok_g = self._step("generator", opt_g, terms["total"], self.gen_params, terms)

        reg_losses, reg_skipped = [], 0
        for _ in range(self.loss_cfg.reg_steps_per_gen_step):
            loss_r = self.regularizer_loss(z_h, embeds)
            reg_skipped += not self._step("regularizer", opt_r, loss_r, self.reg_params, {"reg": loss_r})
            reg_losses.append(loss_r.detach())
        if ok_g and not reg_skipped:
            self._bad_steps = 0
        for scheduler in schedulers:
            scheduler.step()

        logs = {f"train/loss_{k}": v.detach() for k, v in terms.items()}
        logs["train/loss_reg"] = torch.stack(reg_losses).mean()
        logs |= {"train/skipped_generator": float(not ok_g), "train/skipped_regularizer": float(reg_skipped)}
        logs["train/lr_generator"] = opt_g.param_groups[0]["lr"]
        logs["train/lr_regularizer"] = opt_r.param_groups[0]["lr"]
        scaler = self.grad_scaler()
        if scaler is not None:
            logs["train/loss_scale"] = scaler.get_scale()
        for name, opt in (("generator", opt_g), ("regularizer", opt_r)):
            norm = self._grad_norms.get(id(getattr(opt, "optimizer", opt)))
            if norm is not None:
                logs[f"train/grad_norm_{name}"] = norm
        self.batches_trained += 1
        return logs

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        step = self.batches_trained  # the x-axis of step logs: training batches done before this one
        logs = self.train_step(batch, self.optimizers(), self.lr_schedulers())
        self.log_dict(logs, on_step=True, prog_bar=False, logger=False)
        self.log("loss", logs["train/loss_total"], prog_bar=True, on_step=True, logger=False)
        self._write_step_metrics(logs, step)
        return logs["train/loss_total"]

    def _write_step_metrics(self, logs: dict[str, Any], step: int) -> None:
        """Send this step's training metrics to the logger now, not after the batch as Lightning does:
        a checkpoint is written in between, so a kill right after it would lose the step's row."""
        logger = self.logger
        if logger is None or self.trainer.sanity_checking:
            return
        if (step + 1) % self.trainer.log_every_n_steps:
            return
        if self.trainer.is_global_zero:
            logger.log_metrics({k: float(v) for k, v in logs.items()}, step=step)

    def build_optimizers(self) -> tuple[torch.optim.Optimizer, torch.optim.Optimizer]:
        """The generator's and the regularizer's AdamW (bitsandbytes' AdamW8bit with ``optim.use_8bit``)."""
        oc = self.optim_cfg
        if oc.use_8bit:
            import bitsandbytes as bnb

            cls = bnb.optim.AdamW8bit
        else:
            cls = torch.optim.AdamW
        with warnings.catch_warnings():  # optim.conv_in_lora_twice lists tensors twice on purpose
            warnings.filterwarnings("ignore", message="optimizer contains a parameter group with duplicate parameters")
            opt_g, opt_r = (
                cls(params, lr=lr, betas=tuple(oc.betas), weight_decay=oc.weight_decay, eps=oc.eps)
                for params, lr in ((self.gen_params, oc.lr), (self.reg_params, oc.reg_lr))
            )
        return opt_g, opt_r

    def configure_optimizers(self):
        oc = self.optim_cfg
        optimizers = list(self.build_optimizers())
        steps = max(1, self.trainer.max_steps)
        schedulers = [get_scheduler(oc.scheduler, opt, num_warmup_steps=oc.warmup_steps, num_training_steps=steps) for opt in optimizers]
        return optimizers, schedulers

    # ---- validation (osediff_lab.lit.validation) ------------------------------------------------
    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        """Scores the batch; returns the SR images in [0, 1] that were scored (for callbacks)."""
        return self.validator.step(self, batch)

    def on_validation_epoch_end(self) -> None:
        self.validator.epoch_end(self)

    # ---- checkpoints --------------------------------------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Keep only trained tensors (LoRA sets, conv_in): megabytes, not gigabytes."""
        keep = set(self.trained_names)
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k in keep}
        checkpoint["osediff"] = {"trained_names": self.trained_names, "lora_targets": self.lora_targets,
                                 "batches_trained": self.batches_trained}
        if hasattr(self.degradation, "state_dict"):  # every rank's random stream continues exactly after a resume
            checkpoint["degradation"] = {"ranks": gather_objects(self.degradation.state_dict())}

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Refuse a checkpoint that does not hold exactly this model's trained tensors."""
        if "degradation" in checkpoint and hasattr(self.degradation, "load_state_dict"):
            state = own_rank_state(checkpoint["degradation"], "degradation")
            if state is not None:
                self.degradation.load_state_dict(state)
        have = set(checkpoint["state_dict"])
        want = set(self.trained_names)
        missing, unexpected = sorted(want - have), sorted(have - want)
        if missing or unexpected:
            raise RuntimeError(
                f"checkpoint does not match this model: {len(missing)} missing (e.g. {missing[:3]}), "
                f"{len(unexpected)} unexpected (e.g. {unexpected[:3]}); was it trained with another model/generator config?"
            )
        params = dict(self.named_parameters())
        wrong = [k for k in sorted(want) if tuple(checkpoint["state_dict"][k].shape) != tuple(params[k].shape)]
        if wrong:
            saved = ((checkpoint.get("hyper_parameters") or {}).get("config") or {}).get("generator", {}).get("lora", {})
            ranks = ", ".join(f"{k}={saved.get(k)} (now {self.cfg.generator.lora[k]})" for k in RANK_KEYS if k in saved)
            raise RuntimeError(
                f"checkpoint was trained with other LoRA ranks: {len(wrong)} tensors differ in shape (e.g. {wrong[0]}: "
                f"{tuple(checkpoint['state_dict'][wrong[0]].shape)} saved, {tuple(params[wrong[0]].shape)} now); "
                f"its generator.lora: {ranks or 'unknown'}. Set the same ranks, or resume=false to start over"
            )
        self.batches_trained = int(checkpoint.get("osediff", {}).get("batches_trained", checkpoint.get("global_step", 0)))

    def trained_state_dict(self) -> dict[str, torch.Tensor]:
        """The tensors a checkpoint stores, by their module names."""
        params = dict(self.named_parameters())
        return {n: params[n] for n in self.trained_names}

    def regularizer_state_dict(self) -> dict[str, torch.Tensor]:
        """Trained regularizer (fake score) LoRA tensors keyed relative to its UNet: study and warm starts
        (``generator.lora.reg_init_from``)."""
        return self._trained_under("reg_unet.")

    def generator_state_dict(self) -> dict[str, torch.Tensor]:
        """Trained generator tensors keyed relative to the generator (``unet.*``, ``vae.*``): the LoRA export."""
        return self._trained_under("generator.")

    def _trained_under(self, prefix: str) -> dict[str, torch.Tensor]:
        return {n[len(prefix):]: p for n, p in self.trained_state_dict().items() if n.startswith(prefix)}

    def inference_pipeline(self) -> OSEDiffPipeline:
        """The inference pipeline over the live model (``infer``'s size rule, colour fix and prompts),
        shared by validation and the sample grids, so both show what the exported weights will do."""
        if self._pipeline is None:
            options = (self.cfg.get("val") or {}).get("pipeline")
            self._pipeline = OSEDiffPipeline(
                self.generator, self.tokenizer, self.text_encoder, self.prompts, self.cfg.scale, options, live=True
            )
        return self._pipeline
