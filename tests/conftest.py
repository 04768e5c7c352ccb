"""Shared fixtures: composed configs for the tiny preset, the shared/ data location, quiet CPU runs."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from omegaconf import DictConfig

from helpers import REALSR, TINY, compose_config


@pytest.fixture
def tiny_cfg(tmp_path) -> DictConfig:
    return compose_config(TINY, tmp_path)


@pytest.fixture
def realsr() -> Path:
    if not (REALSR / "LR").is_dir():
        pytest.skip(f"RealSR benchmark not found at {REALSR} (../shared is absent in a fresh clone; CI has it)")
    return REALSR


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(scope="module")
def single_thread():
    """One intra-op thread for modules of many tiny-tensor ops: on a shared 2-core machine, thread
    hand-offs made each op ~50x slower than the op itself. Restored afterwards."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def pytest_configure(config) -> None:
    if os.environ.get("PYTEST_XDIST_WORKER"):  # `make test` runs one worker per core: one torch thread each
        torch.set_num_threads(1)
    config.addinivalue_line("markers", "slurm: sweeps on a running Slurm cluster (skipped without one; .ci/run starts it)")


# Files whose tests take minutes (kill/resume, DDP, Slurm sweeps, the README walk), longest first. xdist (make test,
# whole files per worker) hands files out by their number of tests and keeps this order among files of equal count;
# keeping it outright (--no-loadscope-reorder) measured slower, 23 min 17 s against 21 min 29 s, because the heavy
# multi-process files then ran side by side. A run without xdist starts with them.
LONGEST_FIRST = ("test_readme_commands.py", "test_slurm.py", "test_faults.py", "test_ddp.py", "test_backbone_matrix.py",
                 "test_memory.py", "test_preemption.py", "test_distributed.py", "test_methods.py", "test_backbones.py")


def pytest_collection_modifyitems(config, items) -> None:
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: order within a file is kept
