"""Loading and random building of the parts a diffusers base-model folder holds, for any backbone: tokenizers
and text encoders by transformers class name, the VAE, the backbone's denoiser and a scheduler by diffusers
class name. Random parts (tiny / shape twins) come from ``model.arch``: CLIP tokenizers are a real byte-level
BPE over ``arch.tokenizer.merges``, T5 tokenizers a unigram over their section's ``tokenizer_words``.
"""

from __future__ import annotations

import json
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import diffusers
import torch
import transformers
from diffusers import AutoencoderKL, SchedulerMixin
from tokenizers import Tokenizer, models, pre_tokenizers
from torch import nn
from transformers import CLIPTokenizer, PreTrainedTokenizerBase, T5TokenizerFast

from osediff_lab.backbones.components import Components, library_class
from osediff_lab.errors import ConfigError, MissingWeightsError

SCHEDULER_CONFIG = "scheduler/scheduler_config.json"
# Keys of a model.arch text section that are not its encoder's config: the encoder class, a T5 tokenizer's
# vocabulary, and the token count its backbone encodes with (read by the backbone).
ARCH_ONLY = ("class_name", "tokenizer_words", "max_length")


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP byte-level BPE alphabet: every byte maps to a printable unicode character."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs), strict=True))


def write_tiny_tokenizer(directory: str | Path, merges: list[str]) -> Path:
    """Write a real CLIP byte-level BPE vocabulary (the 512 byte tokens, the given merges, specials).

    The result loads with ``CLIPTokenizer.from_pretrained`` exactly like SD2.1's tokenizer folder.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    alphabet = list(_bytes_to_unicode().values())
    vocab_tokens = alphabet + [c + "</w>" for c in alphabet]
    for merge in merges:
        a, b = merge.split()
        vocab_tokens.append(a + b)
    vocab_tokens += ["<|startoftext|>", "<|endoftext|>"]
    vocab = {tok: i for i, tok in enumerate(dict.fromkeys(vocab_tokens))}
    (directory / "vocab.json").write_text(json.dumps(vocab))
    (directory / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    (directory / "tokenizer_config.json").write_text(
        json.dumps(
            {
                "model_max_length": 77,
                "bos_token": "<|startoftext|>",
                "eos_token": "<|endoftext|>",
                "unk_token": "<|endoftext|>",
                "pad_token": "<|endoftext|>",
                "do_lower_case": True,
                "tokenizer_class": "CLIPTokenizer",
            }
        )
    )
    return directory


def write_tiny_t5_tokenizer(directory: str | Path, words: list[str]) -> Path:
    """Write a real T5TokenizerFast folder (SentencePiece-style unigram over ``words``, T5's specials) that
    ``T5TokenizerFast.from_pretrained`` loads like SD3's ``tokenizer_3``."""
    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), *[("\u2581" + w, -1.0) for w in words],
              *[(c, -5.0) for c in "abcdefghijklmnopqrstuvwxyz"]]
    backend = Tokenizer(models.Unigram(pieces, unk_id=2))
    backend.pre_tokenizer = pre_tokenizers.Metaspace()
    tokenizer = T5TokenizerFast(tokenizer_object=backend, eos_token="</s>", unk_token="<unk>", pad_token="<pad>", extra_ids=0)
    tokenizer.save_pretrained(str(directory))
    return Path(directory)


def random_tokenizer(class_name: str, arch: Mapping[str, Any], section: Mapping[str, Any]) -> PreTrainedTokenizerBase:
    """A tokenizer of class ``class_name`` written from ``arch`` (CLIP) or its encoder's ``section`` (T5), read
    back into memory."""
    with tempfile.TemporaryDirectory(prefix="osediff_tokenizer_") as tmp:
        if class_name == "CLIPTokenizer":
            return CLIPTokenizer.from_pretrained(str(write_tiny_tokenizer(tmp, list(arch["tokenizer"]["merges"]))), local_files_only=True)
        if class_name == "T5TokenizerFast":
            folder = write_tiny_t5_tokenizer(tmp, list(section["tokenizer_words"]))
            return T5TokenizerFast.from_pretrained(str(folder), local_files_only=True)
    raise ConfigError(f"no random build for a {class_name}; random twins have CLIPTokenizer or T5TokenizerFast tokenizers")


def random_text_encoder(class_name: str, section: Mapping[str, Any], tokenizer: PreTrainedTokenizerBase) -> nn.Module:
    """A random text encoder of ``section``'s ``class_name`` (default ``class_name``) and sizes, for ``tokenizer``."""
    name = section.get("class_name", class_name)
    cls = getattr(transformers, str(name), None)
    if not isinstance(cls, type):
        raise ConfigError(f"model.arch text encoder class_name '{name}' is not a transformers class (e.g. CLIPTextModel)")
    config = {k: v for k, v in section.items() if k not in ARCH_ONLY}
    config["vocab_size"] = max(int(config.get("vocab_size", 0)), len(tokenizer))
    config |= {"bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id, "pad_token_id": tokenizer.pad_token_id}
    return cls(cls.config_class(**config))


def scheduler_class(name: str, source: str) -> type[SchedulerMixin]:
    """The diffusers scheduler class called ``name`` (as a ``scheduler_config.json`` names it)."""
    cls = getattr(diffusers, str(name), None)
    if not (isinstance(cls, type) and issubclass(cls, SchedulerMixin)):
        raise ConfigError(f"{source}: '{name}' is not a diffusers scheduler class (e.g. DDPMScheduler, EulerDiscreteScheduler)")
    return cls


def load_scheduler(path: str | Path) -> SchedulerMixin:
    """The folder's scheduler, built by the class its ``scheduler/scheduler_config.json`` names, offline."""
    config_file = Path(path) / SCHEDULER_CONFIG
    try:
        name = json.loads(config_file.read_text()).get("_class_name", "DDPMScheduler")
    except (OSError, json.JSONDecodeError) as exc:
        raise MissingWeightsError(f"{config_file} is missing or unreadable ({exc}); the scheduler folder needs it") from exc
    return scheduler_class(name, str(config_file)).from_pretrained(str(path), subfolder="scheduler", local_files_only=True)


def random_components(backbone: Any, arch: Mapping[str, Any]) -> Components:
    """``backbone``'s components at the sizes in ``arch`` (plain containers), randomly initialised in diffusers'
    order (text parts, VAE, denoiser), so one seed gives one model."""
    parts: dict[str, Any] = {}
    for part in backbone.text_parts:
        section = arch.get(part.encoder_folder)
        if not section:
            if part.optional:
                continue
            raise ConfigError(f"model.arch.{part.encoder_folder} is missing: the {backbone.name} backbone needs it")
        tokenizer = random_tokenizer(part.tokenizer, arch, section)
        parts[part.tokenizer_folder] = tokenizer
        parts[part.encoder_folder] = random_text_encoder(part.encoder, section, tokenizer)
    vae = AutoencoderKL(**arch["vae"])
    denoiser = backbone.denoiser_type()(**arch[backbone.denoiser_folder])
    scheduler_cfg = dict(arch["scheduler"])
    scheduler = scheduler_class(scheduler_cfg.pop("class_name", "DDPMScheduler"), "model.arch.scheduler.class_name")
    with torch.device("cpu"):  # its tables hold values even when the networks are built on the meta device
        scheduler = scheduler.from_config(scheduler_cfg)
    return Components(vae=vae, denoiser=denoiser, scheduler=scheduler, backbone=backbone, **parts)


def load_components(backbone: Any, path: Path) -> Components:
    """``backbone``'s components from its diffusers folder at ``path`` (the text parts it ``wants``), offline."""
    kw = {"local_files_only": True}
    parts: dict[str, Any] = {}
    for part in backbone.text_parts:
        if backbone.wants(part, path):
            for folder, class_name in ((part.tokenizer_folder, part.tokenizer), (part.encoder_folder, part.encoder)):
                parts[folder] = library_class("transformers", class_name).from_pretrained(str(path), subfolder=folder, **kw)
    vae = AutoencoderKL.from_pretrained(str(path), subfolder="vae", **kw)
    denoiser = backbone.denoiser_type().from_pretrained(str(path), subfolder=backbone.denoiser_folder, **kw)
    return Components(vae=vae, denoiser=denoiser, scheduler=load_scheduler(path), backbone=backbone, **parts)
