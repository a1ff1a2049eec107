"""Run one ``portfwd sync`` in-process, without libvirt, and report its timing.

Usage: sync_run.py CONFIG RUNDIR GUEST...

Loads CONFIG, then, holding the lock on RUNDIR, syncs the named guests as
the running ones (one nftables transaction). Prints one JSON line on stdout:
``{"load_ms": ..., "sync_ms": ..., "sync_cpu_ms": ..., "bindings": ...}`` (CPU time:
user + system of this process, which a busy machine disturbs less than wall time).
"""

import json
import sys
import time

from portfwd.rundir import state
from portfwd.engine import wholehost
from portfwd.config import load
from portfwd.engine import Engine
from portfwd.config.model import Guest


def main() -> int:
    path, rundir, names = sys.argv[1], sys.argv[2], sys.argv[3:]
    t0 = time.perf_counter()
    config = load(path)
    t1 = time.perf_counter()
    with state.locked(rundir):
        t2, c2 = time.perf_counter(), time.process_time()
        bindings = wholehost.sync(Engine(path, rundir), config, [Guest(n) for n in names]).applied
        t3, c3 = time.perf_counter(), time.process_time()
    print(json.dumps({"load_ms": (t1 - t0) * 1e3, "sync_ms": (t3 - t2) * 1e3,
                      "sync_cpu_ms": (c3 - c2) * 1e3, "bindings": len(bindings)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
