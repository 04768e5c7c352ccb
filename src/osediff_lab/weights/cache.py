"""The one weights cache (``paths.weights_dir``, env OSEDIFF_WEIGHTS): locating, checking, and offline use.

Each manifest entry has one path in the cache (``expected_path``), used by ``check``, ``fetch`` and the configs.
A plain file missing there is also looked for, by its file name, in the read-only ``paths.weights_shared_dirs``
(env OSEDIFF_WEIGHTS_SHARED, default ../shared/weights: a cluster's shared copy), and used from there.

``offline(cache)`` points torch.hub, pyiqa, CLIP and the Hugging Face hub at the cache and refuses every
outbound connection while libraries build their models, so nothing reaches the network by surprise.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from omegaconf import OmegaConf

from osediff_lab.errors import MissingWeightsError
from osediff_lab.paths import CONF_DIR
from osediff_lab.weights.manifest import HF_HUB, TORCH_HUB, WeightFile

PATHS_CONF = CONF_DIR / "paths" / "default.yaml"


def default_weights_dir() -> Path:
    """``paths.weights_dir`` from conf/paths/default.yaml, with its OSEDIFF_WEIGHTS override resolved."""
    cfg = OmegaConf.load(PATHS_CONF)
    return Path(str(cfg.weights_dir)).expanduser()


def shared_weights_dirs() -> list[Path]:
    """``paths.weights_shared_dirs`` (os.pathsep-separated; relative to the repository root), existing ones only."""
    cfg = OmegaConf.load(PATHS_CONF)
    root = CONF_DIR.parent
    dirs = [root / Path(d).expanduser() for d in str(cfg.get("weights_shared_dirs") or "").split(os.pathsep) if d.strip()]
    return [d for d in dirs if d.is_dir()]  # root / an absolute path is that path


def fetch_command(names: list[str]) -> str:
    return "python -m osediff_lab.weights fetch " + " ".join(dict.fromkeys(names))


def hf_repo_dir(entry: WeightFile, cache: Path) -> Path:
    return cache / HF_HUB / ("models--" + str(entry.hf_repo).replace("/", "--"))


def expected_path(entry: WeightFile, cache: str | Path) -> Path:
    """Where the file is (or, when missing, must be put), for messages and checks."""
    cache = Path(cache).expanduser()
    if entry.package:
        import importlib

        return Path(importlib.import_module(entry.package).__file__).parent / entry.path
    if entry.hf_repo and not entry.path:
        return hf_repo_dir(entry, cache) / "snapshots" / "<revision>" / (entry.hf_file or "")
    return cache / entry.path


def _is_snapshot(path: Path) -> bool:
    return path.is_dir() and any(path.glob("*.safetensors"))


def locate(entry: WeightFile, cache: str | Path) -> Path | None:
    """The file (or snapshot directory) if it is on disk, else None; plain files also in the shared dirs."""
    cache = Path(cache).expanduser()
    if entry.hf_repo and not entry.path:
        snapshots = sorted((hf_repo_dir(entry, cache) / "snapshots").glob("*"))
        for snap in snapshots:
            target = snap / entry.hf_file if entry.hf_file else snap
            if target.is_file() or _is_snapshot(target):
                return target
        return None
    path = expected_path(entry, cache)
    if entry.hf_repo:  # a snapshot downloaded into its own directory of the cache
        return path if _is_snapshot(path) else None
    if path.is_file():
        return path
    if entry.package:
        return None
    return next((d / path.name for d in shared_weights_dirs() if (d / path.name).is_file()), None)


def sha256_of(path: Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def format_problem(path: Path) -> str | None:
    """A cheap integrity check by file type (catches truncated downloads); None when the file looks whole."""
    size = path.stat().st_size
    if size == 0:
        return "empty file"
    suffix = path.suffix.lower()
    with open(path, "rb") as f:
        head = f.read(8)
        if suffix == ".safetensors":
            n = int.from_bytes(head, "little")
            if n <= 0 or 8 + n > size:
                return "safetensors header is cut off"
            try:
                header = json.loads(f.read(n))
            except ValueError:
                return "safetensors header is not JSON"
            end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
            return None if 8 + n + end == size else f"safetensors expects {8 + n + end} bytes, file has {size}"
    if suffix in (".pth", ".pt", ".bin", ".ckpt"):
        if head.startswith(b"PK"):
            try:
                zipfile.ZipFile(path).close()
            except zipfile.BadZipFile:
                return "PyTorch zip archive is truncated or damaged"
            return None
        return None if head[:1] == b"\x80" else "not a PyTorch checkpoint (neither zip nor pickle)"
    if suffix == ".mat":
        return None if head.startswith((b"MATLAB", b"\x89HDF")) else "not a MATLAB .mat file"
    if suffix == ".json":
        try:
            json.loads(path.read_text())
        except ValueError:
            return "not valid JSON"
    return None


@dataclass(frozen=True)
class EntryStatus:
    """One manifest entry in one cache: ``state`` is present, missing or corrupt."""

    entry: WeightFile
    state: str
    path: Path
    detail: str = ""


def check_entry(entry: WeightFile, cache: str | Path, verify_hash: bool = True) -> EntryStatus:
    """Presence, file-format integrity and (when a digest is known and ``verify_hash``) the sha256."""
    found = locate(entry, cache)
    if found is None:
        how = "ships with pip; reinstall it" if entry.package else (entry.manual or fetch_command([entry.name]))
        return EntryStatus(entry, "missing", expected_path(entry, cache), how)
    if found.is_dir():
        return EntryStatus(entry, "present", found, "snapshot")
    problem = format_problem(found)
    if problem:
        return EntryStatus(entry, "corrupt", found, problem)
    if verify_hash and (entry.sha256 or entry.sha256_prefix):
        digest = sha256_of(found)
        want = entry.sha256 or entry.sha256_prefix
        if not digest.startswith(want):
            return EntryStatus(entry, "corrupt", found, f"sha256 {digest[:16]}... does not match {want[:16]}")
        return EntryStatus(entry, "present", found, "sha256 ok")
    known = entry.sha256 or entry.sha256_prefix
    return EntryStatus(entry, "present", found, "sha256 not checked" if known else "no published sha256; format ok")


class NetworkBlockedError(MissingWeightsError):
    """A library tried to download while the weights cache was in offline mode."""


_ORIGINAL_CONNECT = socket.socket.connect
LOOPBACK = ("127.0.0.1", "::1", "localhost")


def _refuse_connect(self: socket.socket, address) -> None:
    """socket.connect that lets loopback (local services such as W&B's) through and refuses the internet."""
    internet = isinstance(address, tuple) and isinstance(address[0], str)  # (host, port, ...); a UNIX socket's is a path
    if internet and address[0] not in LOOPBACK:
        raise NetworkBlockedError(
            f"a library tried to reach {address} while building a model from the weights cache; a file it needs is "
            "missing. Run `python -m osediff_lab.weights check` and fetch what is missing on a connected machine."
        )
    return _ORIGINAL_CONNECT(self, address)


@contextmanager
def offline(cache: str | Path) -> Iterator[Path]:
    """Point torch.hub/pyiqa/CLIP/Hugging Face at ``cache`` and refuse outbound connections inside the block."""
    import huggingface_hub.constants as hf_constants
    import pyiqa.utils.download_util as pyiqa_download
    import torch

    cache = Path(cache).expanduser()
    hub = cache / TORCH_HUB
    saved = (torch.hub.get_dir(), pyiqa_download.DEFAULT_CACHE_DIR, hf_constants.HF_HUB_CACHE, hf_constants.HF_HUB_OFFLINE)
    saved_env = os.environ.get("HF_HUB_OFFLINE")
    torch.hub.set_dir(str(hub))
    pyiqa_download.DEFAULT_CACHE_DIR = str(hub / "pyiqa")
    hf_constants.HF_HUB_CACHE = str(cache / HF_HUB)
    hf_constants.HF_HUB_OFFLINE = True
    os.environ["HF_HUB_OFFLINE"] = "1"
    socket.socket.connect = _refuse_connect
    try:
        yield cache
    finally:
        socket.socket.connect = _ORIGINAL_CONNECT
        torch.hub.set_dir(saved[0])
        pyiqa_download.DEFAULT_CACHE_DIR = saved[1]
        hf_constants.HF_HUB_CACHE, hf_constants.HF_HUB_OFFLINE = saved[2], saved[3]
        if saved_env is None:
            os.environ.pop("HF_HUB_OFFLINE", None)
        else:
            os.environ["HF_HUB_OFFLINE"] = saved_env
