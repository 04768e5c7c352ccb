"""OmegaConf resolvers our configs use; imported by every entry point before Hydra composes."""

from __future__ import annotations

import hashlib
import re

from omegaconf import OmegaConf


def run_id(override_dirname: str) -> str:
    """A stable directory name for a command's overrides, so re-running the same command finds
    (and resumes) the same run: readable when short, hashed when long or empty."""
    text = re.sub(r"[^A-Za-z0-9=,._-]+", "_", override_dirname.replace("+", "")).strip("_")
    if not text:
        return "default"
    if len(text) <= 96:
        return text
    return text[:60] + "-" + hashlib.sha1(override_dirname.encode()).hexdigest()[:12]


if not OmegaConf.has_resolver("run_id"):
    OmegaConf.register_new_resolver("run_id", run_id)


def asset(name: str) -> str:
    """The absolute path of a folder shipped inside the package (``src/osediff_lab/assets/<name>``)."""
    from pathlib import Path

    return str(Path(__file__).resolve().parent / "assets" / name)


if not OmegaConf.has_resolver("asset"):
    OmegaConf.register_new_resolver("asset", asset)


def quote_null_choices(argv: list[str], groups: tuple[str, ...] = ("prompt",)) -> list[str]:
    """Let users type ``prompt=null`` (the paper's name for the empty-prompt arm): Hydra reads a bare
    ``null`` as 'no config for this group', so pass it on as the string 'null', which selects null.yaml."""
    return [f"{a.split('=', 1)[0]}='null'" if a.split("=", 1)[0].lstrip("+") in groups and a.endswith("=null") else a for a in argv]
