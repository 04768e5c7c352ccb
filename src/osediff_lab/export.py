"""LoRA-only inference weights: a safetensors file of the generator's trained tensors + a JSON sidecar."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from omegaconf import DictConfig, OmegaConf
from safetensors.torch import save_file

from osediff_lab.io import atomic_write, atomic_write_text


def config_hash(cfg: DictConfig) -> str:
    """sha256 of the resolved config (hydra section excluded), to tie weights to the run that made them."""
    text = OmegaConf.to_yaml(cfg, resolve=False, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()


def lora_sidecar(cfg: DictConfig, targets: dict[str, list[str]]) -> dict:
    """What a loader needs besides the tensors: base model, ranks, targets, prompt mode, scale, timestep."""
    gen = cfg.generator
    prompt = cfg.get("prompt")
    return {
        "format": "osediff-lab-lora/1",
        "base_model": {"name": cfg.model.name, "pretrained_path": cfg.model.get("pretrained_path")},
        "model_arch": OmegaConf.to_container(cfg.model, resolve=True),
        "lora": OmegaConf.to_container(gen.lora, resolve=True),
        "target_modules": {k: v for k, v in targets.items() if not k.startswith("reg_unet")},
        "timestep": gen.timestep,
        "train_vae_encoder": gen.train_vae_encoder,
        "train_vae_decoder": gen.train_vae_decoder,
        "prompt": OmegaConf.to_container(prompt, resolve=True) if prompt is not None else {"name": "null"},
        "scale": cfg.scale,
        "config_hash": config_hash(cfg),
    }


def export_lora(generator_state: dict, cfg: DictConfig, targets: dict[str, list[str]], path: str | Path) -> tuple[Path, Path]:
    """Write ``path`` (safetensors, keys relative to the generator: ``unet.*``, ``vae.*``) and ``path``.json."""
    path = Path(path)
    tensors = {k: v.detach().float().cpu().contiguous() for k, v in generator_state.items()}
    atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata={"format": "osediff-lab-lora/1"}))
    sidecar = path.with_suffix(".json")
    atomic_write_text(sidecar, json.dumps(lora_sidecar(cfg, targets), indent=2))
    return path, sidecar
