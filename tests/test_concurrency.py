"""50 guests whose hooks run in parallel, started / stopped / reconnect / release
interleaved at random with `portfwd reapply`, for many rounds: after every round
the table holds exactly the forwards of the guests that run — nothing lost,
duplicated or orphaned — and /run/portfwd holds state for exactly those guests.

The short variant always runs; PORTFWD_ROUNDS=10000 runs the long one (its last
result is in bench/README.md).
"""

from __future__ import annotations

import os
import random
import subprocess
import sys
import time
from typing import Dict, List, Set, Tuple

import pytest

from pfhost import HOOK, PortfwdHost, domain_xml

pytestmark = pytest.mark.kernel

GUESTS = [f"c{i:02d}" for i in range(50)]
ROUNDS = int(os.environ.get("PORTFWD_ROUNDS", "200"))
ON = {"started": True, "reconnect": True, "stopped": False, "release": False}


def config() -> str:
    out = []
    for i, g in enumerate(GUESTS):
        out.append(f'[[forward]]\nguest = "{g}"\nipv4 = "192.168.150.{20 + i}"\n'
                   f'ipv6 = "fd00:150::{20 + i:x}"\nports = ["{10000 + i}:80", "{20000 + i}:53/udp"]\n')
    return "".join(out)


def expected(running: Set[str]) -> Set[Tuple[str, int, str]]:
    """(protocol, host port, target) of every forward of the running guests, both families."""
    out = set()
    for g in running:
        i = GUESTS.index(g)
        for family_target in (f"192.168.150.{20 + i}", f"fd00:150::{20 + i:x}"):
            out.add(("tcp", 10000 + i, family_target))
            out.add(("udp", 20000 + i, family_target))
    return out


def live(pf: PortfwdHost) -> List[Tuple[str, int, str]]:
    """The same, as the kernel's maps hold them (a list: duplicates would show)."""
    out = []
    for name, elems in pf.elements().items():
        if not name.endswith("_ip"):
            continue
        for key, target in elems:
            key = key["elem"]["val"] if "elem" in key else key
            proto, port = key["concat"][-2:]
            out.append((proto, port, target))
    return out


def hook(pf: PortfwdHost, guest: str, op: str) -> "subprocess.Popen[bytes]":
    sub = "end" if op in ("stopped", "release") else "begin"
    p = subprocess.Popen(["ip", "netns", "exec", pf.lab.host, sys.executable, "-I", HOOK, guest,
                          op, sub, "-"], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, env=pf.env)
    assert p.stdin is not None
    p.stdin.write(domain_xml(guest))
    p.stdin.close()
    p.stdin = None  # all written: communicate() must not flush it again
    return p


def test_random_parallel_hooks_and_reapply_keep_the_table_exact(pf: PortfwdHost) -> None:
    pf.write_config(config())
    rng = random.Random(int(os.environ.get("PORTFWD_SEED", "8")))
    running: Set[str] = set()
    started = time.monotonic()
    for round_no in range(ROUNDS):
        guests = rng.sample(GUESTS, rng.randint(1, 12))  # one operation per guest a round
        ops: Dict[str, str] = {g: rng.choice(list(ON)) for g in guests}
        procs = [(g, op, hook(pf, g, op)) for g, op in ops.items()]
        if rng.random() < 0.2:  # a reapply racing the hooks
            procs.append(("-", "reapply", subprocess.Popen(
                ["ip", "netns", "exec", pf.lab.host, sys.executable, "-m", "portfwd.cli",
                 "reapply"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=pf.env)))
        for g, op, p in procs:
            out, err = p.communicate(timeout=120)
            assert (p.returncode, out) == (0, b"") or (op == "reapply" and p.returncode == 0), \
                (round_no, g, op, err)
            assert b"Traceback" not in err and b"error" not in err, (round_no, g, op, err)
        for g, op in ops.items():
            (running.add if ON[op] else running.discard)(g)
        got = live(pf)
        assert len(got) == len(set(got)), f"round {round_no}: duplicate elements"
        assert set(got) == expected(running), f"round {round_no}: table differs from the guests"
        states = {n[:-5] for n in os.listdir(os.path.join(pf.run_dir, "guests"))}
        assert states == running, f"round {round_no}: recorded state differs"
        leftovers = [n for n in os.listdir(pf.run_dir) if ".tmp." in n or ".new." in n]
        assert leftovers == [], f"round {round_no}: temporary files left: {leftovers}"
    print(f"{ROUNDS} rounds in {time.monotonic() - started:.1f} s")
