"""Load RAM / DAPE checkpoints into ``RAMTagger``: every tagging-path tensor required, nothing silently dropped.

RAM's release (``ram_swin_large_14m.pth``) holds the base weights; DAPE's file is applied on top (its
LoRA tensors, and any base tensors it repeats). Captioning parts (``tag_encoder``, ``text_decoder``) are
ignored; window-geometry buffers are recomputed by the model and, when a checkpoint has them, checked.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from osediff_lab.errors import MissingWeightsError

GEOMETRY_BUFFERS = ("relative_position_index", "attn_mask")
WRAPPER_KEYS = ("model", "params", "state_dict")
LEGACY_PREFIXES = {"vision_multi.": "tagging_head."}


class StateDictMismatchError(RuntimeError):
    """A checkpoint does not match the architecture; the message lists every offending tensor name."""

    def __init__(self, source: str, missing: list[str], unexpected: list[str], wrong: list[str]) -> None:
        self.missing, self.unexpected, self.wrong = missing, unexpected, wrong
        lines = [f"{source} does not match the RAM tagging model:"]
        for label, names in (("missing", missing), ("unexpected", unexpected), ("wrong shape or value", wrong)):
            if names:
                lines.append(f"  {len(names)} {label}: " + ", ".join(names))
        lines.append("Check prompt.arch against the checkpoint, or add a prefix to prompt.ignore_prefixes to skip unused parts.")
        super().__init__("\n".join(lines))


@dataclass
class LoadReport:
    """What a load did: tensors set, and checkpoint entries skipped by prefix."""

    loaded: list[str] = field(default_factory=list)
    ignored: list[str] = field(default_factory=list)


def require_file(path: str | Path, what: str) -> Path:
    """The expanded path of a checkpoint that must exist; otherwise an error naming the file and the fix."""
    path = Path(os.path.expanduser(str(path)))
    if not path.is_file():
        raise MissingWeightsError(
            f"{what} checkpoint not found: {path}. Download it on a connected machine and place it there, "
            f"or point the config at it (prompt.ram_path / prompt.dape_path); use prompt=dape_tiny to run without weights."
        )
    return path


def read_state_dict(path: str | Path, what: str) -> dict[str, torch.Tensor]:
    """A checkpoint's flat state dict (weights-only load, wrappers like ``{"model": ...}`` removed)."""
    obj = torch.load(require_file(path, what), map_location="cpu", weights_only=True)
    for key in WRAPPER_KEYS:
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
            break
    out = {}
    for name, tensor in obj.items():
        for old, new in LEGACY_PREFIXES.items():
            if name.startswith(old):
                name = new + name[len(old):]
        out[name] = tensor
    return out


def load_tagger_state(
    model: nn.Module, state: dict[str, torch.Tensor], source: str, ignore_prefixes: tuple[str, ...] = ()
) -> LoadReport:
    """Copy ``state`` into ``model``; raise ``StateDictMismatchError`` unless it covers every parameter exactly."""
    params = dict(model.named_parameters())
    buffers = dict(model.named_buffers())
    report = LoadReport()
    unexpected, wrong = [], []
    for name, tensor in state.items():
        if name.startswith(ignore_prefixes):
            report.ignored.append(name)
        elif name in params:
            if tuple(tensor.shape) != tuple(params[name].shape):
                wrong.append(f"{name} {tuple(tensor.shape)} != {tuple(params[name].shape)}")
        elif name in buffers and name.endswith(GEOMETRY_BUFFERS):
            if tuple(tensor.shape) != tuple(buffers[name].shape) or not torch.equal(
                tensor.to(buffers[name].dtype), buffers[name].cpu()
            ):
                wrong.append(f"{name} (disagrees with the window geometry)")
        else:
            unexpected.append(name)
    missing = sorted(set(params) - set(state))
    if missing or unexpected or wrong:
        raise StateDictMismatchError(source, missing, sorted(unexpected), sorted(wrong))
    with torch.no_grad():
        for name, param in params.items():
            param.copy_(state[name])
            report.loaded.append(name)
    return report


def load_ram_dape(
    model: nn.Module, ram_path: str | Path, dape_path: str | Path | None, ignore_prefixes: tuple[str, ...]
) -> LoadReport:
    """RAM's checkpoint, then DAPE's on top (later files win); the union must match the model exactly."""
    state = read_state_dict(ram_path, "RAM")
    source = str(ram_path)
    if dape_path:
        state |= read_state_dict(dape_path, "DAPE")
        source = f"{ram_path} + {dape_path}"
    return load_tagger_state(model, state, source, ignore_prefixes)
