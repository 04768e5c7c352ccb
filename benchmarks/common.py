"""Shared benchmark plumbing: the tests' config composer on the path, and the package's timer."""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from helpers import compose_config  # noqa: E402,F401  (re-exported for the bench scripts)
from osediff_lab import profile  # noqa: E402
from osediff_lab.dtypes import resolve_device  # noqa: E402


def timings(fn: Callable[[], object], repeats: int, warmup: int = 1) -> list[float]:
    """Seconds per call of ``fn`` on this machine's device (see ``osediff_lab.profile.timings``)."""
    return profile.timings(fn, resolve_device(), warmup, repeats)
