"""osediff-lab: train, evaluate and run OSEDiff (one-step diffusion super-resolution)."""

from osediff_lab import quiet

__version__ = "0.1.0"

quiet.install()
