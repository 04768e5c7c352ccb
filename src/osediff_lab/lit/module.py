"""SRModule: the training loop for any one-step SR method (``osediff_lab.methods``), manual optimisation.

Per batch: degrade on device, prompts to text embeddings, the method's generator losses and step, then the
method's further updates (OSEDiff: its regularizer). Here live only the loop's concerns: backward, DDP sync,
clipping, fp16 loss scaling and non-finite skips, logging, validation; the optimisers and gradient checks are
functions in ``lit/optimization.py``, what a checkpoint holds in ``lit/contents.py``.
"""

from __future__ import annotations

import contextlib
from typing import Any

import pytorch_lightning as pl
import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from osediff_lab.data.degradation import Degradation
from osediff_lab.data.resize import upsample_input
from osediff_lab.dtypes import DTYPES
from osediff_lab.lit.contents import check_contents, keep_saved
from osediff_lab.lit.distributed import average_gradients, gather_objects, own_rank_state
from osediff_lab.lit.optimization import (
    SkipCounter,
    build_optimizers,
    build_schedulers,
    clip_gradients,
    poison_if_nonfinite,
)
from osediff_lab.lit.validation import build_validator
from osediff_lab.methods.base import GENERATOR, REGULARIZER, Method
from osediff_lab.models.backbone import TextEmbeds
from osediff_lab.models.osediff import cast_frozen, trainable_parameters
from osediff_lab.models.text import PromptEmbedder, TextEncoders
from osediff_lab.pipeline import OSEDiffPipeline
from osediff_lab.prompts import PromptProvider


class SRModule(pl.LightningModule):
    """Trains ``method``. Batches carry ``hq`` in [-1, 1]; ``lq`` is made on device if absent."""

    def __init__(
        self,
        method: Method,
        text_encoders: TextEncoders,
        embedder: PromptEmbedder,
        prompts: PromptProvider,
        degradation: Degradation,
        cfg: DictConfig,
    ) -> None:
        super().__init__()
        self.cfg = cfg
        self.optim_cfg = cfg.optim
        self.automatic_optimization = False
        self.strict_loading = False
        self.text_encoders = text_encoders
        self.method = method
        self.prompts = prompts
        self.degradation = degradation
        frozen_dtype = DTYPES[cfg.generator.frozen_dtype]
        if frozen_dtype != torch.float32:
            cast_frozen(self.text_encoders, frozen_dtype)
        self.groups = method.param_groups()
        if next(iter(self.groups)) != GENERATOR:
            raise ValueError(f"{type(method).__name__}.param_groups() must list '{GENERATOR}' first, got {list(self.groups)}")
        self.trained_names = [n for n, _ in trainable_parameters(self)]
        trained = set(self.trained_names)
        exported = [f"method.generator.{k}" for k in method.export_state_dict()]
        # what a checkpoint stores: the trained tensors and the exported ones (PiSA-SR's frozen pixel LoRA)
        self.saved_names = self.trained_names + [n for n in exported if n not in trained]
        self.embedder = embedder
        self.skips = SkipCounter(int(cfg.optim.max_consecutive_bad_steps))
        self.batches_trained = 0  # training batches done (also skipped ones): the step axis of the logs
        self.unreadable: dict[str, str] = {}  # training images data workers found unreadable (path -> reason)
        self._grad_norms: dict[int, torch.Tensor] = {}
        self._unit_scaler: torch.amp.GradScaler | None = None  # fp32/bf16's (step_scaler)
        self.save_hyperparameters({"config": OmegaConf.to_container(cfg, resolve=True)})
        self._pipeline: OSEDiffPipeline | None = None
        self.validator = build_validator(cfg)  # metric networks kept outside the module's state

    @property
    def generator(self) -> nn.Module:
        """The method's generator: what inference, validation and the sample grids run."""
        return self.method.generator

    @property
    def lora_targets(self) -> dict[str, list[str]]:
        return self.method.lora_targets

    def train(self, mode: bool = True) -> SRModule:
        """Frozen feature extractors stay in eval mode (LPIPS has dropout) whatever Lightning asks."""
        super().train(mode)
        self.text_encoders.eval()
        self.method.frozen_eval()
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

    def encode_text(self, prompts: list[str]) -> TextEmbeds:
        """Text embeddings per prompt on this module's device (cached by string)."""
        return self.embedder(prompts)

    def batch_prompts(self, batch: dict[str, Any]) -> list[str]:
        """Prompts for the batch: from the LQ image or, when prompt.source=hq, the HQ image (public release)."""
        lq01 = (batch["lq_up"] + 1) / 2
        hq01 = (batch["hq"] + 1) / 2
        source = (self.cfg.get("prompt") or {}).get("source", "lq")
        if source == "hq":  # the HQ crop comes from a file: cached prompts are keyed by that file's content
            return self.prompts(hq01, hq01, paths=batch.get("path"))
        return self.prompts(lq01, hq01)

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

    def _step(self, name: str, opt, loss: torch.Tensor, params: list[nn.Parameter]) -> torch.Tensor:
        """Backward, average over ranks, then the optimiser step (``optimizer_update``). Returns 1.0 (on the
        device, never read here) when the step was skipped for a non-finite loss or gradient. A non-finite
        loss poisons the gradients, so every rank (after the all-reduce) skips alike and none waits on the others."""
        opt.zero_grad(set_to_none=True)
        with self._ddp_no_sync():
            self.backward_loss(loss)
        poison_if_nonfinite(loss, params)
        if name != REGULARIZER or self.optim_cfg.sync_regularizer_grads:
            average_gradients(params)
        raw = getattr(opt, "optimizer", opt)  # Lightning wraps each optimiser; the bare step gets plain ones
        if name == GENERATOR and self.attached_trainer() is not None:
            opt.step()  # through Lightning, which counts it in global_step; its precision plugin calls optimizer_update
        else:
            self.optimizer_update(raw)
        return (~torch.isfinite(self._grad_norms[id(raw)])).float()  # the norm is finite iff every gradient is

    def backward_loss(self, loss: torch.Tensor) -> None:
        """Lightning's backward (loss scaling, strategy hooks) under a trainer, plain autograd without one."""
        if self.attached_trainer() is not None:
            self.manual_backward(loss)
        else:
            loss.backward()

    def optimizer_update(self, optimizer: torch.optim.Optimizer) -> None:
        """One optimiser step, the same for every precision and with or without a trainer: unscale with torch's
        fused non-finite check over all gradients, the callbacks' ``on_before_optimizer_step``, clipping to
        ``optim.grad_clip`` (the norm is kept for logging), then the step, which fused AdamW skips on the device
        when a gradient is not finite (other optimisers make the GradScaler read the flag: one host sync)."""
        scaler = self.step_scaler(optimizer.param_groups[0]["params"][0].device)
        scaler.unscale_(optimizer)
        trainer = self.attached_trainer()
        for callback in trainer.callbacks if trainer is not None else []:  # Lightning's hook order: callbacks, module
            callback.on_before_optimizer_step(trainer, self, optimizer)
        self.on_before_optimizer_step(optimizer)
        self._grad_norms[id(optimizer)] = clip_gradients(optimizer, self.optim_cfg.grad_clip).detach()
        scaler.step(optimizer)
        scaler.update(new_scale=1.0 if scaler is self._unit_scaler else None)

    def grad_scaler(self) -> torch.amp.GradScaler | None:
        """The fp16 loss scaler of the trainer's precision plugin (None for fp32/bf16 or without a trainer)."""
        trainer = self.attached_trainer()
        scaler = getattr(trainer.precision_plugin, "scaler", None) if trainer is not None else None
        return scaler if scaler is not None and scaler.is_enabled() else None

    def step_scaler(self, device: torch.device) -> torch.amp.GradScaler:
        """The GradScaler every optimiser step goes through: fp16's, else one held at scale 1, which gives
        fp32 and bf16 the same fused finiteness check and on-device skip (scaling by 1 changes nothing)."""
        scaler = self.grad_scaler()
        if scaler is not None:
            return scaler
        if self._unit_scaler is None:
            self._unit_scaler = torch.amp.GradScaler(device.type, init_scale=1.0)
            self._unit_scaler.scale(torch.ones((), device=device))  # creates its scale tensor on the device
        return self._unit_scaler

    def train_step(
        self, batch: dict[str, Any], optimizers: dict[str, Any], schedulers: tuple = (), prompts: list[str] | None = None
    ) -> dict[str, Any]:
        """The training step (used by Lightning, the memory predictor and the benchmarks alike): the method's
        generator update, then each of its further updates (OSEDiff: ``loss.reg_steps_per_gen_step``
        regularizer steps). ``batch`` has ``hq`` and ``lq_up`` in [-1, 1]; ``optimizers`` are by parameter
        group; ``prompts`` default to the prompt provider's. Returns the step's metrics (``train/*``) as
        tensors: nothing here reads a value back from the device (``report_skips`` does, at log steps)."""
        embeds = self.encode_text(self.batch_prompts(batch) if prompts is None else prompts)

        terms, state = self.method.generator_losses(batch, embeds)
        skipped = {GENERATOR: self._step(GENERATOR, optimizers[GENERATOR], terms["total"], self.groups[GENERATOR])}
        losses: dict[str, list[torch.Tensor]] = {}
        for group, loss in self.method.updates(state, embeds):
            flag = self._step(group, optimizers[group], loss, self.groups[group])
            skipped[group] = skipped[group] + flag if group in skipped else flag
            losses.setdefault(group, []).append(loss.detach())
        self.skips.add(self.batches_trained, skipped, {GENERATOR: terms} | {g: {g: torch.stack(v)} for g, v in losses.items()})
        for scheduler in schedulers:
            scheduler.step()

        logs = {f"train/loss_{k}": v.detach() for k, v in terms.items()}
        logs |= {f"train/loss_{group}": torch.stack(values).mean() for group, values in losses.items()}
        logs |= {f"train/{k}": v for k, v in self.method.metrics.items()}
        zero = torch.zeros_like(skipped[GENERATOR])
        for name, opt in optimizers.items():
            logs[f"train/skipped_{name}"] = skipped.get(name, zero)
            logs[f"train/lr_{name}"] = opt.param_groups[0]["lr"]
            norm = self._grad_norms.get(id(getattr(opt, "optimizer", opt)))
            if norm is not None:
                logs[f"train/grad_norm_{name}"] = norm
        self.batches_trained += 1
        return logs

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> dict[str, Any]:
        """Lightning's step: ``train_step`` with the trainer's optimisers. Returns the step's metrics (still on
        the device) with ``loss``: callbacks get them as ``outputs``; ``trainer.callback_metrics`` would read
        the progress bar's values back on every access."""
        step = self.batches_trained  # the x-axis of step logs: training batches done before this one
        optimizers, schedulers = self.optimizers(), self.lr_schedulers()
        optimizers = optimizers if isinstance(optimizers, list) else [optimizers]
        schedulers = schedulers if isinstance(schedulers, list) else [schedulers]
        logs = self.train_step(batch, dict(zip(self.groups, optimizers, strict=True)), schedulers)
        self.log_dict(logs, on_step=True, prog_bar=False, logger=False)
        self.log("loss", logs["train/loss_total"], prog_bar=True, on_step=True, logger=False)
        if (step + 1) % self.trainer.log_every_n_steps == 0:  # the step's only host reads are here
            self.skips.report(step)
            self._write_step_metrics(logs, step)
        return {"loss": logs["train/loss_total"], **logs}

    def on_train_end(self) -> None:
        """Skips after the last log step are reported too."""
        self.skips.report(self.batches_trained - 1)

    def _write_step_metrics(self, logs: dict[str, Any], step: int) -> None:
        """Send this step's training metrics (and fp16's loss scale) to the logger now, not after the batch as
        Lightning does: a checkpoint is written in between, so a kill right after it would lose the step's row."""
        logger = self.logger
        if logger is None or self.trainer.sanity_checking or not self.trainer.is_global_zero:
            return
        scaler = self.grad_scaler()
        scale = {"train/loss_scale": scaler.get_scale()} if scaler is not None else {}
        logger.log_metrics({k: float(v) for k, v in logs.items()} | scale, step=step)

    def build_optimizers(self) -> dict[str, torch.optim.Optimizer]:
        """One AdamW per parameter group (bitsandbytes' AdamW8bit with ``optim.use_8bit``): the generator at
        ``optim.lr``, the regularizer at ``optim.reg_lr``."""
        oc = self.optim_cfg
        return build_optimizers(self.groups, {GENERATOR: oc.lr, REGULARIZER: oc.reg_lr}, tuple(oc.betas),
                                oc.weight_decay, oc.eps, oc.use_8bit, oc.fused)

    def configure_optimizers(self):
        optimizers = list(self.build_optimizers().values())
        oc = self.optim_cfg
        return optimizers, build_schedulers(optimizers, oc.scheduler, oc.warmup_steps, self.trainer.max_steps)

    # ---- validation (osediff_lab.lit.validation) ------------------------------------------------
    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        """Scores the batch; returns the SR images in [0, 1] that were scored (for callbacks)."""
        return self.validator.step(self, batch)

    def on_validation_epoch_end(self) -> None:
        self.validator.epoch_end(self)

    # ---- checkpoints --------------------------------------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Keep only trained tensors (LoRA sets, conv_in): megabytes, not gigabytes."""
        checkpoint["state_dict"] = keep_saved(checkpoint["state_dict"], self.saved_names)
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
        check_contents(checkpoint, self.saved_names, dict(self.named_parameters()), self.cfg.generator.lora)
        self.batches_trained = int(checkpoint.get("osediff", {}).get("batches_trained", checkpoint.get("global_step", 0)))

    def trained_state_dict(self) -> dict[str, torch.Tensor]:
        """The tensors a checkpoint stores, by their module names."""
        params = dict(self.named_parameters())
        return {n: params[n] for n in self.saved_names}

    def generator_state_dict(self) -> dict[str, torch.Tensor]:
        """The generator tensors of the LoRA export, keyed relative to the generator (``unet.*``, ``vae.*``)."""
        return self.method.export_state_dict()

    def inference_pipeline(self) -> OSEDiffPipeline:
        """The inference pipeline over the live model (``infer``'s size rule, colour fix and prompts),
        shared by validation and the sample grids, so both show what the exported weights will do."""
        if self._pipeline is None:
            options = (self.cfg.get("val") or {}).get("pipeline")
            self._pipeline = OSEDiffPipeline(
                self.generator, self.text_encoders, self.prompts, self.cfg.scale, options, live=True
            )
        return self._pipeline
