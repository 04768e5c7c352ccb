"""OmegaConf resolvers our configs use; imported by every entry point before Hydra composes."""

from __future__ import annotations

import hashlib
import re
import sys

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


# Config choices renamed, (group, old name) -> new name. The empty prompt was `prompt=null`, which Hydra reads
# as 'no config for this group' (failing with "must be a string or a list"), so it is `prompt=none` now.
RENAMED_CHOICES = {("prompt", "null"): "none"}


def renamed_choice_problems(argv: list[str]) -> list[str]:
    """A message for each command-line override that selects a choice by its old name (sweeps' lists included),
    with the override to type instead."""
    problems = []
    for arg in argv:
        key, _, value = arg.partition("=")
        group = key.lstrip("+~")
        choices = [v.strip().strip("'\"") for v in value.split(",")]
        renamed = {c: RENAMED_CHOICES[(group, c)] for c in choices if (group, c) in RENAMED_CHOICES}
        for old, new in renamed.items():
            fixed = ",".join(renamed.get(c, c) for c in choices)
            problems.append(f"{arg}: the {group} option '{old}' is now called '{new}': {key}={fixed}")
    return problems


def refuse_renamed_choices(argv: list[str]) -> None:
    """Stop with exit status 2 (as for any config error), naming the new name, before Hydra parses ``argv``."""
    problems = renamed_choice_problems(argv)
    if problems:
        print("\n".join(problems), file=sys.stderr)
        raise SystemExit(2)
