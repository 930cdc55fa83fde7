"""Run a command and report the peak resident memory of its whole process tree.

Samples /proc every 0.2 s: the peak of the tree's summed RSS, and the peak of
its largest single process (a Dask worker, say). Linux only. ``--trace FILE``
also writes every sample to FILE as CSV (seconds since start, local time, tree
GiB, largest process GiB), to line up with the command's log and find the stage
that holds the peak.

    python scripts/peak_rss.py [--trace rss.csv] -- funkflow generate --scale 1 --out /tmp/netflix
"""

from __future__ import annotations

import argparse
import contextlib
import os
import subprocess
import sys
import time
from pathlib import Path


def _tree_rss(root: int) -> list[int]:
    """RSS in bytes of ``root`` and all its descendants."""
    children: dict[int, list[int]] = {}
    rss: dict[int, int] = {}
    page = os.sysconf("SC_PAGE_SIZE")
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            statm = (entry / "statm").read_text().split()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2:].split()
        children.setdefault(int(fields[1]), []).append(int(entry.name))
        rss[int(entry.name)] = int(statm[1]) * page
    out, todo = [], [root]
    while todo:
        pid = todo.pop()
        out.append(rss.get(pid, 0))
        todo.extend(children.get(pid, []))
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--trace", type=Path, metavar="FILE", help="write every sample to FILE as CSV")
    parser.add_argument("command", nargs=argparse.REMAINDER, help="-- then the command to run")
    args = parser.parse_args()
    argv = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not argv:
        parser.error("no command given")
    gib = 1024**3
    began = time.perf_counter()
    proc = subprocess.Popen(argv)
    peak_total = peak_single = 0
    with open(args.trace, "w") if args.trace else contextlib.nullcontext() as trace:
        if trace:
            trace.write("seconds,time,tree_gib,largest_gib\n")
        while proc.poll() is None:
            sizes = _tree_rss(proc.pid)
            total, single = sum(sizes), max(sizes, default=0)
            peak_total, peak_single = max(peak_total, total), max(peak_single, single)
            if trace:
                trace.write(f"{time.perf_counter() - began:.1f},{time.strftime('%H:%M:%S')},"
                            f"{total / gib:.3f},{single / gib:.3f}\n")
            time.sleep(0.2)
    print(f"exit {proc.returncode}; {time.perf_counter() - began:.1f}s; peak RSS of the process tree "
          f"{peak_total / gib:.2f} GiB, of its largest process {peak_single / gib:.2f} GiB", file=sys.stderr)
    return proc.returncode


if __name__ == "__main__":
    sys.exit(main())
