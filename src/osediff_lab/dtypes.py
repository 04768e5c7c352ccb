"""The precision names configs use (fp32 / bf16 / fp16), their torch dtypes, what "auto" means, and moving
host-drawn values to a device without waiting for it."""

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


def host_to_device(t: torch.Tensor, device: torch.device, dtype: torch.dtype | None = None) -> torch.Tensor:
    """``t`` (drawn on the CPU) on ``device``, in ``dtype`` (default: its own). To a GPU through pinned memory,
    which does not wait for the work queued there (a copy from pageable memory synchronises the stream)."""
    t = t.to(dtype=dtype or t.dtype)
    if device.type == "cuda" and t.device.type == "cpu":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)
