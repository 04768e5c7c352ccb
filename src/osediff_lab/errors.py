"""Errors a user can act on: each message names the config key or file and the fix."""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


class ConfigError(ValueError):
    """A configuration that cannot work, detected before training starts."""


class MissingWeightsError(FileNotFoundError):
    """A weight file or directory the run needs is not on disk."""


USER_ERRORS = (ConfigError, MissingWeightsError)


def user_errors(main: Callable[..., T]) -> Callable[..., T]:
    """For a CLI's entry point (under ``@hydra.main``): a ConfigError or MissingWeightsError, whose message
    already names the key and the fix, is logged once (console and the job's log file) without a traceback
    and the exit status is 2. In a Hydra multirun it then propagates, so the sweep handles that job as Hydra does."""

    @functools.wraps(main)
    def wrapper(*args, **kwargs) -> T:
        try:
            return main(*args, **kwargs)
        except USER_ERRORS as exc:
            from hydra.core.hydra_config import HydraConfig
            from hydra.types import RunMode

            logging.getLogger(main.__module__).error("%s", exc)
            if HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN:
                raise
            raise SystemExit(2) from None

    return wrapper
