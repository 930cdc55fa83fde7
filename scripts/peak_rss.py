"""Run a command and report the peak resident memory of its whole process tree.

Samples /proc every 0.2 s: the peak of the tree's summed RSS, and the peak of
its largest single process (a Dask worker, say). Linux only.

    python scripts/peak_rss.py -- funkflow generate --scale 1 --out /tmp/netflix
"""

from __future__ import annotations

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
    argv = sys.argv[1:]
    if argv[:1] == ["--"]:
        argv = argv[1:]
    if not argv:
        print(__doc__, file=sys.stderr)
        return 2
    began = time.perf_counter()
    proc = subprocess.Popen(argv)
    peak_total = peak_single = 0
    while proc.poll() is None:
        sizes = _tree_rss(proc.pid)
        peak_total = max(peak_total, sum(sizes))
        peak_single = max(peak_single, max(sizes, default=0))
        time.sleep(0.2)
    gib = 1024**3
    print(f"exit {proc.returncode}; {time.perf_counter() - began:.1f}s; peak RSS of the process tree "
          f"{peak_total / gib:.2f} GiB, of its largest process {peak_single / gib:.2f} GiB", file=sys.stderr)
    return proc.returncode


if __name__ == "__main__":
    sys.exit(main())
