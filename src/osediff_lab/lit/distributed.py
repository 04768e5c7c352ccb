"""Small torch.distributed helpers that are no-ops in a single process: rank, gathering, gradient averaging."""

from __future__ import annotations

from typing import Any

import torch


def _active() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def rank_and_world() -> tuple[int, int]:
    """(global rank, world size) of this process; (0, 1) outside a process group."""
    if not _active():
        return 0, 1
    return torch.distributed.get_rank(), torch.distributed.get_world_size()


def gather_objects(obj: Any) -> list[Any]:
    """``obj`` of every rank, in rank order (a collective: every rank must call it); ``[obj]`` alone."""
    _, world = rank_and_world()
    if world == 1:
        return [obj]
    out: list[Any] = [None] * world
    torch.distributed.all_gather_object(out, obj)
    return out


def own_rank_state(saved: Any, key: str) -> Any | None:
    """This rank's entry of a state saved by ``gather_objects`` under ``{"ranks": [...]}``; a state saved
    before per-rank states existed (one plain state) is taken by rank 0 only. None when absent."""
    rank, _ = rank_and_world()
    states = saved["ranks"] if isinstance(saved, dict) and "ranks" in saved else [saved]
    if rank >= len(states):
        import logging

        logging.getLogger(__name__).warning(
            "%s: the checkpoint holds %d rank states; rank %d starts a fresh stream", key, len(states), rank
        )
        return None
    return states[rank]
