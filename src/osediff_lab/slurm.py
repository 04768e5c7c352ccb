"""Sweeps through submitit that fail loudly: Hydra launchers (``hydra/launcher=slurm_cpu|slurm_gpu|local``)
that check a Slurm request against ``sinfo`` before submitting, re-raise a job's failure inside the job
(so it leaves its traceback in its own log and a non-zero exit code), follow every job through
preemption and requeue, and end the sweep with a table of jobs: finished / failed (reason) / requeued."""

from __future__ import annotations

import json
import logging
import os
import re
import subprocess
import time
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from hydra.core.singleton import Singleton
from hydra.core.utils import JobReturn, JobStatus, filter_overrides
from hydra_plugins.hydra_submitit_launcher.config import BaseQueueConf

from osediff_lab.errors import ConfigError
from osediff_lab.io import atomic_write_text
from osediff_lab.tables import markdown_table

log = logging.getLogger(__name__)

# Slurm states after which a job without a result will never produce one.
ENDED = {"BOOT_FAIL", "CANCELLED", "COMPLETED", "DEADLINE", "FAILED", "NODE_FAIL", "OUT_OF_MEMORY", "TIMEOUT"}
# Pending reasons that no amount of waiting resolves.
HOPELESS = {"PartitionConfig", "PartitionNodeLimit", "PartitionTimeLimit", "BadConstraints", "InvalidAccount",
            "InvalidQOS", "ReqNodeNotAvail"}
POLL_S = float(os.environ.get("OSEDIFF_SWEEP_POLL_S", "5"))


# ---- the request against sinfo ---------------------------------------------------------------------
@dataclass
class Node:
    """One node of a partition as sinfo reports it."""

    name: str
    partitions: list[str]
    cpus: int
    mem_mb: int
    gpus: int


def parse_gpus(gres: str) -> int:
    """GPU count in a GRES string such as ``gpu:4``, ``gpu:a100:8(S:0-1)`` or ``(null)``."""
    total = 0
    for part in gres.split(","):
        gres_parts = re.sub(r"\(.*?\)", "", part).split(":")
        if gres_parts[0] == "gpu" and len(gres_parts) > 1 and gres_parts[-1].isdigit():
            total += int(gres_parts[-1])
    return total


def sinfo_nodes() -> tuple[list[Node], str | None]:
    """Every node with its partitions, and the default partition (marked ``*`` by sinfo)."""
    try:
        out = subprocess.run(["sinfo", "-h", "-N", "-o", "%P|%N|%c|%m|%G"], capture_output=True, text=True,
                             timeout=60, check=True).stdout
    except FileNotFoundError:
        raise ConfigError("hydra/launcher=slurm*: `sinfo` not found; submit from a Slurm login node, or use "
                          "hydra/launcher=local") from None
    except subprocess.CalledProcessError as exc:
        raise ConfigError(f"hydra/launcher=slurm*: `sinfo` failed ({exc.stderr.strip()}); is Slurm up?") from None
    nodes: dict[str, Node] = {}
    default = None
    for line in out.splitlines():
        part, name, cpus, mem, gres = line.strip().split("|")
        if part.endswith("*"):
            part = default = part.rstrip("*")
        node = nodes.setdefault(name, Node(name, [], int(cpus), int(re.sub(r"\D", "", mem) or 0), parse_gpus(gres)))
        node.partitions.append(part)
    return list(nodes.values()), default


def request_problems(params: dict[str, Any], nodes: list[Node], default: str | None) -> list[str]:
    """What in a launcher request (``hydra.launcher.*``) no node of its partition can give, each naming its key."""
    partition = params.get("partition") or default
    known = sorted({p for n in nodes for p in n.partitions})
    if partition is None:
        return [f"hydra.launcher.partition is not set and Slurm has no default partition (partitions: {known})"]
    if partition not in known:
        return [f"hydra.launcher.partition={partition}: no such partition (sinfo lists {known})"]
    members = [n for n in nodes if partition in n.partitions]
    tasks = int(1 if params.get("tasks_per_node") is None else params["tasks_per_node"])
    cpus = int(params.get("cpus_per_task") or 1) * tasks
    mem_mb = int(float(params.get("mem_gb") or 0) * 1024)
    gpus = int(params.get("gpus_per_node") or 0) or parse_gpus(str(params.get("gres") or ""))
    wanted_nodes = int(params.get("nodes") or 1)
    problems = []
    if tasks < 1:
        problems.append(f"hydra.launcher.tasks_per_node={tasks} must be >= 1 (it follows trainer.devices)")
    checks = [
        ("cpus_per_task", f"{params.get('cpus_per_task')} x tasks_per_node={tasks} = {cpus} CPUs", cpus,
         max(n.cpus for n in members), "CPUs"),
        ("mem_gb", f"{params.get('mem_gb')} ({mem_mb} MB)", mem_mb, max(n.mem_mb for n in members), "MB"),
        ("gpus_per_node", f"{gpus} GPUs", gpus, max(n.gpus for n in members), "GPUs"),
    ]
    for key, asked, need, best, unit in checks:
        if need > best:
            problems.append(f"hydra.launcher.{key}={asked} per node, but the largest node of partition "
                            f"'{partition}' has {best} {unit}")
    fitting = [n for n in members if n.cpus >= cpus and n.mem_mb >= mem_mb and n.gpus >= gpus]
    if not problems and len(fitting) < wanted_nodes:
        problems.append(f"hydra.launcher.nodes={wanted_nodes}, but only {len(fitting)} node(s) of partition "
                        f"'{partition}' fit cpus_per_task x tasks_per_node={cpus}, mem_gb={params.get('mem_gb')}, "
                        f"gpus_per_node={gpus}")
    return problems


def check_request(params: dict[str, Any]) -> None:
    """Stop before submitting when the request cannot run on this cluster (it would pend forever)."""
    nodes, default = sinfo_nodes()
    problems = request_problems(params, nodes, default)
    if problems:
        raise ConfigError("the Slurm request does not fit this cluster:\n  " + "\n  ".join(problems))


# ---- following jobs ----------------------------------------------------------------------------------
@dataclass
class JobRecord:
    """What the sweep saw of one job."""

    num: int
    overrides: list[str]
    job_id: str
    state: str = "SUBMITTED"
    restarts: int = 0
    result: str = ""  # finished | failed
    reason: str = ""
    summary: dict = field(default_factory=dict)


def slurm_states(job_ids: list[str]) -> dict[str, dict[str, str]]:
    """``scontrol show job`` fields (JobState, Reason, Restarts, ExitCode) per job id; {} when unavailable."""
    out: dict[str, dict[str, str]] = {}
    for array_id in sorted({j.split("_")[0] for j in job_ids}):
        try:
            text = subprocess.run(["scontrol", "-o", "show", "job", array_id], capture_output=True, text=True,
                                  timeout=60).stdout
        except (FileNotFoundError, subprocess.TimeoutExpired):
            return {}
        for line in text.splitlines():
            info = dict(re.findall(r"(\w+)=(\S*)", line))
            task = info.get("ArrayTaskId", "")
            key = f"{info.get('ArrayJobId')}_{task}" if task.isdigit() else info.get("JobId", "")
            out[key] = info
    return out


def failure_reason(exc: BaseException) -> str:
    """The last line of a job's traceback (``ConfigError: method.vsd_weight=-1 ...``), not submitit's framing."""
    lines = [ln.strip() for ln in str(exc).splitlines()]
    starts = [i for i, ln in enumerate(lines) if re.match(r"^[\w.]+(Error|Exception|Exit)\b.*:", ln)]
    if not starts:
        return next((ln for ln in lines if ln), type(exc).__name__)[:300]
    message = []
    for ln in lines[starts[-1]:]:  # the exception line and its message's further lines, up to submitit's framing
        if set(ln) <= {"-"} and ln or ln.startswith("You can check full logs"):
            break
        message.append(ln)
    return " ".join(m for m in message if m)[:300]


def jobs_table(records: list[JobRecord]) -> str:
    """Markdown table of the sweep's jobs: the overrides that differ between them, the result (finished /
    failed, and how often the job was preempted and requeued), attempts of the run, reason of a failure."""
    seen: dict[str, set[str]] = {}
    for r in records:
        for o in filter_overrides(r.overrides):
            seen.setdefault(o.partition("=")[0], set()).add(o)
    varying = {k for k, v in seen.items() if len(v) > 1 or len(records) == 1}
    rows = []
    for r in records:
        shown = [o for o in filter_overrides(r.overrides) if o.partition("=")[0] in varying]
        attempts = r.summary.get("attempts", r.restarts + 1)
        result = r.result + (f", preempted and requeued {r.restarts}x" if r.restarts else "")
        rows.append([r.num, r.job_id, " ".join(shown), result, attempts, r.reason])
    return "\n".join(markdown_table(["#", "job", "overrides", "result", "attempts", "reason"], rows)) + "\n"


class FailedSweepJob(RuntimeError):
    """A job of the sweep failed; the message is its reason."""


class CheckedSweep:
    """What our launchers (``hydra_plugins.osediff_lab_launcher``) add to hydra-submitit's: failures raised
    inside the job, the request checked before submitting, jobs followed to the end and tabled."""

    params: dict[str, Any]
    config: Any
    executor_name = "local"  # submitit's cluster name

    def __call__(self, sweep_overrides: list[str], job_dir_key: str, job_num: int, job_id: str,
                 singleton_state: dict[type, Singleton]) -> JobReturn:
        """Run one job; a failed task is raised here, inside the job, so submitit records it as an error
        (the job's stderr gets the traceback, its exit code is non-zero) instead of a 'success'."""
        ret = super().__call__(sweep_overrides, job_dir_key, job_num, job_id, singleton_state)
        if ret.status == JobStatus.FAILED:
            _ = ret.return_value  # raises the task's exception
        return ret

    def launch(self, job_overrides: list[list[str]], initial_job_idx: int) -> list[JobReturn]:
        import submitit

        executor_name = self.executor_name
        self.check_before_submit()
        folder = self.params["submitit_folder"]
        executor = submitit.AutoExecutor(folder=folder, cluster=executor_name,
                                         **({f"{executor_name}_max_num_timeout": self.params["max_num_timeout"]}
                                            if "max_num_timeout" in self.params else {}))
        base = {f.name for f in fields(BaseQueueConf)}
        executor.update_parameters(**{k if k in base else f"{executor_name}_{k}": v for k, v in self.params.items()
                                      if k not in ("submitit_folder", "max_num_timeout")})
        sweep_dir = Path(str(self.config.hydra.sweep.dir))
        sweep_dir.mkdir(parents=True, exist_ok=True)
        nums = [initial_job_idx + i for i in range(len(job_overrides))]
        args = [(list(o), "hydra.sweep.dir", n, f"job_id_for_{n}", Singleton.get_state())
                for o, n in zip(job_overrides, nums, strict=True)]
        jobs = executor.map_array(self, *zip(*args, strict=True))
        records = [JobRecord(n, list(o), str(j.job_id)) for n, o, j in zip(nums, job_overrides, jobs, strict=True)]
        for r in records:
            log.info("submitted #%d as job %s: %s", r.num, r.job_id, " ".join(filter_overrides(r.overrides)))
        returns = self.follow(jobs, records, sweep_dir)
        table = jobs_table(records)
        log.info("sweep jobs (also in %s):\n%s", sweep_dir / "jobs.md", table)
        print(f"\nosediff-lab: sweep jobs\n{table}", flush=True)
        atomic_write_text(sweep_dir / "jobs.md", table)
        atomic_write_text(sweep_dir / "jobs.json", json.dumps([r.__dict__ for r in records], indent=1, default=str))
        return returns

    def check_before_submit(self) -> None:
        """Stop before submitting a request the cluster cannot run (Slurm: checked with sinfo)."""
        if self.executor_name == "slurm":
            check_request(self.params)

    def follow(self, jobs: list[Any], records: list[JobRecord], sweep_dir: Path) -> list[JobReturn]:
        """Wait for every job, reporting state changes, requeues and failures as they happen."""
        returns: dict[int, JobReturn] = {}
        ended_without_result: dict[int, float] = {}
        while len(returns) < len(jobs):
            states = slurm_states([r.job_id for r in records]) if self.executor_name == "slurm" else {}
            for i, (job, rec) in enumerate(zip(jobs, records, strict=True)):
                if i in returns:
                    continue
                info = states.get(rec.job_id) or {}  # {} when scontrol did not answer this poll
                self._observe(rec, info)
                if job.done():
                    returns[i] = self._collect(job, rec)
                elif rec.state in ENDED:
                    first = ended_without_result.setdefault(i, time.monotonic())
                    if time.monotonic() - first > 3 * POLL_S:  # give the result file time to appear
                        returns[i] = self._fail(rec, f"Slurm says {rec.state} (exit {info.get('ExitCode', '?')}) "
                                                     "and the job left no result")
                elif rec.state == "PENDING" and info.get("Reason") in HOPELESS:
                    subprocess.run(["scancel", rec.job_id], check=False, timeout=60)
                    returns[i] = self._fail(rec, f"cancelled: pending with reason {info['Reason']}, "
                                                 "which waiting does not resolve")
            if len(returns) < len(jobs):
                time.sleep(POLL_S)
        return [returns[i] for i in range(len(jobs))]

    @staticmethod
    def _observe(rec: JobRecord, info: dict[str, str] | None) -> None:
        if not info:
            return
        state, restarts = info.get("JobState", "UNKNOWN"), int(info.get("Restarts", "0") or 0)
        if restarts > rec.restarts:
            log.warning("job %s (#%d) was preempted and requeued (attempt %d)", rec.job_id, rec.num, restarts + 1)
        if state != rec.state:
            log.info("job %s (#%d): %s%s", rec.job_id, rec.num, state,
                     f" ({info.get('Reason')})" if info.get("Reason") not in (None, "None") else "")
        rec.state, rec.restarts = state, max(rec.restarts, restarts)

    @staticmethod
    def _collect(job: Any, rec: JobRecord) -> JobReturn:
        try:
            ret = job.results()[0]
        except Exception as exc:
            return CheckedSweep._fail(rec, failure_reason(exc), exc)
        rec.result = "finished"
        rec.summary = ret.return_value if isinstance(ret.return_value, dict) else {}
        log.info("job %s (#%d) finished", rec.job_id, rec.num)
        return ret

    @staticmethod
    def _fail(rec: JobRecord, reason: str, exc: BaseException | None = None) -> JobReturn:
        rec.result, rec.reason = "failed", reason
        log.error("job %s (#%d) failed: %s", rec.job_id, rec.num, reason)
        ret = JobReturn(overrides=rec.overrides, status=JobStatus.FAILED)
        ret.return_value = FailedSweepJob(f"job {rec.job_id} ({' '.join(rec.overrides)}) failed: {reason}"
                                          + (f"\n{exc}" if exc is not None else ""))
        return ret
