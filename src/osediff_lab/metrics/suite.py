"""The configured pyiqa metrics, built offline from the weights cache; unavailable ones are reported, never scored.

Availability is decided from the manifest before any model is built or image read: a metric whose files are
missing or damaged becomes an ``Unavailable`` record naming the files and the fetch command.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from osediff_lab.dtypes import resolve_device
from osediff_lab.errors import ConfigError
from osediff_lab.weights.cache import EntryStatus, check_entry, expected_path, fetch_command, offline
from osediff_lab.weights.manifest import MANIFEST, WeightFile


@dataclass(frozen=True)
class MetricDef:
    """One metric of the protocol (see conf/metric_defs/)."""

    name: str
    pyiqa: str
    mode: str  # fr | nr | fid
    lower_better: bool
    options: dict = field(default_factory=dict)
    weights: tuple[str, ...] = ()
    model_file: str | None = None
    call_options: dict = field(default_factory=dict)
    min_size: int = 1  # the shortest image side the metric can score (SSIM's window, NIQE's block)


class MetricError(RuntimeError):
    """A metric failed on one input; the message names the metric and the image size."""


def metric_defs(defs: DictConfig, names: list[str]) -> list[MetricDef]:
    """The definitions for ``names`` from the ``metric_defs`` config group; unknown names are a ConfigError."""
    unknown = [n for n in names if n not in defs]
    if unknown:
        raise ConfigError(f"unknown metric(s) {unknown}; defined in conf/metric_defs: {sorted(defs)}")
    out = []
    for n in names:
        d = OmegaConf.to_container(defs[n], resolve=True)
        missing_entries = [w for w in d.get("weights", []) if w not in MANIFEST]
        if missing_entries:
            raise ConfigError(f"metric_defs.{n}.weights names {missing_entries}, which are not in the weights manifest")
        if d.get("mode") not in ("fr", "nr", "fid"):
            raise ConfigError(f"metric_defs.{n}.mode must be fr, nr or fid, got {d.get('mode')!r}")
        out.append(
            MetricDef(
                n, d["pyiqa"], d["mode"], bool(d.get("lower_better", False)), d.get("options") or {},
                tuple(d.get("weights") or ()), d.get("model_file"), d.get("call_options") or {}, int(d.get("min_size", 1)),
            )
        )
    return out


@dataclass(frozen=True)
class Unavailable:
    """A configured metric that cannot run because weight files are missing or damaged."""

    name: str
    problems: tuple[EntryStatus, ...]

    @property
    def reason(self) -> str:
        files = "; ".join(f"{s.entry.name} {s.state} at {s.path}" for s in self.problems)
        return f"{files}; fix: {fetch_command([s.entry.name for s in self.problems])}"

    @property
    def message(self) -> str:
        return f"{self.name}: UNAVAILABLE ({self.reason})"


def _usable(entry: WeightFile, cache: str | Path, passed_by_path: bool) -> EntryStatus:
    """The entry's status for a metric: a file found only in a shared dir counts when we hand pyiqa its path
    (``model_file``); otherwise pyiqa looks in the cache itself, so the file must be there."""
    status = check_entry(entry, cache, verify_hash=False)
    expected = expected_path(entry, Path(cache).expanduser())
    if status.state == "present" and not passed_by_path and not status.path.is_dir() and status.path != expected:
        return EntryStatus(entry, "outside the cache", status.path, f"pyiqa reads it only from {expected}: copy it there")
    return status


def availability(defs: list[MetricDef], cache: str | Path) -> tuple[list[MetricDef], list[Unavailable]]:
    """Split metrics into runnable and unavailable by checking their files (presence + format, no hashing)."""
    ok, missing = [], []
    for d in defs:
        problems = tuple(s for s in (_usable(MANIFEST[w], cache, w == d.model_file) for w in d.weights) if s.state != "present")
        if problems:
            missing.append(Unavailable(d.name, problems))
        else:
            ok.append(d)
    return ok, missing


class MetricSuite:
    """Per-image metrics (``score``) and folder metrics (``score_folders``) for the runnable subset of ``defs``."""

    def __init__(self, defs: list[MetricDef], cache: str | Path, device: str | torch.device = "cpu") -> None:
        import pyiqa

        self.cache = Path(cache).expanduser()
        self.device = resolve_device(device)
        runnable, self.unavailable = availability(defs, self.cache)  # callers report these, once
        self.defs = {d.name: d for d in runnable}
        self.models: dict[str, torch.nn.Module] = {}
        with offline(self.cache):
            for d in runnable:
                kwargs = dict(d.options)
                if d.model_file:
                    kwargs["pretrained_model_path"] = str(check_entry(MANIFEST[d.model_file], self.cache, False).path)
                self.models[d.name] = pyiqa.create_metric(d.pyiqa, device=self.device, **kwargs).eval()

    @property
    def per_image(self) -> list[str]:
        return [n for n, d in self.defs.items() if d.mode != "fid"]

    @property
    def folder(self) -> list[str]:
        return [n for n, d in self.defs.items() if d.mode == "fid"]

    def to(self, device: str | torch.device) -> MetricSuite:
        self.device = torch.device(device)
        for m in self.models.values():
            m.to(self.device)
        return self

    def too_small(self, height: int, width: int) -> list[str]:
        """Why an image of this size cannot be scored by some runnable per-image metric (empty when it can)."""
        side = min(height, width)
        return [
            f"{width}x{height} is smaller than {n}'s minimum side of {self.defs[n].min_size} px"
            for n in self.per_image if side < self.defs[n].min_size
        ]

    @torch.no_grad()
    def score(self, sr: torch.Tensor, gt: torch.Tensor) -> dict[str, list[float]]:
        """Per-image scores of SR (B, 3, H, W) against GT (same shape), both in [0, 1]; NR metrics see SR only.

        A metric that fails raises MetricError naming it and the size."""
        if sr.shape != gt.shape:
            raise ValueError(f"SR {tuple(sr.shape)} and GT {tuple(gt.shape)} differ in shape")
        sr = sr.to(self.device, torch.float32).clamp(0, 1)
        gt = gt.to(self.device, torch.float32).clamp(0, 1)
        out = {}
        for name in self.per_image:
            model = self.models[name]
            try:
                value = model(sr, gt) if self.defs[name].mode == "fr" else model(sr)
            except (RuntimeError, ValueError) as exc:
                size = "x".join(str(s) for s in sr.shape[-1:-3:-1])
                raise MetricError(f"{name} failed on a {size} image: {type(exc).__name__}: {exc}") from exc
            out[name] = [float(v) for v in torch.as_tensor(value).reshape(sr.shape[0], -1)[:, 0]]
        return out

    def score_folders(self, sr_dir: str | Path, gt_dir: str | Path) -> dict[str, float]:
        """Distribution metrics (FID) of the SR folder against the GT folder."""
        out = {}
        for name in self.folder:
            value = self.models[name](str(sr_dir), str(gt_dir), **self.defs[name].call_options)
            out[name] = float(value)
        return out
