"""The photographs that ship inside scikit-image: the demo's training images and held-out crops."""

from __future__ import annotations

from pathlib import Path

from osediff_lab.errors import ConfigError


def demo_files(names: list[str], key: str = "data.images") -> list[Path]:
    """Photographs that ship inside scikit-image (no download); a name not among them is a ConfigError naming ``key``."""
    import skimage

    root = Path(skimage.__file__).parent / "data"
    files = [root / n for n in names]
    missing = [str(f) for f in files if not f.is_file()]
    if missing:
        raise ConfigError(f"{key}: not found in scikit-image's bundled data: {missing}")
    return files
