"""Markdown tables, the format every report of the package writes (core layer: imports nothing of the package)."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any


def markdown_table(header: list[str], rows: Iterable[Iterable[Any]], right: Iterable[int] = ()) -> list[str]:
    """The lines of a GitHub markdown table; cells are ``str()``-ed with ``|`` written as ``/`` (it would split
    the cell); columns listed in ``right`` are right-aligned (numbers)."""
    aligned = set(right)
    lines = ["| " + " | ".join(header) + " |", "|" + "".join("---:|" if i in aligned else "---|" for i in range(len(header)))]
    lines += ["| " + " | ".join(str(cell).replace("|", "/") for cell in row) + " |" for row in rows]
    return lines
