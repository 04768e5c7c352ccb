"""Image sources: what lists the HQ images a run trains on, one class per kind, built from ``data._target_``.

``DemoImages`` (scikit-image photos), ``FolderImages`` (any tree; lsdir and div2k are folders), ``FFHQImages``
(the first ``first_n`` by name), ``MixedSources`` (several sources, each a ``_target_`` config repeated
``repeat`` times: lsdir_ffhq) and ``TxtListImages`` (text files listing image paths, each with a repeat count).
A source's ``files()`` lists them; ``argument_problems`` checks what can be checked without listing a tree.
The data loader's settings (``LOADER_SETTINGS``) are keys of ``data`` too, read by the datamodule, never by a
source. The caller offers ``name`` (the option's label) and ``key`` (where the source sits, e.g.
``data.sources.lsdir``), so messages name the key to fix.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol

from omegaconf import DictConfig, OmegaConf

from osediff_lab.build import build, component_problems
from osediff_lab.data.demo_images import demo_files
from osediff_lab.data.images import list_images
from osediff_lab.errors import ConfigError
from osediff_lab.paths import resolve_dir

log = logging.getLogger(__name__)
HINT = "To try the framework without a dataset use model=tiny data=demo."
# Keys of the data group the datamodule reads (crops, batches, workers); no source takes them.
LOADER_SETTINGS = ("crop_size", "flip", "small_image_policy", "repeat", "batch_size", "num_workers", "pin_memory",
                   "persistent_workers", "prefetch_factor", "worker_timeout_s")
MIX_SETTINGS = ("repeat",)  # a mixed source's weight, read by MixedSources


class ImageSource(Protocol):
    """Lists the image files of one source; a file listed twice is sampled twice as often."""

    def files(self) -> list[Path]: ...


def problems_of(check: Any, *args: Any) -> list[str]:
    """The ConfigError ``check(*args)`` raises, as a list of problems (none when it passes)."""
    try:
        check(*args)
    except ConfigError as exc:
        return [str(exc)]
    return []


def resolve_root(root: str | None, root_env: str | None, name: str | None, key: str) -> Path:
    """The dataset root ``<key>.root`` (or its environment variable ``root_env``), checked to exist."""
    hint = f" or the environment variable {root_env}" if root_env else ""
    name = name or key.rsplit(".", 1)[-1]
    if not root:
        raise ConfigError(f"data '{name}' has no root directory: set {key}.root=...{hint}. {HINT}")
    where = resolve_dir(root)
    if not where.is_dir():
        raise ConfigError(f"data '{name}': {key}.root={where} does not exist; set {key}.root=...{hint}. {HINT}")
    return where


def read_txt_list(path: str | Path, key: str) -> list[Path]:
    """Image paths listed one per line (blank lines and # comments ignored); relative ones are taken from the list's folder."""
    path = resolve_dir(path)
    if not path.is_file():
        raise ConfigError(f"{key}={path}: list file does not exist")
    files = []
    for line in path.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            p = Path(os.path.expanduser(line))
            files.append(p if p.is_absolute() else path.parent / p)
    if not files:
        raise ConfigError(f"{key}={path}: the list names no images")
    return files


def repeat_problems(repeat: Any, key: str) -> list[str]:
    """``<key>.repeat`` must be a whole number >= 1 (it multiplies the source's entries)."""
    try:
        ok = int(repeat) >= 1
    except (TypeError, ValueError):
        ok = False
    return [] if ok else [f"{key}.repeat={repeat} must be >= 1"]


class DemoImages:
    """Photographs bundled with scikit-image, by file name (no download)."""

    def __init__(self, images: Sequence[str], key: str = "data") -> None:
        self.images = list(images)
        self.key = key

    @classmethod
    def argument_problems(cls, args: Mapping[str, Any]) -> list[str]:
        key = args.get("key", "data")
        if not args.get("images"):
            return [f"{key}.images is empty: name at least one of scikit-image's bundled photographs"]
        return problems_of(demo_files, list(args["images"]), f"{key}.images")

    def files(self) -> list[Path]:
        return demo_files(self.images, f"{self.key}.images")


class FolderImages:
    """Every image under ``root`` (any directory tree), in file-name order."""

    def __init__(self, root: str | None = None, root_env: str | None = None, name: str | None = None, key: str = "data") -> None:
        self.root = resolve_root(root, root_env, name, key)
        self.name = name or key.rsplit(".", 1)[-1]
        self.key = key

    @classmethod
    def argument_problems(cls, args: Mapping[str, Any]) -> list[str]:
        return problems_of(resolve_root, args.get("root"), args.get("root_env"), args.get("name"), args.get("key", "data"))

    def files(self) -> list[Path]:
        files = list_images(self.root)
        if not files:
            raise ConfigError(f"data '{self.name}': no images under {self.key}.root={self.root}")
        return files


class FFHQImages(FolderImages):
    """The first ``first_n`` images under ``root`` by file name (the paper trains on FFHQ's first 10k)."""

    def __init__(self, root: str | None = None, first_n: int = 10000, root_env: str | None = None, name: str | None = None,
                 key: str = "data") -> None:
        super().__init__(root, root_env, name, key)
        self.first_n = first_n

    @classmethod
    def argument_problems(cls, args: Mapping[str, Any]) -> list[str]:
        first_n = args.get("first_n", 10000)
        if not isinstance(first_n, int) or first_n < 1:
            return [f"{args.get('key', 'data')}.first_n={first_n} must be >= 1"]
        return super().argument_problems(args)

    def files(self) -> list[Path]:
        files = super().files()
        if len(files) < self.first_n:
            log.warning("%s: only %d images under %s, fewer than first_n=%d", self.key, len(files), self.root, self.first_n)
        return files[: self.first_n]


class MixedSources:
    """Several sources, each a ``_target_`` config of its own with a ``repeat`` count weighting it in the mix."""

    def __init__(self, sources: Mapping[str, Mapping[str, Any]], key: str = "data") -> None:
        self.parts = [(f"{key}.sources.{n}", build_part(src, n, f"{key}.sources.{n}"), int(src.get("repeat", 1)))
                      for n, src in sources.items()]

    @classmethod
    def argument_problems(cls, args: Mapping[str, Any]) -> list[str]:
        key = args.get("key", "data")
        sources = args.get("sources") or {}
        if not sources:
            return [f"{key}.sources is empty: name at least one source"]
        problems = []
        for n, src in sources.items():
            k = f"{key}.sources.{n}"
            if not isinstance(src, Mapping):
                problems.append(f"{k}={src} must be a source config with a _target_")
                continue
            problems += component_problems(OmegaConf.create(dict(src)), k, skip=MIX_SETTINGS, offer={"name": n, "key": k})
            problems += repeat_problems(src.get("repeat", 1), k)
        return problems

    def files(self) -> list[Path]:
        files: list[Path] = []
        for key, source, repeat in self.parts:
            part = source.files() * repeat
            log.info("%s: %d entries", key, len(part))
            files += part
        return files


def build_part(src: Mapping[str, Any], name: str, key: str) -> ImageSource:
    """One source of a mix from its own ``_target_`` config (its ``repeat`` is the mix's to read)."""
    return build(OmegaConf.create(dict(src)), key, skip=MIX_SETTINGS, offer={"name": name, "key": key})


class TxtListImages:
    """The images named by text files (``lists``: ``{path, repeat}`` entries), as the paper's training scripts take them."""

    def __init__(self, lists: Sequence[Mapping[str, Any]], key: str = "data") -> None:
        self.lists = [(str(e["path"]), int(e.get("repeat", 1))) for e in lists]
        self.key = key

    @classmethod
    def argument_problems(cls, args: Mapping[str, Any]) -> list[str]:
        key = args.get("key", "data")
        if not args.get("lists"):
            return [f"{key}.lists is empty: set {key}.lists='[{{path: a.txt, repeat: 1}}]'"]
        problems = []
        for i, entry in enumerate(args["lists"]):
            k = f"{key}.lists[{i}]"
            if not isinstance(entry, Mapping) or not entry.get("path"):
                problems.append(f"{k}={entry} needs a path: {{path: a.txt, repeat: 1}}")
                continue
            problems += problems_of(read_txt_list, entry["path"], f"{k}.path") + repeat_problems(entry.get("repeat", 1), k)
        return problems

    def files(self) -> list[Path]:
        files: list[Path] = []
        for i, (path, repeat) in enumerate(self.lists):
            files += read_txt_list(path, f"{self.key}.lists[{i}].path") * repeat
        return files


def source_offer(cfg: DictConfig, key: str) -> dict[str, Any]:
    """What the caller offers a source: the option's label and where it sits in the config."""
    return {"name": cfg.get("name"), "key": key}


def source_problems(cfg: DictConfig, key: str = "data") -> list[str]:
    """The problems of the source ``cfg`` names, found without listing any folder."""
    return component_problems(cfg, key, skip=LOADER_SETTINGS, offer=source_offer(cfg, key))


def build_source(cfg: DictConfig, key: str = "data") -> ImageSource:
    """The source ``<key>._target_`` names (``data=demo|folder|ffhq|lsdir|div2k|lsdir_ffhq|txt_list`` or any class)."""
    return build(cfg, key, skip=LOADER_SETTINGS, offer=source_offer(cfg, key))


def source_files(cfg: DictConfig, key: str = "data") -> list[Path]:
    """Image paths of the configured source (with repeats; duplicates weight a source)."""
    return build_source(cfg, key).files()
