"""`estat-wal`: the operator's look at the write-ahead log (ACK_MODE=durable).

    estat-wal [--wal-dir DIR] list|verify

`list` prints one line per segment (in WAL_DIR and its worker subfolders
w<i>, and under quarantine/): bytes, records, events, batch cuts and its
state. `verify` reads every segment the same way and exits 1 if one is
corrupt (a torn tail is normal after a crash: the next start cuts it off).
WAL_DIR comes from the option, else the environment, else the default.
Both only read: they are safe while the server runs.

Exit codes: 0 fine, 1 a segment is corrupt, 2 bad usage.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from typing import Optional, Sequence

from estat.config import option_named
from estat.wal.recovery import QUARANTINE
from estat.wal.segment import Scan, list_segments, read_segment, segment_name


def _folders(root: str) -> list[str]:
    """WAL_DIR, its worker subfolders, and their quarantine folders."""
    folders = [root]
    try:
        names = sorted(os.listdir(root))
    except FileNotFoundError:
        return []
    folders += [os.path.join(root, n) for n in names if re.fullmatch(r"w\d+", n)]
    return folders + [os.path.join(f, QUARANTINE) for f in folders
                      if os.path.isdir(os.path.join(f, QUARANTINE))]


def _state(found: Scan) -> str:
    if found.bad_header:
        return "CORRUPT: not a segment (bad header)"
    if found.corrupt_at is not None:
        return (f"CORRUPT at byte {found.corrupt_at} "
                f"({found.size - found.corrupt_at} bytes after it unreadable)")
    if found.torn_at is not None:
        return f"torn tail at byte {found.torn_at} (cut off at the next start)"
    return "ok"


def run(argv: Optional[Sequence[str]] = None, out=sys.stdout, err=sys.stderr) -> int:  # type: ignore[no-untyped-def]
    parser = argparse.ArgumentParser(
        prog="estat-wal", description="List and verify estat-ingest write-ahead log segments.",
        epilog="Exit codes: 0 fine, 1 a segment is corrupt, 2 bad usage.")
    wal_dir = option_named("wal-dir")
    parser.add_argument("--wal-dir", default=None, metavar="DIR",
                        help=f"{wal_dir.help} [env {wal_dir.env}, default {wal_dir.default}]")
    parser.add_argument("command", choices=("list", "verify"))
    args = parser.parse_args(argv)
    root = args.wal_dir or os.environ.get(wal_dir.env, "").strip() or wal_dir.default
    corrupt = 0
    total = 0
    for folder in _folders(root):
        for segment in list_segments(folder):
            path = os.path.join(folder, segment_name(segment))
            try:
                found = read_segment(path)
            except OSError as error:
                print(f"estat-wal: cannot read {path}: {error.strerror}", file=err)
                corrupt += 1
                continue
            total += 1
            state = _state(found)
            quarantined = os.path.basename(folder) == QUARANTINE
            if (found.bad_header or found.corrupt_at is not None) and not quarantined:
                corrupt += 1
            if args.command == "list" or state != "ok":
                print(f"{os.path.relpath(path, root)}  {found.size} bytes  "
                      f"{found.records} records  {found.event_count} events  "
                      f"{len(found.cuts)} cuts  {state}"
                      + ("  [quarantined]" if quarantined else ""), file=out)
    if args.command == "verify":
        print(f"{total} segments, {corrupt} corrupt", file=out)
    return 1 if corrupt else 0


def main() -> None:
    sys.exit(run())
