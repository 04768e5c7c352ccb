"""Reject configurations that cannot work, before any model is built or data is read."""

from __future__ import annotations

import importlib.util
from pathlib import Path

from diffusers.optimization import SchedulerType
from omegaconf import DictConfig

from osediff_lab.build import component_problems, target
from osediff_lab.data.datamodule import data_problems
from osediff_lab.dtypes import DTYPES
from osediff_lab.errors import ConfigError, MissingWeightsError
from osediff_lab.lit.loggers import OFFERED as LOGGER_OFFERED
from osediff_lab.lit.precision import PRECISIONS, precision_name
from osediff_lab.models.components import CALLER_SETTINGS as MODEL_CALLER_SETTINGS
from osediff_lab.models.frozen import FROZEN_DTYPES
from osediff_lab.models.perceptual import BACKBONE_FILES, check_lpips_weights
from osediff_lab.prompts import CALLER_SETTINGS

MIXED = ("16-mixed", "bf16-mixed", "16", "bf16")
UPSAMPLE_MODES = ("area", "bilinear", "bicubic")
REG_LAYOUTS = ("single", "release_only_others_trains")


def config_problems(cfg: DictConfig) -> list[str]:
    """Every problem found, each naming the config key (empty when the config can run)."""
    problems: list[str] = []
    loss, gen, data = cfg.loss, cfg.generator, cfg.data
    problems += [f"loss.{key} moved into the method: set {new}" for key, new in MOVED_LOSS_KEYS.items()
                 if loss.get(key) is not None]
    if loss.get("moved_to_method"):  # loss=no_vsd / loss=vsd_image
        problems.append(f"the loss variants are method options now: set method={loss.moved_to_method} "
                        "(and leave loss at its default)")
    if gen.latent not in ("mode", "sample"):
        problems.append(f"generator.latent='{gen.latent}' must be 'mode' or 'sample'")
    if gen.frozen_dtype not in FROZEN_DTYPES:
        problems.append(f"generator.frozen_dtype='{gen.frozen_dtype}' must be one of {sorted(FROZEN_DTYPES)}")
    elif gen.frozen_dtype != "fp32" and str(cfg.trainer.precision) not in MIXED:
        problems.append(
            f"generator.frozen_dtype={gen.frozen_dtype} needs a mixed trainer precision (trainer.precision=bf16-mixed "
            f"or 16-mixed), got trainer.precision={cfg.trainer.precision}"
        )
    if precision_name(cfg.trainer.precision) not in PRECISIONS:
        problems.append(f"trainer.precision={cfg.trainer.precision} must be one of {', '.join(PRECISIONS)}")
    for key in ("unet_rank", "vae_rank", "reg_rank"):
        if gen.lora[key] < 1:
            problems.append(f"generator.lora.{key}={gen.lora[key]} must be >= 1")
    multiple = cfg.scale * 8
    if data.crop_size % multiple:
        problems.append(f"data.crop_size={data.crop_size} must be a multiple of scale x 8 = {multiple}")
    if data.batch_size < 1:
        problems.append(f"data.batch_size={data.batch_size} must be >= 1")
    problems.extend(component_problems(cfg.model, "model", skip=MODEL_CALLER_SETTINGS, given={"name": cfg.model.name}))
    if cfg.method.get("lpips_weight", 0) > 0:
        if loss.lpips.net not in BACKBONE_FILES:
            problems.append(f"loss.lpips.net='{loss.lpips.net}' must be one of {sorted(BACKBONE_FILES)}")
        elif loss.lpips.pretrained:
            try:
                check_lpips_weights(loss.lpips.net, cfg.paths.weights_dir)
            except MissingWeightsError as exc:
                problems.append(str(exc))
    if loss.lpips.get("dtype", "fp32") not in DTYPES:
        problems.append(f"loss.lpips.dtype='{loss.lpips.dtype}' must be one of {sorted(DTYPES)}")
    if cfg.optim.use_8bit and importlib.util.find_spec("bitsandbytes") is None:
        problems.append("optim.use_8bit=true needs bitsandbytes: pip install 'osediff-lab[perf]' (or set optim.use_8bit=false)")
    problems.extend(component_problems(cfg.degradation, "degradation", given={"scale": cfg.scale}))
    if cfg.degradation.get("name") == "none":
        problems.append(
            "degradation=none needs training batches that carry their LQ, and every data group gives HQ crops "
            "only; choose degradation=realesrgan or degradation=bicubic"
        )
    problems.extend(method_problems(cfg.method))
    problems.extend(release_switch_problems(gen))
    problems.extend(optim_problems(cfg.optim, cfg.method))
    problems.extend(step_problems(cfg.trainer))
    problems.extend(shard_problems(cfg))
    problems.extend(data_problems(cfg))
    if cfg.get("prompt") is not None:
        problems.extend(component_problems(cfg.prompt, "prompt", skip=CALLER_SETTINGS))
    if cfg.get("logger") is not None:
        problems.extend(component_problems(cfg.logger, "logger", offer=dict.fromkeys(LOGGER_OFFERED)))
    return problems


def method_problems(method: DictConfig) -> list[str]:
    """The method's own checks of its ``method.*`` arguments (``Method.argument_problems``)."""
    try:
        cls = target(method, "method")
    except ConfigError as exc:
        return [str(exc)]
    return cls.argument_problems(method)


def release_switch_problems(gen: DictConfig) -> list[str]:
    """The generator's input and regularizer-LoRA switches (the public release's recipe sets them)."""
    problems = []
    modes = list(gen.input_upsample_modes)
    if not modes or any(m not in UPSAMPLE_MODES for m in modes):
        problems.append(f"generator.input_upsample_modes={modes} must be a non-empty list of {list(UPSAMPLE_MODES)}")
    if gen.lora.reg_layout not in REG_LAYOUTS:
        problems.append(f"generator.lora.reg_layout='{gen.lora.reg_layout}' must be one of {list(REG_LAYOUTS)}")
    init = gen.lora.get("reg_init_from")
    if init and not Path(str(init)).expanduser().is_file():
        problems.append(f"generator.lora.reg_init_from={init} does not exist (a run's lora/regularizer_lora.safetensors)")
    return problems


# OSEDiff's loss values moved from the loss group (which keeps the perceptual network) into method=osediff;
# the loss variants became method options: loss=no_vsd -> method=osediff_no_vsd, loss=vsd_image -> method=osediff_vsd_image
MOVED_LOSS_KEYS = {key: f"method.{key}" for key in (
    "l2_weight", "lpips_weight", "vsd_weight", "vsd", "vsd_space", "cfg_scale", "release_score_precision",
    "vsd_t_min", "vsd_t_max", "reg_t_min", "reg_t_max", "negative_prompt")} | {
    "reg_steps_per_gen_step": "method.optim.regularizer.updates"}
MOVED_OPTIM_KEYS = {
    "lr": "method.optim.generator.lr", "reg_lr": "method.optim.regularizer.lr", "betas": "method.optim.<group>.betas",
    "weight_decay": "method.optim.<group>.weight_decay", "eps": "method.optim.<group>.eps",
    "sync_regularizer_grads": "method.optim.regularizer.sync_grads",
}


def optim_problems(optim: DictConfig, method: DictConfig) -> list[str]:
    """The loop's optimisation values torch would refuse only after the model is built, or that train nothing;
    keys that moved to the method's groups, named with their new place."""
    problems = [f"optim.{key} moved: set {new} (each parameter group has its own settings)"
                for key, new in MOVED_OPTIM_KEYS.items() if optim.get(key) is not None]
    if optim.grad_clip is not None and optim.grad_clip < 0:
        problems.append(f"optim.grad_clip={optim.grad_clip} must be >= 0 (0 or null: no clipping)")
    if optim.warmup_steps < 0:
        problems.append(f"optim.warmup_steps={optim.warmup_steps} must be >= 0")
    schedules = [s.value for s in SchedulerType]
    if optim.scheduler not in schedules:
        problems.append(f"optim.scheduler='{optim.scheduler}' must be one of {schedules}")
    accumulate = optim.get("accumulate_grad_batches", 1)
    if accumulate < 1:
        problems.append(f"optim.accumulate_grad_batches={accumulate} must be >= 1")
    repeated = [name for name, group in (method.get("optim") or {}).items() if int(group.get("updates", 1)) > 1]
    if accumulate > 1 and repeated:
        problems.append(f"optim.accumulate_grad_batches={accumulate} with method.optim.{repeated[0]}.updates > 1: a group "
                        "updated several times per generator step cannot also accumulate micro-batches; set one of them to 1")
    return problems


def step_problems(trainer: DictConfig) -> list[str]:
    """A run must have a positive number of generator steps (0 would export an untrained LoRA)."""
    steps = trainer.get("max_steps")
    if steps is None or steps < 1:
        return [f"trainer.max_steps={steps} must be >= 1: it counts the generator steps to train (0 trains nothing)"]
    return []


def shard_problems(cfg: DictConfig) -> list[str]:
    """``generator.shard_frozen_base`` needs several DDP ranks that all call the generator together, on sharded weights."""
    trainer = cfg.trainer
    if not cfg.generator.shard_frozen_base:
        return []
    key, problems = "generator.shard_frozen_base=true", []
    devices = trainer.get("devices", 1)
    if trainer.get("strategy") != "ddp" or (isinstance(devices, int) and devices * trainer.get("num_nodes", 1) < 2):
        problems.append(f"{key} needs several ranks: trainer=ddp, ddp_cpu or slurm (strategy=ddp, devices x num_nodes > 1), "
                        f"got strategy={trainer.get('strategy')}, devices={trainer.get('devices')}")
    if cfg.generator.frozen_dtype == "fp8_e4m3":
        problems.append(f"{key}: generator.frozen_dtype=fp8_e4m3 keeps its weights in buffers, which FSDP does not shard")
    if not cfg.generator.share_base:
        problems.append(f"{key} shards the generator's denoiser; with generator.share_base=false the regularizer's copy "
                        "would stay whole: set generator.share_base=true")
    if cfg.val.name != "none" or cfg.callbacks.samples.num_images > 0:
        problems.append(f"{key}: validation and sample grids call the generator on some ranks only, which would wait "
                        "forever for the others' gathers: set val=none and callbacks.samples.num_images=0")
    return problems


def validate_config(cfg: DictConfig) -> None:
    """Raise one ConfigError listing every problem, so a user fixes them all in one go."""
    problems = config_problems(cfg)
    if problems:
        raise ConfigError("this configuration cannot run:\n  - " + "\n  - ".join(problems))
