"""Every portfwd benchmark in one run, each figure beside its floor or reference and
its target (see bench/README.md). Run through ``bench/run`` as root.

Parts, in this order (each is also a script of its own):
1. bench.py     hook started/stopped vs floors, +10k others, sync of 10,000 forwards
2. ranges.py    applying a full-range forward (1-65535) vs a 1-port one
3. datapath.py  per new connection and per packet, 1 vs 10,000 forwards, full range
4. daemon.py    the daemon's memory, and a lease change until the forward is live
A report, not a test: it exits 0 even when a target is missed (marked MISS).
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
import time
from typing import Callable, List, Tuple

import bench
import daemon
import datapath
import ranges
from common import TMPFS, Row, require_root, table


COUNTED = (": nftables calls", ": subprocesses", ": run-dir writes")  # counts, not times


def from_bench(rows: List[bench.Row]) -> List[Row]:
    return [Row(r.what, r.median, "" if r.what.endswith(COUNTED) else "ms", r.floor, r.ratio,
                r.target, r.ok) for r in rows]


def main() -> int:
    if not require_root("bench/run"):
        return 2
    parts: List[Tuple[str, Callable[[str], List[Row]], str]] = [
        ("hooks and sync", lambda base: from_bench(bench.run(base)), bench.NOTES),
        ("full-range forward", ranges.run, ranges.NOTES),
        ("data path", datapath.run, datapath.NOTES),
        ("daemon", daemon.run, daemon.NOTES),
    ]
    only = set(sys.argv[1:])  # e.g. `bench/run datapath daemon`: those parts only
    names = {"hooks and sync": "bench", "full-range forward": "ranges", "data path": "datapath",
             "daemon": "daemon"}
    started = time.perf_counter()
    print("\n".join(bench.machine()), flush=True)
    digest = bench.source_digest()
    missed = []
    for title, run, notes in parts:
        if only and names[title] not in only:
            continue
        t0 = time.perf_counter()
        tmp = tempfile.mkdtemp(prefix="pfbench.", dir=TMPFS if os.path.isdir(TMPFS) else None)
        os.chmod(tmp, 0o755)
        try:
            rows = run(os.path.join(tmp, "part"))
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        print(f"\n== {title} ({time.perf_counter() - t0:.0f} s)\n")
        print(table(rows))
        print()
        print(notes, flush=True)
        missed += [r.what for r in rows if r.ok is False]
    print(f"\ntargets missed: {len(missed)}" + "".join(f"\n  {m}" for m in missed))
    if bench.source_digest() != digest:
        print("NOTE: the portfwd sources changed during the run; figures may mix versions")
    print(f"total {time.perf_counter() - started:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
