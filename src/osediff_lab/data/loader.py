"""A DataLoader whose dead-worker detection survives more than one Lightning fit in a process.

torch notices a crashed worker through a SIGCHLD handler that it installs once per process, when the first
multi-worker iterator starts. Lightning's signal connector puts back, at the end of each fit, the handlers it
found when the fit began; after a first fit (a sweep's next job in the same process, evaluate after train)
SIGCHLD is back to the default and torch never installs its handler again, so a worker killed by the OOM
killer went unnoticed until ``data.worker_timeout_s`` (600 s) ran out. Each new iterator here remembers the
handler torch installed and puts it back where it was removed.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Callable, Iterator
from typing import Any

from torch.utils.data import DataLoader

_worker_death_handler: Callable[..., Any] | None = None


def keep_worker_death_handler() -> None:
    """Remember the SIGCHLD handler now installed, or reinstall the remembered one when SIGCHLD is default."""
    global _worker_death_handler
    if threading.current_thread() is not threading.main_thread():
        return  # signal handlers can only be set from the main thread; torch skips them there too
    current = signal.getsignal(signal.SIGCHLD)
    if callable(current):
        _worker_death_handler = current
    elif _worker_death_handler is not None:
        signal.signal(signal.SIGCHLD, _worker_death_handler)


class WatchedDataLoader(DataLoader):
    """DataLoader that keeps torch's dead-worker SIGCHLD handler in place (see the module docstring)."""

    def __iter__(self) -> Iterator[Any]:
        iterator = super().__iter__()
        if self.num_workers > 0:
            keep_worker_death_handler()
        return iterator
