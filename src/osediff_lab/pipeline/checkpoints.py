"""Read inference weights in any supported format and rebuild the generator on its base model.

Formats: ours (LoRA-only safetensors + JSON sidecar), a Lightning training checkpoint (.ckpt), and the
official OSEDiff and PiSA-SR releases (torch-saved dicts of PEFT tensors, module-name lists and ranks).
"""

from __future__ import annotations

import json
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from hydra.utils import get_object
from omegaconf import DictConfig, OmegaConf
from safetensors.torch import load_file

from osediff_lab.errors import ConfigError, MissingWeightsError
from osediff_lab.models.components import (
    Components,
    build_components,
    frozen,
    load_pretrained,
    resolve_pretrained_path,
)
from osediff_lab.models.generator import OneStepGenerator
from osediff_lab.models.lora import add_lora
from osediff_lab.models.lora_files import load_torch_weights, lora_sidecar, training_checkpoint_parts
from osediff_lab.models.osediff import UNET_ADAPTERS
from osediff_lab.models.pisasr import PIXEL, SEMANTIC, PiSAGenerator, add_pisa_adapters

log = logging.getLogger(__name__)

OURS = "osediff-lab-lora/1"
# Adapter (as models/osediff.py names them) -> the official file's module-name list.
OFFICIAL_LISTS = {f"unet.{adapter}": f"unet_lora_{group}_modules" for group, adapter in UNET_ADAPTERS.items()}
OFFICIAL_LISTS["vae.default_encoder"] = "vae_lora_encoder_modules"
OFFICIAL_KEYS = ("state_dict_unet", "state_dict_vae", *OFFICIAL_LISTS.values(), "rank_unet", "rank_vae")
# PiSA-SR's pisa_sr.pkl as its save_model writes it (csslc/PiSA-SR@9c76e12 pisasr.py:296-305): per LoRA set three
# module lists (the release's three adapters per set, pisasr.py:73-78), its rank, and the UNet's LoRA tensors keyed
# "<module>.lora_A.default_<encoder|decoder|others>_<pix|sem>.weight".
PISA_SETS = {PIXEL: "pix", SEMANTIC: "sem"}
PISA_LISTS = {adapter: [f"unet_lora_{group}_modules_{tag}" for group in ("encoder", "decoder", "others")]
              for adapter, tag in PISA_SETS.items()}
PISA_RANKS = {adapter: f"lora_rank_unet_{tag}" for adapter, tag in PISA_SETS.items()}
PISA_KEYS = ("state_dict_unet", *PISA_LISTS[PIXEL], *PISA_LISTS[SEMANTIC], *PISA_RANKS.values())
PISA_ADAPTER = re.compile(r"\.default_(?:encoder|decoder|others)_(pix|sem)\.")
# A release checkpoint's kind -> the pipeline options saying how that release was trained (conf/infer.yaml)
OFFICIAL_KINDS = {"official": "official", "official-pisasr": "official_pisasr"}
BASE_ENV = "OSEDIFF_SD21_BASE"
DEFAULT_METHOD = "osediff_lab.methods.osediff.OSEDiff"  # the method of exports whose sidecar names none


@dataclass
class Checkpoint:
    """Weights read from disk: ``state`` keyed relative to the generator (``unet.*``, ``vae.*``).

    ``meta`` is the sidecar for ours (and for a training checkpoint, the sidecar it would export); for the
    official formats it holds the de-duplicated module list per adapter (``unet.default_encoder`` ...; PiSA-SR's
    three lists per set joined as ``unet.pixel`` / ``unet.semantic``) and the ranks.
    """

    kind: str  # osediff-lab | official (OSEDiff's release) | official-pisasr (PiSA-SR's release)
    state: dict[str, torch.Tensor]
    meta: dict
    path: Path


def read_checkpoint(path: str | Path) -> Checkpoint:
    """Read any supported format, recognised by content (safetensors by suffix); nothing is unpickled."""
    path = Path(path)
    if not path.is_file():
        raise MissingWeightsError(f"checkpoint {path} does not exist; pass ckpt=<.safetensors | .ckpt | official .pkl>")
    if path.suffix == ".safetensors":
        return _read_ours(path)
    obj = load_torch_weights(path)
    if isinstance(obj, dict) and "state_dict_unet" in obj and any(k in obj for k in PISA_RANKS.values()):
        return _read_official_pisasr(obj, path)
    if isinstance(obj, dict) and "state_dict_unet" in obj:
        return _read_official(obj, path)
    if isinstance(obj, dict) and "state_dict" in obj and "hyper_parameters" in obj:
        state, cfg, targets = training_checkpoint_parts(obj, str(path))
        return Checkpoint("osediff-lab", state, lora_sidecar(cfg, targets), path)
    raise ConfigError(
        f"{path}: unknown checkpoint format; expected our LoRA .safetensors (+ .json sidecar), a training "
        f".ckpt, the official OSEDiff release (keys {', '.join(OFFICIAL_KEYS)}) or PiSA-SR's (keys {', '.join(PISA_KEYS)})"
    )


def _read_ours(path: Path) -> Checkpoint:
    sidecar = path.with_suffix(".json")
    if not sidecar.is_file():
        raise MissingWeightsError(f"{path} needs its sidecar {sidecar} (written beside it by the export)")
    meta = json.loads(sidecar.read_text())
    if meta.get("format") != OURS:
        raise ConfigError(f"{sidecar}: format '{meta.get('format')}' is not {OURS}")
    return Checkpoint("osediff-lab", load_file(str(path)), meta, path)


def _read_official(obj: dict, path: Path) -> Checkpoint:
    missing = [k for k in OFFICIAL_KEYS if k not in obj]
    if missing:
        raise ConfigError(f"{path}: official OSEDiff checkpoint without {', '.join(missing)}")
    state = {f"unet.{k}": v for k, v in obj["state_dict_unet"].items()}
    state |= {f"vae.{k}": v for k, v in obj["state_dict_vae"].items()}
    meta = {adapter: list(dict.fromkeys(obj[key])) for adapter, key in OFFICIAL_LISTS.items()}
    meta |= {"rank_unet": int(obj["rank_unet"]), "rank_vae": int(obj["rank_vae"])}
    return Checkpoint("official", state, meta, path)


def _read_official_pisasr(obj: dict, path: Path) -> Checkpoint:
    """pisa_sr.pkl: both LoRA sets' tensors renamed to our adapters (``pixel``, ``semantic``), their modules and ranks."""
    missing = [k for k in PISA_KEYS if k not in obj]
    if missing:
        raise ConfigError(f"{path}: official PiSA-SR checkpoint without {', '.join(missing)}")
    adapter_of = {tag: adapter for adapter, tag in PISA_SETS.items()}
    state = {"unet." + PISA_ADAPTER.sub(lambda m: f".{adapter_of[m.group(1)]}.", key): value
             for key, value in obj["state_dict_unet"].items()}
    meta = {f"unet.{adapter}": list(dict.fromkeys(n for key in keys for n in obj[key])) for adapter, keys in PISA_LISTS.items()}
    meta |= {f"rank_{adapter}": int(obj[key]) for adapter, key in PISA_RANKS.items()}
    return Checkpoint("official-pisasr", state, meta, path)


def default_prompt(ckpt: Checkpoint) -> dict:
    """The prompt config inference uses unless told: the null prompt for the official files (OSEDiff's was trained
    with DAPE: pass prompt=dape) and for PiSA-SR, which its release runs with '' (test_pisasr.py:50); else the
    prompt mode the checkpoint was trained with."""
    if ckpt.kind == "official":
        log.info("the official release was trained with DAPE prompts; using the null prompt (pass prompt=dape)")
    if ckpt.kind in OFFICIAL_KINDS:
        return {"name": "none"}
    return method_class(ckpt).inference_prompt(ckpt.meta)


def method_class(ckpt: Checkpoint) -> Any:
    """The method that trained an export, by the ``_target_`` its sidecar names (one from before methods
    existed: OSEDiff); it rebuilds its inference generator (``Method.inference_generator``)."""
    name = str((ckpt.meta.get("method") or {}).get("_target_") or DEFAULT_METHOD)
    try:
        return get_object(name)
    except (ImportError, AttributeError, ValueError) as exc:
        raise ConfigError(f"{ckpt.path}: its sidecar names the method {name}, which is not importable here ({exc}); "
                          "install or put on PYTHONPATH the package that defines it") from None


def _pretrained_dir(path: str | None, source: str) -> Path:
    """A diffusers directory: ``path`` when it exists, else ${OSEDIFF_SD21_BASE}; errors name the fix."""
    if not path or not Path(os.path.expanduser(path)).is_dir():
        env = os.environ.get(BASE_ENV)
        if path:
            log.info("%s: base %s not found here, trying $%s", source, path, BASE_ENV)
        path = env or path
    cfg = OmegaConf.create({"name": source, "pretrained_path": path, "pretrained_env": BASE_ENV})
    try:
        return resolve_pretrained_path(cfg)
    except MissingWeightsError as exc:
        raise MissingWeightsError(f"{exc} Or pass base=<diffusers-format directory> to inference.") from exc


def load_base(ckpt: Checkpoint, base: str | Path | None = None) -> Components:
    """The frozen base model: ``base`` (a diffusers dir) if given; else what the checkpoint names.

    Random-init presets (tiny) are rebuilt from the sidecar's architecture and seed, which reproduces
    the training base when it was built right after seeding (as train.py does).
    """
    if base is not None:
        return frozen(load_pretrained(_pretrained_dir(str(base), "base")))
    if ckpt.kind in OFFICIAL_KINDS:
        release = "OSEDiff" if ckpt.kind == "official" else "PiSA-SR"
        return frozen(load_pretrained(_pretrained_dir(None, f"official {release} weights (LoRA on SD2.1-base)")))
    if ckpt.meta["model_arch"]["source"] == "random":
        arch = OmegaConf.create(ckpt.meta["model_arch"])
        seed = ckpt.meta.get("seed")
        if seed is None:
            log.warning("%s: no seed recorded; the random '%s' base is rebuilt with seed 0 and differs from training's", ckpt.path, arch.name)
        else:
            log.warning("%s: base model '%s' has random weights, rebuilt with seed %s", ckpt.path, arch.name, seed)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(int(seed or 0))
            return build_components(arch)
    return frozen(load_pretrained(_pretrained_dir(ckpt.meta["model_arch"].get("pretrained_path"), ckpt.meta["base_model"]["name"])))


def build_loaded_generator(components: Components, ckpt: Checkpoint, options: DictConfig) -> OneStepGenerator:
    """The generator with the checkpoint's adapters placed on the base model (shared, not copied) and loaded;
    ``options``: the pipeline options, whose ``official`` / ``official_pisasr`` say how a release was trained."""
    if ckpt.kind == "official":
        official = options.official
        schedule = components.backbone.schedule(components.scheduler)
        generator = OneStepGenerator(components.vae, components.denoiser, schedule, official.timestep, "mode")
        for key, names in ckpt.meta.items():
            if key.startswith(("unet.", "vae.")) and names:
                part, adapter = key.split(".")
                model = getattr(generator, part)
                _check_names_exist(model, names, ckpt.path, part)
                rank = ckpt.meta["rank_unet"] if part == "unet" else ckpt.meta["rank_vae"]
                add_lora(model, names, rank, official.lora_alpha, adapter, "gaussian")
    elif ckpt.kind == "official-pisasr":  # pisasr.py:413-445: both sets over their module lists, PEFT's default alpha
        official = options.official_pisasr
        schedule = components.backbone.schedule(components.scheduler)
        generator = PiSAGenerator(components.vae, components.denoiser, schedule, official.timestep, "sample")
        names = {adapter: ckpt.meta[f"unet.{adapter}"] for adapter in PISA_SETS}
        for adapter_names in names.values():
            _check_names_exist(generator.unet, adapter_names, ckpt.path, "unet")
        ranks = {adapter: ckpt.meta[f"rank_{adapter}"] for adapter in PISA_SETS}
        add_pisa_adapters(generator.unet, names, ranks, official.lora_alpha, "gaussian")
    else:
        generator, targets = method_class(ckpt).inference_generator(components, ckpt.meta)
        _check_targets(targets, ckpt)
    if ckpt.kind not in OFFICIAL_KINDS:
        _check_prediction_type(components, ckpt)
    load_generator_state(generator, ckpt.state, ckpt.path)
    return generator


def _check_prediction_type(components: Components, ckpt: Checkpoint) -> None:
    """A LoRA trained on an epsilon base gives garbage on a v-prediction one (and back): refuse the pair."""
    saved, now = ckpt.meta.get("prediction_type"), components.scheduler.config.get("prediction_type", "epsilon")
    if saved is not None and saved != now:
        raise ConfigError(
            f"{ckpt.path} was trained on a base model predicting '{saved}', but this base predicts '{now}'; "
            "pass base=<the diffusers folder it was trained on>"
        )


def _check_targets(targets: dict[str, list[str]], ckpt: Checkpoint) -> None:
    if targets != ckpt.meta["target_modules"]:
        raise ConfigError(
            f"{ckpt.path}: its LoRA targets differ from those this base model gives "
            f"({sorted(targets)} vs {sorted(ckpt.meta['target_modules'])}); is base the model it was trained on?"
        )


def _check_names_exist(model: torch.nn.Module, names: list[str], path: Path, part: str) -> None:
    known = dict(model.named_modules())
    absent = [n for n in names if n not in known]
    if absent:
        raise ConfigError(
            f"{path}: {len(absent)} {part} modules it adapts are not in the base model (e.g. {absent[:3]}); "
            "the official weights need an SD2.1-base-layout model"
        )


def load_generator_state(generator: OneStepGenerator, state: dict[str, torch.Tensor], source: Path) -> None:
    """Copy trained tensors in; every LoRA tensor must be provided and every provided tensor must fit."""
    own = generator.state_dict()
    unexpected = [k for k in state if k not in own]
    missing = [k for k in own if (".lora_A." in k or ".lora_B." in k) and k not in state]
    shapes = [f"{k} {tuple(v.shape)} vs {tuple(own[k].shape)}" for k, v in state.items() if k in own and v.shape != own[k].shape]
    if unexpected or missing or shapes:
        raise ConfigError(
            f"{source} does not fit the generator: {len(missing)} missing (e.g. {missing[:2]}), "
            f"{len(unexpected)} unexpected (e.g. {unexpected[:2]}), {len(shapes)} of another shape (e.g. {shapes[:2]})"
        )
    generator.load_state_dict(state, strict=False)
