"""The LoRA file format: a safetensors file of the generator's trained tensors + a JSON sidecar, written
at the end of training or from a training checkpoint (whose state_dict holds only trained tensors and
whose hyper_parameters hold the config); read by the inference pipeline."""

from __future__ import annotations

import hashlib
import json
import os
import pickle
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from safetensors.torch import load_file, save_file
from torch import nn

from osediff_lab.errors import ConfigError, MissingWeightsError
from osediff_lab.io import atomic_write, atomic_write_text

GENERATOR_PREFIX = "method.generator."
# Plain numeric numpy arrays (Lightning's RNG-state callbacks store them): data, not code.
NUMPY_ARRAYS = [np.zeros(1).__reduce__()[0], np.ndarray, np.dtype] + [  # [0]: the function arrays unpickle with
    type(np.dtype(t)) for t in (np.bool_, np.int8, np.int16, np.int32, np.int64, np.uint8, np.uint16, np.uint32, np.uint64, np.float16, np.float32, np.float64)
]


def config_hash(cfg: DictConfig) -> str:
    """sha256 of the config with its interpolations resolved (a job's config has no ``hydra`` section), to tie
    weights to the run that made them: the end-of-training export and an export from any of the run's training
    checkpoints (which store the config resolved) carry the same hash."""
    text = OmegaConf.to_yaml(cfg, resolve=True, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()


def base_prediction_type(model: DictConfig) -> str | None:
    """What the base model's UNet predicts (epsilon, v_prediction): a random preset's scheduler arguments, or the
    pretrained folder's scheduler_config.json (None when that folder is not on this machine)."""
    if model.get("source") == "random":
        return str(model.arch.scheduler.get("prediction_type", "epsilon"))
    path = model.get("pretrained_path")
    config = Path(os.path.expanduser(str(path))) / "scheduler" / "scheduler_config.json" if path else None
    if config is None or not config.is_file():
        return None
    return str(json.loads(config.read_text()).get("prediction_type", "epsilon"))


def lora_sidecar(cfg: DictConfig, targets: dict[str, list[str]]) -> dict:
    """What a loader needs besides the tensors: base model, ranks, targets, prompt mode, scale, timestep,
    and the seed (random-init presets such as tiny rebuild their base weights from it)."""
    gen = cfg.generator
    prompt = cfg.get("prompt")
    return {
        "format": "osediff-lab-lora/1",
        "base_model": {"name": cfg.model.name, "pretrained_path": cfg.model.get("pretrained_path")},
        "model_arch": OmegaConf.to_container(cfg.model, resolve=True),
        "lora": OmegaConf.to_container(gen.lora, resolve=True),
        "target_modules": {k: v for k, v in targets.items() if not k.startswith("reg_unet")},
        "timestep": gen.timestep,
        # the LoRA only works on a base that predicts the same thing (checked when loading)
        "prediction_type": base_prediction_type(cfg.model),
        "train_vae_encoder": gen.train_vae_encoder,
        "train_vae_decoder": gen.train_vae_decoder,
        "prompt": OmegaConf.to_container(prompt, resolve=True) if prompt is not None else {"name": "none"},
        "scale": cfg.scale,
        "seed": cfg.get("seed"),
        "config_hash": config_hash(cfg),
        # the method (its _target_ and arguments): inference rebuilds a PiSA-SR generator from it; absent = OSEDiff
        "method": OmegaConf.to_container(cfg.method, resolve=True) if cfg.get("method") is not None else None,
    }


def export_lora(generator_state: dict, cfg: DictConfig, targets: dict[str, list[str]], path: str | Path,
                ema: dict | None = None) -> tuple[Path, Path]:
    """Write ``path`` (safetensors, keys relative to the generator: ``unet.*``, ``vae.*``) and ``path``.json,
    whose ``weights`` says ``live`` (the last step's) or ``ema`` (with ``ema``: its decay and updates)."""
    path = save_lora_tensors(generator_state, path, "osediff-lab-lora/1")
    sidecar = path.with_suffix(".json")
    weights = {"weights": "ema", "ema": ema} if ema is not None else {"weights": "live"}
    atomic_write_text(sidecar, json.dumps(lora_sidecar(cfg, targets) | weights, indent=2))
    return path, sidecar


def save_lora_tensors(state: dict[str, torch.Tensor], path: str | Path, kind: str) -> Path:
    """Write LoRA tensors (keys relative to their model) as safetensors, atomically, tagged with ``kind``."""
    tensors = {k: v.detach().float().cpu().contiguous() for k, v in state.items()}
    return atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata={"format": kind}))


def load_lora_tensors(model: nn.Module, path: str | Path, key: str, only: str = "") -> int:
    """Copy the tensors of a ``save_lora_tensors`` file (those whose name contains ``only``) into ``model``'s
    parameters of the same names.

    Every such tensor must name a parameter of ``model`` with the same shape (else a ConfigError naming
    ``key`` and the file); returns how many were loaded."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise ConfigError(f"{key}: {path} does not exist")
    tensors = {k: v for k, v in load_file(str(path)).items() if only in k}
    params = dict(model.named_parameters())
    unknown = sorted(k for k in tensors if k not in params)
    wrong = sorted(k for k in tensors if k in params and params[k].shape != tensors[k].shape)
    if unknown or wrong:
        raise ConfigError(
            f"{key}: {path} does not fit this model: {len(unknown)} unknown tensors (e.g. {unknown[:2]}), "
            f"{len(wrong)} of another shape (e.g. {wrong[:2]}); was it saved with other LoRA ranks or targets?"
        )
    with torch.no_grad():
        for k, v in tensors.items():
            params[k].copy_(v.to(params[k].dtype))
    return len(tensors)


def load_torch_weights(path: str | Path) -> object:
    """``torch.load`` in weights-only mode: tensors, numeric arrays, containers and plain values, never
    arbitrary objects."""
    path = Path(path)
    if not path.is_file():
        raise MissingWeightsError(f"checkpoint {path} does not exist")
    try:
        with torch.serialization.safe_globals(NUMPY_ARRAYS):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise ConfigError(
            f"{path} holds objects other than tensors and plain values, so it is not loaded (weights-only "
            f"loading refuses to unpickle code): {str(exc).splitlines()[0]}"
        ) from exc


def training_checkpoint_parts(checkpoint: dict, source: str) -> tuple[dict, DictConfig, dict[str, list[str]]]:
    """(generator tensors keyed ``unet.*``/``vae.*``, the run's config, LoRA targets) of a Lightning checkpoint."""
    try:
        cfg = OmegaConf.create(checkpoint["hyper_parameters"]["config"])
        targets = checkpoint["osediff"]["lora_targets"]
    except (KeyError, TypeError) as exc:
        raise ConfigError(
            f"{source}: not an osediff-lab training checkpoint (needs hyper_parameters['config'] and "
            f"osediff['lora_targets'], missing {exc})"
        ) from exc
    state = {k[len(GENERATOR_PREFIX):]: v for k, v in checkpoint["state_dict"].items() if k.startswith(GENERATOR_PREFIX)}
    if not state:
        raise ConfigError(f"{source}: its state_dict has no '{GENERATOR_PREFIX}*' tensors")
    return state, cfg, targets


def export_from_checkpoint(ckpt: str | Path, out: str | Path) -> tuple[Path, Path]:
    """Write the LoRA-only safetensors + sidecar for a Lightning training checkpoint (its config hash is the
    end-of-training export's)."""
    state, cfg, targets = training_checkpoint_parts(load_torch_weights(ckpt), str(ckpt))
    return export_lora(state, cfg, targets, out)
