"""`python -m osediff_lab.weights check|fetch [names]`: inspect or fill the weights cache.

``check`` prints one row per manifest entry: present / missing / corrupt. ``fetch`` downloads on a connected
machine (login node); names may be entries or groups (e.g. ``metrics``, ``sd21_base``, ``lpips_vgg``).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from rich.console import Console
from rich.table import Table

from osediff_lab.errors import ConfigError
from osediff_lab.weights.cache import check_entry, default_weights_dir
from osediff_lab.weights.fetch import fetch_entry
from osediff_lab.weights.manifest import GROUPS, resolve_names


def check(names: list[str], cache: Path, verify_hash: bool, console: Console) -> int:
    """Print the status table; returns the number of entries that are not present."""
    table = Table(title=f"weights cache {cache}")
    for col in ("name", "state", "path", "detail"):
        table.add_column(col, overflow="fold")
    colours = {"present": "green", "missing": "yellow", "corrupt": "red"}
    bad = 0
    for entry in resolve_names(names):
        s = check_entry(entry, cache, verify_hash)
        bad += s.state != "present"
        table.add_row(entry.name, f"[{colours[s.state]}]{s.state}[/]", str(s.path), s.detail)
    console.print(table)
    return bad


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m osediff_lab.weights", description=__doc__)
    parser.add_argument("--weights-dir", type=Path, default=None, help="cache dir (default: paths.weights_dir / OSEDIFF_WEIGHTS)")
    sub = parser.add_subparsers(dest="command", required=True)
    p_check = sub.add_parser("check", help="present / missing / corrupt per entry")
    p_check.add_argument("names", nargs="*", help=f"entries or groups ({', '.join(sorted(GROUPS))}, all)")
    p_check.add_argument("--no-hash", action="store_true", help="skip sha256 verification (big files take a while)")
    p_fetch = sub.add_parser("fetch", help="download into the cache (needs network)")
    p_fetch.add_argument("names", nargs="*", help="entries or groups (default: all)")
    args = parser.parse_args(argv)
    cache = (args.weights_dir or default_weights_dir()).expanduser()
    console = Console()
    try:
        if args.command == "check":
            return 1 if check(args.names, cache, not args.no_hash, console) else 0
        failed = 0
        for entry in resolve_names(args.names):
            try:
                console.print(fetch_entry(entry, cache))
            except OSError as exc:
                failed += 1
                console.print(f"[red]{entry.name}: {exc}[/]")
        return 1 if failed else 0
    except ConfigError as exc:
        console.print(f"[red]{exc}[/]")
        return 2


if __name__ == "__main__":
    sys.exit(main())
