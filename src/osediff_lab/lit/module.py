"""SRModule: the training loop for any one-step SR method, manual optimisation.

Per batch: degrade on device, prompts to text embeddings, the method's generator losses and step, then the
method's further groups (OSEDiff: its regularizer; a GAN: its discriminator). The step itself (backward,
accumulation, DDP sync, clipping, loss scaling, non-finite skips) is plain torch in ``osediff_lab.step``; here
live the Lightning plumbing, logging and validation; what a checkpoint holds is in ``lit/contents.py``. The
method comes built (``Method``, ``osediff_lab.methods.base``): this module imports no method.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable
from functools import partial
from typing import Any

import pytorch_lightning as pl
import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.nn.parallel import DistributedDataParallel

from osediff_lab.data.degradation import Degradation, degrade_pair
from osediff_lab.data.resize import upsample_input
from osediff_lab.lit.contents import check_contents, keep_saved
from osediff_lab.lit.distributed import gather_objects, own_rank_state, rank_and_world
from osediff_lab.lit.optimization import SkipCounter, build_schedulers
from osediff_lab.lit.precision import precision_name
from osediff_lab.lit.validation import build_validator
from osediff_lab.models.backbone import TextEmbeds
from osediff_lab.models.frozen import FROZEN_DTYPES
from osediff_lab.models.osediff import cast_frozen, trainable_parameters
from osediff_lab.models.sharding import frozen_units, shard_frozen_base
from osediff_lab.models.text import PromptEmbedder, TextEncoders
from osediff_lab.pipeline import SRPipeline
from osediff_lab.prompts import PromptProvider
from osediff_lab.step import GENERATOR, Stepper, build_optimizer, further_updates, unit_scaler

log = logging.getLogger(__name__)


def watched_modules(generator: nn.Module, names: list[str]) -> dict[str, list[nn.Parameter]]:
    """The trained tensors under each generator module of ``names`` (``health.grad_norm_modules``); a module
    without any is left out, with a note (it differs between backbones and methods)."""
    watched = {}
    for name in names:
        params = [p for n, p in generator.named_parameters() if n.startswith(f"{name}.") and p.requires_grad]
        if params:
            watched[name] = params
        else:
            log.info("health.grad_norm_modules: '%s' holds no trained tensor of this generator; not measured", name)
    return watched


def read_back(logs: dict[str, torch.Tensor | float]) -> dict[str, float]:
    """The step's scalar metrics as floats: the tensors read in one transfer per device, numbers as they are."""
    values = {k: float(v) for k, v in logs.items() if not torch.is_tensor(v)}
    by_device: dict[torch.device, list[str]] = {}
    for k, v in logs.items():
        if torch.is_tensor(v):
            by_device.setdefault(v.device, []).append(k)
    for names in by_device.values():
        read = torch.stack([logs[k].detach().float().reshape(()) for k in names]).tolist()
        values |= dict(zip(names, read, strict=True))
    return {k: values[k] for k in logs}


class SRModule(pl.LightningModule):
    """Trains ``method``. Batches carry ``hq`` in [-1, 1]; ``lq`` is made on device if absent."""

    def __init__(
        self,
        method: nn.Module,
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
        frozen_dtype = FROZEN_DTYPES[cfg.generator.frozen_dtype]  # fp8_e4m3: the text encoders in bf16
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
        self.accumulate = int(cfg.optim.get("accumulate_grad_batches", 1))  # micro-batches per optimiser step
        self.watched = watched_modules(method.generator, list(cfg.health.grad_norm_modules))
        self._scaler: torch.amp.GradScaler | None = None  # built at the first step (step_scaler)
        self._unit_scale = False
        self._scaler_state: dict[str, Any] | None = None  # a resumed checkpoint's loss-scaler state
        self.save_hyperparameters({"config": OmegaConf.to_container(cfg, resolve=True)})
        self._pipeline: SRPipeline | None = None
        self.histograms: dict[str, torch.Tensor] = {}  # the last step's many-valued diagnostics (optimize_batch)
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

    def configure_model(self) -> None:
        """``generator.shard_frozen_base``: the generator denoiser's frozen layers (with ``generator.share_base``, the
        whole shared base) split over the ranks by FSDP2 (``models/sharding.py``), once the process group exists."""
        if not self.cfg.generator.shard_frozen_base:
            return
        rank, world = rank_and_world()
        device = self.trainer.strategy.root_device.type
        count = shard_frozen_base(self.generator.unet, mesh=init_device_mesh(device, (world,)))
        params = [p for u in frozen_units(self.generator.unet) for p in u.parameters()]
        held = sum(p.to_local().numel() * p.element_size() for p in params)
        log.info("shard_frozen_base: rank %d of %d holds %d of %d frozen base bytes (%d layers)", rank, world, held,
                 sum(p.numel() * p.element_size() for p in params), count)

    # ---- inputs -------------------------------------------------------------------------------
    def on_after_batch_transfer(self, batch: dict[str, Any], dataloader_idx: int) -> dict[str, Any]:
        """Degrade on the training device (batched) unless the batch is already paired; add x_L except for
        validation batches (the inference pipeline upsamples those itself)."""
        for report in batch.pop("unreadable", []):  # files a data worker skipped, with the reason
            for line in filter(None, report.split("\n")):
                path, _, reason = line.partition("\t")
                self.unreadable[path] = reason
        if "lq" not in batch:
            batch["hq"], batch["lq"] = degrade_pair(self.degradation, batch["hq"])
        trainer = self.attached_trainer()
        if trainer is None or not trainer.evaluating:
            g = self.cfg.generator
            batch["lq_up"] = upsample_input(
                batch["lq"], batch["hq"].shape[-2:], list(g.input_upsample_modes), g.input_quantize_8bit,
                per_sample=g.input_upsample_per_sample,
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

    # ---- optimisation (osediff_lab.step) -------------------------------------------------------
    def attached_trainer(self) -> pl.Trainer | None:
        """The trainer this module runs under, or None (the memory predictor and benchmarks run it bare)."""
        try:
            return self.trainer
        except RuntimeError:  # Lightning: "... is not attached to a `Trainer`"
            return None

    def _ddp_no_sync(self) -> contextlib.AbstractContextManager:
        """Keep DDP's reducer out of our backward passes: each group averages its own gradients instead."""
        trainer = self.attached_trainer()
        model = trainer.strategy.model if trainer is not None else None
        return model.no_sync() if isinstance(model, DistributedDataParallel) else contextlib.nullcontext()

    def grad_scaler(self) -> torch.amp.GradScaler | None:
        """fp16's loss scaler (``optim.grad_scaler``); None for the other precisions."""
        return self._scaler if self._scaler is not None and not self._unit_scale else None

    def step_scaler(self, device: torch.device) -> torch.amp.GradScaler:
        """The GradScaler every optimiser step goes through: fp16's, else one held at scale 1, which gives fp32
        and bf16 the same fused finiteness check and on-device skip. Built on first use, on ``device``."""
        if self._scaler is None:
            if precision_name(self.cfg.trainer.get("precision", "32-true")) == "16-mixed":
                kwargs = OmegaConf.to_container(self.optim_cfg.grad_scaler, resolve=True)
                self._scaler, self._unit_scale = torch.amp.GradScaler(device.type, **kwargs), False
            else:
                self._scaler, self._unit_scale = unit_scaler(device), True
            if self._scaler_state is not None:
                self._scaler.load_state_dict(self._scaler_state)
        return self._scaler

    def stepper(self, optimizers: dict[str, torch.optim.Optimizer], measure: bool = False) -> Stepper:
        """The plain-torch step over this method's groups with ``optimizers`` (one per group); ``measure``: also
        the gradient norms of ``health.grad_norm_modules``."""
        device = next(iter(self.groups.values())).params[0].device
        return Stepper(self.groups, optimizers, self.step_scaler(device), self.optim_cfg.grad_clip,
                       self.accumulate, self._unit_scale, self._ddp_no_sync, self.watched if measure else {})

    def term_gradients(self, terms: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Each weighted loss term's gradient norm at the generator's latent z_H (``method.outputs["z_h"]``):
        which term drives the generator (``health.term_gradients``, log steps only)."""
        z_h = self.method.outputs.get("z_h")
        if z_h is None or not z_h.requires_grad:
            return {}
        norms = {}
        for name, value in terms.items():
            weight = self.method.weights.get(name, 0.0)
            if name != "total" and weight > 0 and value.requires_grad:
                (grad,) = torch.autograd.grad(value * weight, z_h, retain_graph=True, allow_unused=True)
                norms[f"train/grad_zh_{name}"] = grad.detach().float().norm() if grad is not None else torch.zeros(())
        return norms

    @property
    def between_steps(self) -> bool:
        """No micro-batch of an accumulated step is pending: a checkpoint here resumes exactly."""
        return self.batches_trained % self.accumulate == 0

    def optimize_batch(
        self,
        batch: dict[str, Any],
        optimizers: dict[str, torch.optim.Optimizer],
        schedulers: tuple = (),
        prompts: list[str] | None = None,
        count_step: Callable[[Callable[[], torch.Tensor]], torch.Tensor] | None = None,
        measure: bool = False,
    ) -> dict[str, Any]:
        """One micro-batch (used by Lightning, the memory predictor and the benchmarks alike): the method's
        generator losses and backward, then every further group's losses (``method.optim.<group>.updates``
        times each); at the last micro-batch of ``optim.accumulate_grad_batches`` each group is stepped right
        after its backward. ``batch`` has ``hq`` and ``lq_up`` in [-1, 1]; ``optimizers`` are by group;
        ``prompts`` default to the prompt provider's; ``count_step`` runs the generator's update (Lightning
        counts it); ``measure`` (log steps): the health telemetry too. Returns the metrics (``train/*``) as
        tensors: nothing here reads the device back."""
        stepper = self.stepper(optimizers, measure)
        first, last = self.batches_trained % self.accumulate == 0, (self.batches_trained + 1) % self.accumulate == 0
        embeds = self.encode_text(self.batch_prompts(batch) if prompts is None else prompts)

        terms, state = self.method.generator_losses(batch, embeds)
        health = self.term_gradients(terms) if measure and self.cfg.health.term_gradients else {}
        stepper.backward(GENERATOR, terms["total"], fresh=first)
        skipped: dict[str, torch.Tensor] = {}
        if last:
            update = partial(stepper.step, GENERATOR)
            skipped[GENERATOR] = update() if count_step is None else count_step(update)
        losses: dict[str, list[torch.Tensor]] = {}
        for group in further_updates(self.groups):
            loss = self.method.group_loss(group, state, embeds)
            stepper.backward(group, loss, fresh=first)
            if last:
                flag = stepper.step(group)
                skipped[group] = skipped[group] + flag if group in skipped else flag
            losses.setdefault(group, []).append(loss.detach())
        if last:
            self.skips.add(self.batches_trained, skipped,
                           {GENERATOR: terms} | {g: {g: torch.stack(v)} for g, v in losses.items()})
            for scheduler in schedulers:
                scheduler.step()

        logs = {f"train/loss_{k}": v.detach() for k, v in terms.items()}
        logs |= {f"train/loss_{group}": torch.stack(values).mean() for group, values in losses.items()}
        metrics = {f"train/{k}": v for k, v in self.method.metrics.items()}
        # diagnostics of many values (a discriminator's logits): histograms at log steps, W&B's (the CSV keeps scalars)
        self.histograms = {k: v for k, v in metrics.items() if torch.is_tensor(v) and v.numel() > 1}
        logs |= {k: v for k, v in metrics.items() if k not in self.histograms}
        if last:
            for name, opt in optimizers.items():
                logs[f"train/skipped_{name}"] = skipped[name]
                logs[f"train/lr_{name}"] = opt.param_groups[0]["lr"]
                logs[f"train/grad_norm_{name}"] = stepper.grad_norms[name]
            logs |= {f"train/grad_norm_{module}": norm for module, norm in stepper.module_norms.items()}
        if measure:  # a method's own log-step telemetry (OSEDiff's regularizer fit)
            health |= {f"train/{k}": v for k, v in self.method.health_metrics().items()}
        logs |= health
        self.batches_trained += 1
        return logs

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> dict[str, Any]:
        """Lightning's step: ``optimize_batch`` with the trainer's optimisers. Returns the step's metrics (still on
        the device) with ``loss``: callbacks get them as ``outputs``; ``trainer.callback_metrics`` would read
        the progress bar's values back on every access."""
        step = self.batches_trained  # the x-axis of step logs: training batches done before this one
        optimizers, schedulers = self.optimizers(), self.lr_schedulers()
        optimizers = optimizers if isinstance(optimizers, list) else [optimizers]
        schedulers = schedulers if isinstance(schedulers, list) else [schedulers]
        counted = optimizers[0]  # Lightning counts the generator's updates (global_step) through its wrapper

        def count_step(update: Callable[[], torch.Tensor]) -> torch.Tensor:
            return counted.step(closure=update)  # the precision plugin runs the closure (lit/precision.py)

        raw = {name: opt.optimizer for name, opt in zip(self.groups, optimizers, strict=True)}
        measure = (step + 1) % self.trainer.log_every_n_steps == 0
        logs = self.optimize_batch(batch, raw, schedulers, count_step=count_step, measure=measure)
        self.log_dict(logs, on_step=True, prog_bar=False, logger=False)
        self.log("loss", logs["train/loss_total"], prog_bar=True, on_step=True, logger=False)
        if (step + 1) % self.trainer.log_every_n_steps == 0:  # the step's only host reads are here
            self.skips.report(step)
            values = read_back(logs)  # one transfer; callbacks (health) get these floats in ``outputs``
            self._write_step_metrics(values, step)
            return {"loss": logs["train/loss_total"], **values}
        return {"loss": logs["train/loss_total"], **logs}

    def on_train_end(self) -> None:
        """Skips after the last log step are reported too."""
        self.skips.report(self.batches_trained - 1)

    def _write_step_metrics(self, values: dict[str, float], step: int) -> None:
        """Send this step's training metrics (and fp16's loss scale) to the logger now, not after the batch as
        Lightning does: a checkpoint is written in between, so a kill right after it would lose the step's row."""
        logger = self.logger
        if logger is None or self.trainer.sanity_checking or not self.trainer.is_global_zero:
            return
        scaler = self.grad_scaler()
        scale = {"train/loss_scale": scaler.get_scale()} if scaler is not None else {}
        logger.log_metrics(values | scale | self.histograms, step=step)

    def build_optimizers(self) -> dict[str, torch.optim.Optimizer]:
        """One optimiser per parameter group (``optim.optimizer``) with the group's own settings."""
        oc = self.optim_cfg
        spec = OmegaConf.to_container(oc.optimizer, resolve=True)
        return {name: build_optimizer(group, spec, oc.use_8bit, oc.fused) for name, group in self.groups.items()}

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
        if self.grad_scaler() is not None:  # fp16's loss scale and growth tracker
            checkpoint["loss_scaler"] = self.grad_scaler().state_dict()

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Refuse a checkpoint that does not hold exactly this model's trained tensors."""
        if "degradation" in checkpoint and hasattr(self.degradation, "load_state_dict"):
            state = own_rank_state(checkpoint["degradation"], "degradation")
            if state is not None:
                self.degradation.load_state_dict(state)
        check_contents(checkpoint, self.saved_names, dict(self.named_parameters()),
                       OmegaConf.to_container(self.cfg, resolve=True))
        self._scaler_state = checkpoint.get("loss_scaler")
        if self._scaler is not None and self._scaler_state is not None:
            self._scaler.load_state_dict(self._scaler_state)
        self.batches_trained = int(checkpoint.get("osediff", {}).get("batches_trained", checkpoint.get("global_step", 0)))

    def trained_state_dict(self) -> dict[str, torch.Tensor]:
        """The tensors a checkpoint stores, by their module names."""
        params = dict(self.named_parameters())
        return {n: params[n] for n in self.saved_names}

    def ema_tensors(self) -> dict[str, torch.Tensor]:
        """The generator's trained tensors (the live parameters), keyed as in its export: what an EMA follows."""
        return {k: p for k, p in self.method.export_state_dict().items() if p.requires_grad}

    def generator_state_dict(self) -> dict[str, torch.Tensor]:
        """The generator tensors of the LoRA export, keyed relative to the generator (``unet.*``, ``vae.*``)."""
        return self.method.export_state_dict()

    def inference_pipeline(self) -> SRPipeline:
        """The inference pipeline over the live model (``infer``'s size rule, colour fix and prompts),
        shared by validation and the sample grids, so both show what the exported weights will do."""
        if self._pipeline is None:
            options = (self.cfg.get("val") or {}).get("pipeline")
            self._pipeline = SRPipeline(
                self.generator, self.text_encoders, self.prompts, self.cfg.scale, options, live=True
            )
        return self._pipeline
