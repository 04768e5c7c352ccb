"""Experiment loggers: W&B (offline by default) that never stops a job, over a CSV journal of every row.

Every row goes to ``csv/metrics.csv`` first (written and flushed as it is logged, earlier attempts' rows kept),
then to W&B with ``step`` = the trainer's step, so all attempts of a run (same W&B id, ``resume="allow"``) form
one strictly increasing history. When W&B fails mid-run (its service killed with the job's processes on a
Slurm requeue, a full disk, a network error) the job goes on, says so once, and the next attempt sends W&B the
rows it is missing from the journal. What W&B holds is known only through what W&B supports: ``run.step`` of
a resumed run (online) and a run closed by ``finish()``, which has written all its rows; this logger records
the latter in ``wandb_delivered.json``. An offline attempt that ended without ``finish()`` may hold any part
of its rows, so the next attempt moves its folder out of ``wandb/`` (to ``wandb_unfinished/``, which
``wandb sync`` of ``wandb/`` leaves out) and sends everything after the last finished attempt again."""

from __future__ import annotations

import csv
import io
import json
import logging
import os
import shutil
import time
import uuid
from argparse import Namespace
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from lightning_fabric.loggers.logger import rank_zero_experiment
from lightning_fabric.utilities.rank_zero import rank_zero_only
from omegaconf import DictConfig, OmegaConf
from pytorch_lightning.core.saving import save_hparams_to_yaml
from pytorch_lightning.loggers import CSVLogger, Logger, WandbLogger

from osediff_lab.build import build, checked_by
from osediff_lab.io import atomic_write_text

log = logging.getLogger(__name__)

STEP_KEY = "trainer/global_step"
DELIVERED = "wandb_delivered.json"  # in the run directory: the journal's steps finished W&B runs hold
UNFINISHED = "wandb_unfinished"  # in the run directory: offline W&B folders of attempts that never finished


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
    """CSV metrics under ``<run_dir>/csv``, each row on disk once logged, so a killed run loses no logged value."""
    return AppendingCSVLogger(save_dir=str(run_dir), name="csv", version="")


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
    (``config.overrides.<key>`` works for group choices such as ``method=osediff_no_vsd`` too). Dots in keys become
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
        self.sent_through = -1  # highest step sent to W&B in this attempt (or held before it)
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
        """Start (or resume) the W&B run, declare the step axes, and send the journal rows W&B is missing: those
        after the last finished attempt's and after a resumed online run's step, the unfinished offline attempts'
        folders set aside first (see module doc)."""
        run = self.experiment
        self.started = True
        for pattern in ("train/*", "val/*", "samples/*"):
            run.define_metric(pattern, step_metric=STEP_KEY)
        delivered = read_delivered(Path(self.save_dir))
        if run.offline:
            set_aside_unfinished(Path(self.save_dir), self.run_id, {*delivered["finished"], Path(run.dir).parent.name})
        self.held_through = self.sent_through = max(delivered["through_step"], int(run.step) - 1)
        missing = [(step, row) for step, row in journal_rows(Path(self.journal.log_dir)) if step > self.held_through]
        for step, row in missing:
            self._send(row, step)
        if missing:
            self.held_through = missing[-1][0]
            log.warning("sent W&B %d rows (steps %d-%d) an earlier attempt could not deliver", len(missing),
                        missing[0][0], missing[-1][0])

    def _send(self, metrics: Mapping[str, Any], step: int) -> None:
        self.experiment.log(dict(metrics, **{STEP_KEY: step}), step=step)
        self.sent_through = max(self.sent_through, step)

    @rank_zero_only
    def log_metrics(self, metrics: Mapping[str, Any], step: int | None = None) -> None:
        step = self.last_step if step is None else step
        self.last_step = max(self.last_step, step)
        scalars = {k: x for k, v in metrics.items() if (x := _scalar(v)) is not None}
        if scalars:
            self.journal.log_metrics(scalars, step)
            self.journal.save()
        if step > self.held_through:  # rows a resumed attempt replays (after a SIGKILL) W&B has already
            self._guard("log", lambda: self._send(dict(metrics) | histograms(metrics), step))

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
        """Finish this attempt's W&B run (its rows written to the run files) and record what it holds; never raises."""
        if not self.started or self.broken is not None:
            return
        run = self.experiment
        folder = Path(run.dir).parent.name
        self._guard("finish", run.finish)
        if self.broken is None:
            record_delivered(Path(self.save_dir), self.sent_through, folder)


def histograms(metrics: Mapping[str, Any]) -> dict[str, Any]:
    """The many-valued tensors of ``metrics`` (a discriminator's logits) as ``wandb.Histogram``s: W&B only, never
    journaled (an attempt's replay from the journal sends scalars)."""
    import wandb

    return {k: wandb.Histogram(v.detach().float().cpu().numpy()) for k, v in metrics.items()
            if hasattr(v, "numel") and v.numel() > 1}


def _scalar(value: Any) -> float | None:
    """A plain number for the CSV journal (tensors of one element included), else None (images, tables)."""
    if hasattr(value, "numel") and value.numel() == 1:
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value)


class AppendingCSVLogger(CSVLogger):
    """CSVLogger whose metrics.csv is a journal (``CSVJournal``): each row written as it is logged, the rows of
    earlier attempts kept (Lightning's own writer deletes the file when it starts, losing every row logged
    before a kill)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.writer: CSVJournal | None = None

    @property
    @rank_zero_experiment
    def experiment(self) -> CSVJournal:
        if self.writer is None:
            self.writer = CSVJournal(Path(self.log_dir))
        return self.writer

    @rank_zero_only
    def log_metrics(self, metrics: Mapping[str, Any], step: int | None = None) -> None:
        """One row of the scalars of ``metrics`` (histograms are W&B's)."""
        self.experiment.log_metrics({k: v for k, v in metrics.items() if _scalar(v) is not None}, step)

    @rank_zero_only
    def log_hyperparams(self, params: Mapping[str, Any] | Namespace | None = None, *args: Any, **kwargs: Any) -> None:
        self.experiment.log_hparams(vars(params) if isinstance(params, Namespace) else dict(params or {}))

    @rank_zero_only
    def save(self) -> None:
        """Nothing to do: every row is on disk once logged."""

    @rank_zero_only
    def finalize(self, status: str) -> None:
        """Nothing to do: every row is on disk once logged."""


class CSVJournal:
    """``<log_dir>/metrics.csv``, one row per ``log_metrics`` call (a ``step`` column and one per key, sorted),
    appended and flushed at once; a key not seen before widens the header (the file is rewritten). Continues
    the file an earlier attempt wrote. Hyperparameters go to ``hparams.yaml`` beside it."""

    def __init__(self, log_dir: Path) -> None:
        self.log_dir = log_dir
        self.path = log_dir / "metrics.csv"
        log_dir.mkdir(parents=True, exist_ok=True)
        self.keys: list[str] = []
        if self.path.is_file():
            with open(self.path, newline="") as f:
                self.keys = next(csv.reader(f), [])
        self.rows = 0  # logged by this process (the step of a row logged without one)

    def log_metrics(self, metrics: Mapping[str, Any], step: int | None = None) -> None:
        row = {k: v.item() if hasattr(v, "item") else v for k, v in metrics.items()}
        row["step"] = self.rows if step is None else step
        self.rows += 1
        keys = sorted(set(self.keys) | set(row))
        if keys != self.keys and self.path.is_file():
            with open(self.path, newline="") as f:
                old = list(csv.DictReader(f))
            atomic_write_text(self.path, _csv_text(keys, old))
        elif not self.path.is_file():
            self.path.write_text(_csv_text(keys, []))
        self.keys = keys
        with open(self.path, "a", newline="") as f:
            csv.DictWriter(f, fieldnames=keys).writerow(row)

    def log_hparams(self, params: dict[str, Any]) -> None:
        save_hparams_to_yaml(self.log_dir / "hparams.yaml", params)

    def save(self) -> None:
        """Nothing to do: every row is on disk once logged."""


def _csv_text(keys: list[str], rows: list[dict[str, Any]]) -> str:
    """A CSV file's text: header ``keys``, then ``rows``."""
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=keys)
    writer.writeheader()
    writer.writerows(rows)
    return out.getvalue()


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


def read_delivered(run_dir: Path) -> dict[str, Any]:
    """What finished W&B runs of this run directory hold: ``{"through_step": n, "finished": [folder names]}``
    (through_step -1 and no folders before the first finished attempt)."""
    path = run_dir / DELIVERED
    return json.loads(path.read_text()) if path.is_file() else {"through_step": -1, "finished": []}


def record_delivered(run_dir: Path, through_step: int, folder: str) -> None:
    """Add a finished attempt: its W&B folder, and the journal's rows through ``through_step`` held."""
    delivered = read_delivered(run_dir)
    atomic_write_text(run_dir / DELIVERED, json.dumps({
        "through_step": max(delivered["through_step"], through_step),
        "finished": sorted({*delivered["finished"], folder}),
    }, indent=2))


def set_aside_unfinished(run_dir: Path, run_id: str, keep: set[str]) -> list[Path]:
    """Move this run's offline W&B folders not in ``keep`` (attempts that never finished) from ``wandb/`` to
    ``wandb_unfinished/``; their rows are sent again from the journal. Returns the new places."""
    moved = []
    for folder in sorted((run_dir / "wandb").glob(f"offline-run-*-{run_id}")):
        if folder.name not in keep:
            (run_dir / UNFINISHED).mkdir(exist_ok=True)
            moved.append(Path(shutil.move(str(folder), str(run_dir / UNFINISHED / folder.name))))
    if moved:
        log.warning("W&B: %d attempt(s) of this run ended without finishing their offline run; their folders "
                    "moved to %s (left out of `wandb sync`), their rows sent again from the CSV journal",
                    len(moved), run_dir / UNFINISHED)
    return moved
