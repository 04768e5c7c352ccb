"""Shared benchmark plumbing: the tests' config composer on the path, and the package's timer."""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from helpers import compose_config  # noqa: E402,F401  (re-exported for the bench scripts)
from osediff_lab import profile  # noqa: E402


def timings(fn: Callable[[], object], repeats: int, warmup: int = 1) -> list[float]:
    """Seconds per call of ``fn`` on this machine's device (see ``osediff_lab.profile.timings``)."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return profile.timings(fn, device, warmup, repeats)
