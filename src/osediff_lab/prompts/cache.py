"""On-disk prompt cache: text per (image content hash, prompt settings), in one SQLite file; and the text embeddings
of prompt strings per text encoders' identity (``EmbeddingCache``, ``CachedTextEncoders``), so training need not keep
T5 and CLIP once every prompt it uses is cached.

Images are keyed by the SHA-256 of their source file's bytes when the file is known (training with
``prompt.source=hq`` and ``precompute``: the prompt then describes the whole source image), otherwise by the
SHA-256 of the image quantised to 8 bits. Settings are every prompt option that can change the text, so
changing any of them misses instead of returning stale prompts.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import sqlite3
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors
from torch import nn
from tqdm import tqdm

from osediff_lab.backbones.embeds import TextEmbeds
from osediff_lab.data.images import UnreadableImage, load_rgb, pil_to_tensor
from osediff_lab.errors import ConfigError
from osediff_lab.prompts.provider import PromptProvider

log = logging.getLogger(__name__)

ON_MISS = ("compute", "error")


def settings_hash(settings: dict) -> str:
    """A stable hash of the text-determining prompt settings."""
    return hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()


def pixel_key(image01: torch.Tensor) -> str:
    """Content hash of one image in [0, 1] ([3, H, W]), quantised to 8 bits so float noise does not matter."""
    q = (image01.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).cpu().contiguous()
    h = hashlib.sha256(str(tuple(q.shape)).encode())
    h.update(q.numpy().tobytes())
    return "px:" + h.hexdigest()


def file_key(path: str | Path) -> str:
    """Content hash of an image file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return "file:" + h.hexdigest()


class SQLiteTable:
    """One SQLite file holding the table ``schema`` creates; one connection per process."""

    schema = ""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(os.path.expanduser(str(path)))
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._db: sqlite3.Connection | None = None
        self._pid = -1
        with self._connect() as db:
            db.execute(self.schema)

    def _connect(self) -> sqlite3.Connection:
        """This process's connection, opened on first use (a forked worker or rank opens its own)."""
        if self._db is None or self._pid != os.getpid():
            self._db, self._pid = sqlite3.connect(self.path, timeout=60), os.getpid()
        return self._db

    def close(self) -> None:
        if self._db is not None and self._pid == os.getpid():
            self._db.close()
        self._db = None

    def __getstate__(self) -> dict:
        return {"path": self.path, "_db": None, "_pid": -1}  # connections do not travel to other processes


class PromptCache(SQLiteTable):
    """A SQLite table of prompt texts keyed by (settings hash, image key); safe for several processes."""

    schema = "CREATE TABLE IF NOT EXISTS prompts (settings TEXT, image TEXT, text TEXT, PRIMARY KEY (settings, image))"

    def get_many(self, settings: str, images: list[str]) -> dict[str, str]:
        """Cached texts for those ``images`` that have one."""
        if not images:
            return {}
        with self._connect() as db:
            found = {}
            for start in range(0, len(images), 500):
                chunk = images[start : start + 500]
                rows = db.execute(
                    f"SELECT image, text FROM prompts WHERE settings = ? AND image IN ({','.join('?' * len(chunk))})",
                    [settings, *chunk],
                )
                found.update(rows.fetchall())
        return found

    def put_many(self, settings: str, items: dict[str, str]) -> None:
        with self._connect() as db:
            db.executemany("INSERT OR REPLACE INTO prompts VALUES (?, ?, ?)", [(settings, k, v) for k, v in items.items()])

    def __len__(self) -> int:
        with self._connect() as db:
            return db.execute("SELECT COUNT(*) FROM prompts").fetchone()[0]


class CachedPrompt:
    """Wraps a provider: cached texts are returned as stored; misses are computed (and stored) or an error."""

    def __init__(
        self, inner: PromptProvider, cache: PromptCache, settings: dict, on_miss: str = "compute", fill_command: str = "", batch_size: int = 8
    ) -> None:
        if on_miss not in ON_MISS:
            raise ConfigError(f"prompt.on_miss must be one of {ON_MISS}, got '{on_miss}'")
        self.inner = inner
        self.cache = cache
        self.settings = settings_hash(settings)
        self.on_miss = on_miss
        self.fill_command = fill_command
        self.batch_size = batch_size
        self._file_keys: dict[tuple[str, int, int], str] = {}
        self.hits = 0
        self.misses = 0

    def _key_of_file(self, path: str) -> str:
        st = os.stat(path)
        memo = (path, st.st_mtime_ns, st.st_size)
        if memo not in self._file_keys:
            self._file_keys[memo] = file_key(path)
        return self._file_keys[memo]

    def __call__(self, lq: torch.Tensor, hq: torch.Tensor | None = None, paths: list[str] | None = None) -> list[str]:
        """Prompts for images in [0, 1]; with ``paths`` the entries are those of the source files."""
        keys = [self._key_of_file(p) for p in paths] if paths else [pixel_key(x) for x in lq]
        found = self.cache.get_many(self.settings, list(dict.fromkeys(keys)))
        missing = [i for i, k in enumerate(keys) if k not in found]
        self.hits += len(keys) - len(missing)
        self.misses += len(missing)
        if missing:
            if self.on_miss == "error":
                raise KeyError(
                    f"{len(missing)} of {len(keys)} prompts are not in the cache {self.cache.path} for these prompt "
                    f"settings (e.g. {paths[missing[0]] if paths else keys[missing[0]]}); fill it with `{self.fill_command}` "
                    "or set prompt.on_miss=compute"
                )
            if paths:
                computed = self._compute_files([paths[i] for i in missing], lq.device)
            else:
                idx = torch.tensor(missing, device=lq.device)
                texts = self.inner(lq[idx], hq[idx] if hq is not None else None)
                computed = dict(zip([keys[i] for i in missing], texts, strict=True))
            self.cache.put_many(self.settings, computed)
            found |= computed
        return [found[k] for k in keys]

    def _compute_files(
        self, paths: list[str], device: torch.device | str = "cpu", failed: dict[str, str] | None = None
    ) -> dict[str, str]:
        """Prompts of whole image files, batched among files of equal size. With ``failed``, a file that cannot
        be read is recorded there (path -> reason) and left out; without it, the UnreadableImage propagates."""
        buckets: dict[tuple[int, int], list[tuple[str, torch.Tensor]]] = {}
        for p in dict.fromkeys(paths):
            try:
                x = pil_to_tensor(load_rgb(p))[None]  # [1, 3, H, W] in [0, 1], as training reads it
            except UnreadableImage as exc:
                if failed is None:
                    raise
                failed[p] = exc.reason
                continue
            buckets.setdefault(tuple(x.shape[-2:]), []).append((self._key_of_file(p), x))
        out = {}
        for items in buckets.values():
            for start in range(0, len(items), self.batch_size):
                chunk = items[start : start + self.batch_size]
                texts = self.inner(torch.cat([x for _, x in chunk]).to(device))
                out.update(zip([k for k, _ in chunk], texts, strict=True))
        return out

    def fill_files(self, paths: Iterable[str | Path], device: torch.device | str = "cpu", progress: bool = True) -> dict:
        """Compute and store prompts for every file not cached yet (what ``precompute`` runs).

        Returns counts (files, cached_before, computed) and ``failed``: {path: reason} of files that could not
        be read (gone, unreadable); every other file is processed."""
        paths = [str(p) for p in paths]
        keys: dict[str, str] = {}
        failed: dict[str, str] = {}
        for p in tqdm(list(dict.fromkeys(paths)), desc="hashing", disable=not progress):
            try:
                keys[p] = self._key_of_file(p)
            except OSError as exc:
                failed[p] = f"cannot be read: {exc.strerror or exc}"
        found = self.cache.get_many(self.settings, list(dict.fromkeys(keys.values())))
        todo = list({k: p for p, k in keys.items() if k not in found}.values())
        window = self.batch_size * 8
        computed = 0
        with tqdm(total=len(todo), desc="prompts", disable=not progress) as bar:
            for start in range(0, len(todo), window):
                part = todo[start : start + window]
                texts = self._compute_files(part, device, failed)
                self.cache.put_many(self.settings, texts)
                computed += len(texts)
                bar.update(len(part))
        for p, reason in failed.items():
            log.warning("prompt not computed for %s: %s", p, reason)
        cached_before = sum(p in keys and keys[p] in found for p in paths)
        return {"files": len(paths), "cached_before": cached_before, "computed": computed, "failed": failed}


def encoder_identity(model: Mapping[str, Any], seed: int | None = None) -> str:
    """A hash naming the text encoders of a model config without loading them: the backbone, source and folder, the
    tokenizer and text encoder entries of ``model.arch``, the seed a random twin is drawn with, and the size and time
    of every file in the folder's tokenizer* / text_encoder* subfolders (new weights there miss the cache)."""
    arch = model.get("arch") or {}
    text_arch = {k: v for k, v in arch.items() if k.startswith(("tokenizer", "text_encoder"))}
    files = []
    folder = model.get("pretrained_path")
    if folder and Path(os.path.expanduser(str(folder))).is_dir():
        root = Path(os.path.expanduser(str(folder)))
        for sub in sorted(p for p in root.iterdir() if p.is_dir() and p.name.startswith(("tokenizer", "text_encoder"))):
            for f in sorted(sub.rglob("*")):
                if f.is_file():
                    st = f.stat()
                    files.append((str(f.relative_to(root)), st.st_size, st.st_mtime_ns))
    random_seed = seed if model.get("source") == "random" else None
    return settings_hash({"backbone": model.get("backbone"), "source": model.get("source"), "name": model.get("name"),
                          "folder": str(folder) if folder else None, "arch": text_arch, "seed": random_seed, "files": files})


def embeds_to_bytes(embeds: TextEmbeds) -> bytes:
    """One prompt's embedding (a row of TextEmbeds) as safetensors bytes, dtypes kept."""
    tensors = {"hidden": embeds.hidden.detach().cpu().contiguous()}
    if embeds.pooled is not None:
        tensors["pooled"] = embeds.pooled.detach().cpu().contiguous()
    return save_safetensors(tensors)


def embeds_from_bytes(blob: bytes) -> TextEmbeds:
    tensors = load_safetensors(blob)
    return TextEmbeds(tensors["hidden"], tensors.get("pooled"))


class EmbeddingCache(SQLiteTable):
    """A SQLite table of text embeddings (hidden states and pooled vector, as the backbone's encoders return them)
    keyed by (text encoders' identity, prompt string); safe for several processes."""

    schema = "CREATE TABLE IF NOT EXISTS embeds (encoders TEXT, prompt TEXT, tensors BLOB, PRIMARY KEY (encoders, prompt))"

    def get_embeds(self, encoders: str, prompts: Iterable[str]) -> dict[str, TextEmbeds]:
        """Cached embeddings (one row each) of those ``prompts`` that have one."""
        prompts = list(dict.fromkeys(prompts))
        found: dict[str, TextEmbeds] = {}
        with self._connect() as db:
            for start in range(0, len(prompts), 500):
                chunk = prompts[start : start + 500]
                rows = db.execute(f"SELECT prompt, tensors FROM embeds WHERE encoders = ? AND prompt IN ({','.join('?' * len(chunk))})",
                                  [encoders, *chunk])
                found.update((p, embeds_from_bytes(blob)) for p, blob in rows.fetchall())
        return found

    def put_embeds(self, encoders: str, items: Mapping[str, TextEmbeds]) -> None:
        with self._connect() as db:
            db.executemany("INSERT OR REPLACE INTO embeds VALUES (?, ?, ?)",
                           [(encoders, p, embeds_to_bytes(e)) for p, e in items.items()])

    def __len__(self) -> int:
        with self._connect() as db:
            return db.execute("SELECT COUNT(*) FROM embeds").fetchone()[0]


class CachedTextEncoders(nn.Module):
    """Prompt strings -> TextEmbeds read from an ``EmbeddingCache``: the call and ``device`` of the backbone's
    ``TextEncoders``, so training and validation use it in their place. A prompt not cached is encoded by
    ``encoders`` and stored; without encoders (``text_cache.keep_encoders=false``: T5 and CLIP are not kept) it is an
    error naming ``fill_command``."""

    def __init__(self, cache: EmbeddingCache, identity: str, encoders: nn.Module | None = None, fill_command: str = "") -> None:
        super().__init__()
        self.cache, self.identity, self.fill_command = cache, identity, fill_command
        self.encoders = encoders
        self.register_buffer("anchor", torch.zeros(0), persistent=False)  # follows .to(device)
        self._memo: dict[str, TextEmbeds] = {}

    @property
    def device(self) -> torch.device:
        return self.anchor.device

    @torch.no_grad()
    def forward(self, prompts: list[str]) -> TextEmbeds:
        missing = [p for p in dict.fromkeys(prompts) if p not in self._memo]
        self._memo |= self.cache.get_embeds(self.identity, missing)
        missing = [p for p in missing if p not in self._memo]
        if missing:
            if self.encoders is None:
                raise KeyError(f"{len(missing)} prompts have no cached text embedding in {self.cache.path} for these text "
                               f"encoders (e.g. '{missing[0]}'); fill it with `{self.fill_command}` or set "
                               "text_cache.keep_encoders=true")
            encoded = self.encoders(missing)
            computed = {p: encoded[i] for i, p in enumerate(missing)}
            self.cache.put_embeds(self.identity, computed)
            self._memo |= computed
        return TextEmbeds.cat(self._memo[p] for p in prompts).to(self.device)


FINITE_PROMPTS = {"none": lambda prompt: [""], "fixed": lambda prompt: [str(prompt.text)]}  # image-independent groups


def run_prompts(prompt: Mapping[str, Any] | None, method: Mapping[str, Any], extra: Iterable[str] = ()) -> list[str] | None:
    """Every prompt string a run can encode: its prompt group's (none: the empty prompt; fixed: its text), the empty
    prompt (null text, the memory replay), the method's negative prompt and ``extra``; None for a group whose prompts
    depend on the image (DAPE, RAM, LLaVA)."""
    name = "none" if prompt is None else str(prompt.get("name"))
    if name not in FINITE_PROMPTS:
        return None
    negative = [str(method["negative_prompt"])] if method.get("negative_prompt") is not None else []
    return list(dict.fromkeys([*FINITE_PROMPTS[name](prompt), "", *negative, *extra]))


def cached_text_encoders(settings: Mapping[str, Any], model: Mapping[str, Any], seed: int, encoders: nn.Module,
                         prompts: list[str] | None) -> CachedTextEncoders:
    """``encoders`` behind the embedding cache (``text_cache``): ``prompts`` (``run_prompts``) are filled first; with
    ``keep_encoders: false`` the encoders are then let go (a prompt still missing later is an error)."""
    identity = encoder_identity(model, seed)
    fill = "python -m osediff_lab.train <this run's overrides> text_cache.keep_encoders=true trainer.max_steps=0"
    cached = CachedTextEncoders(EmbeddingCache(settings["path"]), identity, encoders, fill)
    if not settings["keep_encoders"]:
        if prompts is None:
            raise ConfigError("text_cache.keep_encoders=false needs every prompt known before training, but the prompt "
                              "group captions each image (DAPE, RAM, LLaVA): use prompt=none or prompt=fixed, or keep them")
        cached(prompts)
        cached.encoders = None
    return cached
