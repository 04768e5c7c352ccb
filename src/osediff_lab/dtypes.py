"""The precision names configs use (fp32 / bf16 / fp16), their torch dtypes, and what "auto" means."""

from __future__ import annotations

import torch

DTYPES: dict[str, torch.dtype] = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def resolve_device(name: str | torch.device = "auto") -> torch.device:
    """``auto`` is CUDA when available, else the CPU; anything else is taken as a torch device name."""
    if str(name) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def resolve_dtype(
    precision: str, device: torch.device, auto_on_cuda: torch.dtype = torch.float16, key: str = "precision"
) -> torch.dtype:
    """A precision name, or ``auto``: ``auto_on_cuda`` on CUDA, fp32 elsewhere; errors name the config ``key``."""
    if precision == "auto":
        return auto_on_cuda if device.type == "cuda" else torch.float32
    if precision not in DTYPES:
        raise ValueError(f"{key} must be auto, {', '.join(DTYPES)}; got '{precision}'")
    return DTYPES[precision]
