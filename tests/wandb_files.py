"""Tests' reader of W&B offline run files (``run-<id>.wandb``), to check what W&B holds against the CSV journal.

W&B ships no reader of these files (``wandb sync`` uploads them), so the tests read the format themselves:
a LevelDB-style log (a 7-byte header ":W&B", 0xBEE1, version; 32 KiB blocks of chunks, each with a 7-byte
header: CRC-32 over type byte + data, length, type full/first/middle/last) of ``wandb_internal_pb2.Record``
protobufs. The lab itself never reads them (osediff_lab.lit.loggers)."""

from __future__ import annotations

import json
import math
import struct
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

BLOCK = 32768
HEADER = 7
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def read_records(path: Path) -> Iterator[bytes]:
    """The serialized records of one .wandb file, CRC-checked; an error at a torn or corrupt chunk."""
    data = path.read_bytes()
    if len(data) < HEADER or data[:4] != b":W&B" or struct.unpack("<H", data[4:6])[0] != 0xBEE1:
        raise ValueError(f"{path} is not a W&B run file")
    pos, pending = HEADER, b""
    while pos + HEADER <= len(data):
        room = BLOCK - pos % BLOCK
        if room < HEADER:  # block trailer padding
            pos += room
            continue
        crc, length, kind = struct.unpack("<IHB", data[pos : pos + HEADER])
        chunk = data[pos + HEADER : pos + HEADER + length]
        if len(chunk) < length or zlib.crc32(chunk, zlib.crc32(bytes([kind]))) & 0xFFFFFFFF != crc:
            raise ValueError(f"{path}: torn or corrupt chunk at byte {pos}")
        pos += HEADER + length
        if kind == FULL:
            yield chunk
        elif kind == FIRST:
            pending = chunk
        elif kind == MIDDLE:
            pending += chunk
        elif kind == LAST:
            yield pending + chunk
            pending = b""


def read_history(wandb_dir: Path, run_id: str) -> list[dict[str, Any]]:
    """Every history row of run ``run_id`` in the offline run folders under ``wandb_dir`` (what `wandb sync` of
    that folder uploads), in the order the attempts wrote them: {"_step": n, key: value, ...}."""
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
