"""Where the Hydra configuration (conf/) lives; core layer: imports nothing else of the package.

Looked up in order: ``$OSEDIFF_LAB_CONF``; the copy a non-editable install (``pip install .``, ``--target``,
``--prefix``) carries inside the package as ``osediff_lab/conf``, found through ``importlib.resources``
(setup.py copies it from conf/ when a wheel is built); the source checkout's ``conf/`` (editable installs and
running from the repository).
"""

from __future__ import annotations

import os
from importlib import resources
from pathlib import Path

CONF_ENV = "OSEDIFF_LAB_CONF"
PACKAGE = __name__.rpartition(".")[0]
REPO_ROOT = Path(__file__).resolve().parents[2]  # the source checkout (meaningless for an installed copy)


def resolve_dir(path: str | Path) -> Path:
    """A configured directory: ``~`` expanded; a relative path is taken from the working directory when it
    exists there, else from the repository root (so ../shared/... works from anywhere)."""
    p = Path(os.path.expanduser(str(path)))
    if p.is_absolute() or p.exists():
        return p
    return REPO_ROOT / p


def packaged_conf() -> Path:
    """conf/ as package data (present in non-editable installs only): ``osediff_lab/conf``."""
    return Path(str(resources.files(PACKAGE) / "conf"))


def conf_candidates() -> list[Path]:
    """Every place conf/ may be, in the order they are tried (only ``$OSEDIFF_LAB_CONF`` when it is set)."""
    env = os.environ.get(CONF_ENV)
    if env:
        return [Path(env).expanduser()]
    return [packaged_conf(), REPO_ROOT / "conf"]


def find_conf_dir() -> Path:
    """The first candidate holding ``train.yaml``; an error naming every place tried otherwise."""
    candidates = conf_candidates()
    for path in candidates:
        if (path / "train.yaml").is_file():
            return path
    tried = "\n  ".join(str(p) for p in candidates)
    raise FileNotFoundError(f"no conf/ with train.yaml found; set {CONF_ENV} to the repository's conf/. Tried:\n  {tried}")


CONF_DIR = find_conf_dir()
