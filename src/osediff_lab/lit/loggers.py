"""Experiment loggers: W&B (offline by default) that never stops a job, over a CSV journal of every row.

Every row goes to ``csv/metrics.csv`` first (flushed each step), then to W&B with ``step`` = the trainer's
step, so all attempts of a run (same W&B id, ``resume="allow"``) form one strictly increasing history.
When W&B fails mid-run (its service killed with the job's processes on a Slurm requeue, a full disk, a
network error) the job goes on, says so once, and the next attempt sends the rows W&B is missing, found
by reading the earlier attempts' offline run files back (``read_history``)."""

from __future__ import annotations

import csv
import json
import logging
import math
import os
import struct
import time
import uuid
import zlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from lightning_fabric.utilities.rank_zero import rank_zero_only
from omegaconf import DictConfig, OmegaConf
from pytorch_lightning.loggers import CSVLogger, Logger, WandbLogger
from pytorch_lightning.loggers.csv_logs import ExperimentWriter

from osediff_lab.build import build, checked_by

log = logging.getLogger(__name__)

STEP_KEY = "trainer/global_step"


# What build_logger offers a logger factory; each takes the ones its signature names.
OFFERED = ("run_dir", "run_config")
WANDB_MODES = ("online", "offline", "disabled", "shared", "dryrun", "run")
LOG_MODEL = (True, False, "all")


def build_logger(cfg: DictConfig, run_dir: Path) -> Logger:
    """The logger ``logger._target_`` names (``logger=csv|wandb`` or any factory), offered the run directory and
    the run's resolved config (with this job's overrides)."""
    run_config = OmegaConf.to_container(cfg, resolve=True) | {"overrides": job_overrides()}
    return build(cfg.logger, "logger", offer={"run_dir": Path(run_dir), "run_config": run_config})


def csv_logger(run_dir: Path) -> CSVLogger:
    """CSV metrics under ``<run_dir>/csv``, flushed every step, so a killed run loses no logged value."""
    return AppendingCSVLogger(save_dir=str(run_dir), name="csv", version="", flush_logs_every_n_steps=1)


def wandb_problems(args: Mapping[str, Any]) -> list[str]:
    """``logger.mode`` must be a W&B mode and ``logger.log_model`` true, false or all (W&B would refuse them later)."""
    problems = []
    if args.get("mode", "offline") not in WANDB_MODES:
        problems.append(f"logger.mode={args['mode']} must be one of {list(WANDB_MODES)} (or set WANDB_MODE)")
    if args.get("log_model", False) not in LOG_MODEL:
        problems.append(f"logger.log_model={args['log_model']} must be true, false or all")
    if not isinstance(args.get("tags", []), list):
        problems.append(f"logger.tags={args['tags']} must be a list: logger.tags='[a, b]'")
    return problems


@checked_by(wandb_problems)
def wandb_logger(
    run_dir: Path,
    run_config: Mapping[str, Any],
    project: str,
    group: str | None = None,
    tags: Sequence[str] = (),
    job_type: str = "train",
    mode: str = "offline",
    log_model: bool | str = False,
) -> Logger:
    """W&B (one run per run directory, resumed by later attempts) over the CSV journal; if W&B cannot start
    (no key online, an unwritable directory), warn once and log to CSV alone."""
    try:
        os.makedirs(run_dir, exist_ok=True)
        logger = JournaledWandbLogger(
            csv_logger(run_dir),
            project=project,
            group=group,
            tags=list(tags),
            job_type=job_type,
            save_dir=str(run_dir),
            mode=str(mode),
            id=_wandb_run_id(run_dir),
            resume="allow",
            log_model=log_model,
            config=dict(run_config),
        )
        if rank_zero_only.rank == 0:
            logger.start()  # start the run now, so a broken setup falls back here, not mid-training
        return logger
    except Exception as exc:  # any W&B failure must degrade to local logging
        log.warning("W&B logging unavailable (%s: %s); logging to CSV under %s instead", type(exc).__name__, exc, run_dir)
        return csv_logger(run_dir)


def job_overrides() -> dict[str, str]:
    """This Hydra job's command-line overrides as {key: value}: a sweep's arms, for grouping runs in W&B
    (``config.overrides.<key>`` works for group choices such as ``loss=no_vsd`` too). Dots in keys become
    slashes, as W&B reads dots in config keys as nesting."""
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        return {}
    pairs = (o.partition("=") for o in HydraConfig.get().overrides.task)
    return {override_key(k): v for k, _, v in pairs if not k.startswith("hydra")}


def override_key(key: str) -> str:
    """An override's key as the logger records it under ``config.overrides`` (``+a.b`` -> ``a/b``)."""
    return key.lstrip("+~").replace(".", "/")


def close_logger(logger: Logger | None) -> None:
    """Finish the W&B run of this job: wandb keeps one global run per process, and a sweep's next job
    in the same process would otherwise keep logging into it."""
    if isinstance(logger, JournaledWandbLogger):
        logger.close()


class JournaledWandbLogger(WandbLogger):
    """WandbLogger whose rows also go to a CSV journal and whose W&B calls never raise (see module doc)."""

    def __init__(self, journal: CSVLogger, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.journal = journal
        self.broken: str | None = None  # why W&B stopped taking data in this attempt
        self.held_through = -1  # highest step W&B held when this attempt started (rows at or below: not sent again)
        self.started = False
        self.last_step = -1  # step of the latest row: images and tables without a step join it
        self.run_id = str(kwargs["id"])

    def _guard(self, what: str, call: Callable[[], Any]) -> Any:
        """Run a W&B call; on the first failure say so once and stop calling W&B in this attempt."""
        if self.broken is not None:
            return None
        try:
            return call()
        except Exception as exc:
            self.broken = f"{type(exc).__name__}: {exc}"
            log.warning("W&B stopped working (%s, in %s): this attempt goes on logging to %s only; the next "
                        "attempt of this run sends W&B the rows it is missing", self.broken, what, self.journal.log_dir)
            return None

    def start(self) -> None:
        """Start (or resume) the W&B run, declare the step axes, and send rows earlier attempts could not."""
        run = self.experiment
        self.started = True
        for pattern in ("train/*", "val/*", "samples/*"):
            run.define_metric(pattern, step_metric=STEP_KEY)
        held = [int(row["_step"]) for row in read_history(Path(self.save_dir) / "wandb", self.run_id)]
        self.held_through = max([*held, int(run.step) - 1])
        missing = [(step, row) for step, row in journal_rows(Path(self.journal.log_dir)) if step > self.held_through]
        for step, row in missing:
            self._send(row, step)
        if missing:
            self.held_through = missing[-1][0]
            log.warning("sent W&B %d rows (steps %d-%d) an earlier attempt could not deliver", len(missing),
                        missing[0][0], missing[-1][0])

    def _send(self, metrics: Mapping[str, Any], step: int) -> None:
        self.experiment.log(dict(metrics, **{STEP_KEY: step}), step=step)

    @rank_zero_only
    def log_metrics(self, metrics: Mapping[str, Any], step: int | None = None) -> None:
        step = self.last_step if step is None else step
        self.last_step = max(self.last_step, step)
        scalars = {k: x for k, v in metrics.items() if (x := _scalar(v)) is not None}
        if scalars:
            self.journal.log_metrics(scalars, step)
            self.journal.save()
        if step > self.held_through:  # rows a resumed attempt replays (after a SIGKILL) W&B has already
            self._guard("log", lambda: self._send(metrics, step))

    @rank_zero_only
    def log_hyperparams(self, params: Any) -> None:
        self._guard("log_hyperparams", lambda: super(JournaledWandbLogger, self).log_hyperparams(params))

    @rank_zero_only
    def log_image(self, key: str, images: list[Any], step: int | None = None, **kwargs: Any) -> None:
        self._guard("log_image", lambda: super(JournaledWandbLogger, self).log_image(key, images, step, **kwargs))

    def after_save_checkpoint(self, checkpoint_callback: Any) -> None:
        self._guard("checkpoint artifact", lambda: super(JournaledWandbLogger, self).after_save_checkpoint(checkpoint_callback))

    @rank_zero_only
    def finalize(self, status: str) -> None:
        self._guard("finalize", lambda: super(JournaledWandbLogger, self).finalize(status))

    @rank_zero_only
    def close(self) -> None:
        """Finish this attempt's W&B run (its rows flushed to the run files); never raises."""
        if self.started and self.broken is None:
            self._guard("finish", lambda: self.experiment.finish())


def _scalar(value: Any) -> float | None:
    """A plain number for the CSV journal (tensors of one element included), else None (images, tables)."""
    if hasattr(value, "numel") and value.numel() == 1:
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value)


class AppendingCSVLogger(CSVLogger):
    """CSVLogger that continues an existing metrics.csv after a resume: Lightning's writer deletes
    the file when it starts, which would lose every row logged before a kill."""

    @property
    def experiment(self):
        if self._experiment is not None:
            return self._experiment
        path = Path(self.log_dir) / "metrics.csv"
        previous = path.read_bytes() if path.is_file() else None
        exp = super().experiment
        if previous and isinstance(exp, ExperimentWriter):  # non-zero ranks get Lightning's placeholder
            path.write_bytes(previous)
            header = next(csv.reader(previous.decode().splitlines()), [])
            exp.metrics_keys = sorted(set(exp.metrics_keys) | set(header))
        return exp


def journal_rows(csv_dir: Path) -> list[tuple[int, dict[str, float]]]:
    """The CSV journal's rows merged by step, in step order: (step, {key: value})."""
    path = csv_dir / "metrics.csv"
    if not path.is_file():
        return []
    by_step: dict[int, dict[str, float]] = {}
    with open(path, newline="") as f:
        for row in csv.DictReader(f):
            step = int(float(row.pop("step")))
            by_step.setdefault(step, {}).update({k: float(v) for k, v in row.items() if v not in ("", None)})
    return sorted(by_step.items())


def _wandb_run_id(run_dir: Path) -> str:
    """One W&B run per run directory: a resumed run continues the same W&B run. The first process to
    create the file wins (DDP ranks started together agree on one id)."""
    path = run_dir / "wandb_run_id.txt"
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    except FileExistsError:
        for _ in range(100):  # another rank is writing it right now
            text = path.read_text().strip()
            if text:
                return text
            time.sleep(0.05)
        raise RuntimeError(f"{path} is empty: delete it to start a new W&B run for {run_dir}") from None
    run_id = uuid.uuid4().hex[:8]
    with os.fdopen(fd, "w") as f:
        f.write(run_id)
    return run_id


# ---- reading W&B offline run files (run-<id>.wandb) back --------------------------------------------
# The files are a LevelDB-style log: a 7-byte file header (":W&B", magic 0xBEE1, version 0), then 32 KiB
# blocks of chunks, each with a 7-byte header (CRC-32 over type byte + data, length, type), where type
# says whether the chunk is a whole record or its first / middle / last piece. Records are protobufs.
_BLOCK = 32768
_HEADER = 7
_FULL, _FIRST, _MIDDLE, _LAST = 1, 2, 3, 4


def read_records(path: Path) -> Iterator[bytes]:
    """The serialized records of one .wandb file, CRC-checked; stops at a torn tail (a killed writer)."""
    data = path.read_bytes()
    if len(data) < _HEADER or data[:4] != b":W&B" or struct.unpack("<H", data[4:6])[0] != 0xBEE1:
        raise ValueError(f"{path} is not a W&B run file")
    pos, pending = _HEADER, b""
    while pos + _HEADER <= len(data):
        room = _BLOCK - pos % _BLOCK
        if room < _HEADER:  # block trailer padding
            pos += room
            continue
        crc, length, kind = struct.unpack("<IHB", data[pos : pos + _HEADER])
        chunk = data[pos + _HEADER : pos + _HEADER + length]
        if len(chunk) < length or zlib.crc32(chunk, zlib.crc32(bytes([kind]))) & 0xFFFFFFFF != crc:
            return
        pos += _HEADER + length
        if kind == _FULL:
            yield chunk
        elif kind == _FIRST:
            pending = chunk
        elif kind == _MIDDLE:
            pending += chunk
        elif kind == _LAST:
            yield pending + chunk
            pending = b""


def read_history(wandb_dir: Path, run_id: str) -> list[dict[str, Any]]:
    """Every history row of run ``run_id`` in the offline run folders under ``wandb_dir``, in the order
    the attempts wrote them: {"_step": n, key: value, ...}."""
    from wandb.proto import wandb_internal_pb2

    rows = []
    for path in sorted(wandb_dir.glob(f"offline-run-*-{run_id}/run-{run_id}.wandb")):
        for raw in read_records(path):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(raw)
            if record.WhichOneof("record_type") != "history":
                continue
            row = {}
            for item in record.history.item:
                key = item.key or "/".join(item.nested_key)
                row[key] = json.loads(item.value_json)
            row["_step"] = int(row.get("_step", record.history.step.num))
            rows.append(row)
    return rows


def history_matches_journal(history: list[dict[str, Any]], journal: list[tuple[int, dict[str, float]]]) -> list[str]:
    """Differences between W&B rows and the CSV journal (empty when every journal value is in W&B at
    its step, once, and W&B's steps strictly increase)."""
    problems = []
    steps = [row["_step"] for row in history]
    if any(b <= a for a, b in zip(steps, steps[1:], strict=False)):
        problems.append(f"W&B steps do not strictly increase: {steps}")
    by_step = {row["_step"]: row for row in history}
    for step, values in journal:
        row = by_step.get(step)
        if row is None:
            problems.append(f"step {step}: in the CSV, not in W&B")
            continue
        for key, value in values.items():
            got = row.get(key)
            if not isinstance(got, int | float) or not math.isclose(float(got), value, rel_tol=1e-6, abs_tol=1e-9):
                problems.append(f"step {step} {key}: CSV {value}, W&B {got}")
    extra = sorted(set(by_step) - {s for s, _ in journal})
    if extra:
        problems.append(f"steps in W&B, not in the CSV: {extra}")
    return problems
