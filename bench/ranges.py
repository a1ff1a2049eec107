"""portfwd benchmark, ranges: what applying a full-range forward costs beside a
1-port one.

Run as root: ``.venv/bin/python bench/ranges.py`` (see bench/README.md). In a
network namespace made for the run (removed at the end), the hook ``started`` and
``stopped`` of one guest with an IPv4 and an IPv6 address, once with
``ports = ["8080:80"]`` and once with ``ports = ["1-65535/tcp", "1-65535/udp"]``:
median wall time (including ``ip netns exec``) and peak resident memory of the hook
process (``/usr/bin/time -f %M``, the maximum over the runs), and the elements the
kernel holds after ``started``. What such a forward costs per connection and per
packet is measured by bench/datapath.py.
"""

from __future__ import annotations

import os
import sys
import time
from typing import Dict, List, Tuple

from common import GUEST4, GUEST6, HOOK, Row, Site, forward_toml, median, part_main, sh

HOOK_REPEATS = {"1 port": 15, "full range": 7}  # PFBENCH_REPEATS=N overrides both
SHAPES = {"1 port": ["8080:80"], "full range": ["1-65535/tcp", "1-65535/udp"]}
XML = b"<domain><name>web1</name><uuid>6b1f0c2e-0000-4000-8000-000000000001</uuid></domain>"


def hook(site: Site, op: str, sub: str) -> Tuple[float, int]:
    """One hook run: (wall ms, peak RSS in kB)."""
    t0 = time.perf_counter()
    p = sh("/usr/bin/time", "-f", "%M", sys.executable, "-I", HOOK, "web1", op, sub, "-",
           ns=site.ns, stdin=XML, env=site.env)
    ms = (time.perf_counter() - t0) * 1e3
    lines = p.stderr.decode().strip().splitlines()
    bad = [line for line in lines[:-1] if "error" in line]
    if bad:
        raise RuntimeError("\n".join(bad))
    return ms, int(lines[-1])


def measure(site: Site) -> Dict[Tuple[str, str], Tuple[float, int, int]]:
    """(shape, op) → (median ms, peak kB, elements after started)."""
    out = {}
    for shape, ports in SHAPES.items():
        site.write(forward_toml("web1", GUEST4, ports, GUEST6))
        hook(site, "started", "begin")  # compiles the configuration
        hook(site, "stopped", "end")
        runs: Dict[str, List[Tuple[float, int]]] = {"started": [], "stopped": []}
        count = 0
        for _ in range(int(os.environ.get("PFBENCH_REPEATS", 0)) or HOOK_REPEATS[shape]):
            runs["started"].append(hook(site, "started", "begin"))
            count = site.elements()
            runs["stopped"].append(hook(site, "stopped", "end"))
        for op, values in runs.items():
            out[(shape, op)] = (median([v[0] for v in values]), max(v[1] for v in values), count)
    return out


def run(base: str) -> List[Row]:
    ns = f"pfr{os.getpid()}"
    sh("ip", "netns", "add", ns)
    try:
        got = measure(Site(base, ns))
    finally:
        sh("ip", "netns", "del", ns, check=False)
    rows = []
    for op in ("started", "stopped"):
        ms, kb, count = got[("1 port", op)]
        full_ms, full_kb, full_count = got[("full range", op)]
        elements = f", {count} elements" if op == "started" else ""
        rows.append(Row(f"hook {op}, 8080:80 (IPv4+IPv6{elements})", ms, "ms"))
        elements = f", {full_count} elements" if op == "started" else ""
        rows.append(Row(f"hook {op}, 1-65535 tcp+udp (IPv4+IPv6{elements})", full_ms, "ms", ms,
                        full_ms / ms))
        rows.append(Row(f"hook {op}, 8080:80: peak RSS", kb / 1024, "MB"))
        rows.append(Row(f"hook {op}, 1-65535 tcp+udp: peak RSS", full_kb / 1024, "MB", kb / 1024,
                        full_kb / kb))
    return rows


NOTES = """\
'vs' of a 1-65535 row: the same figure of the 1-port guest. Peak RSS: the maximum over the
runs of /usr/bin/time's %M. Elements: in all of portfwd's maps after `started`."""


def main() -> int:
    return part_main("ranges.py", run, NOTES)


if __name__ == "__main__":
    sys.exit(main())
