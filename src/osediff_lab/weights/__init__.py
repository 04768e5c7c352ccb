"""External weight files: one manifest, one cache, and an explicit fetch step (the only network access)."""

from osediff_lab.weights.cache import (
    check_entry,
    default_weights_dir,
    expected_path,
    locate,
    offline,
)
from osediff_lab.weights.manifest import GROUPS, MANIFEST, WeightFile, resolve_names

__all__ = [
    "GROUPS",
    "MANIFEST",
    "WeightFile",
    "check_entry",
    "default_weights_dir",
    "expected_path",
    "locate",
    "offline",
    "resolve_names",
]
