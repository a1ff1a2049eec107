"""SIGKILL at random points of hook, reapply and sync runs: the kernel holds a guest's
old forwards or its new ones, never a mix; the next run repairs what was left
half-written; nothing temporary stays in the run directory."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from typing import List, Set

import pytest

from pfhost import HOOK, PortfwdHost, domain_xml

pytestmark = pytest.mark.kernel

TRIALS = int(os.environ.get("PORTFWD_CRASH_TRIALS", "40"))
GUESTS = ["k0", "k1", "k2"]


def config() -> str:
    return "".join(f'[[forward]]\nguest = "{g}"\nipv4 = "192.168.150.{30 + i}"\n'
                   f'ports = [{", ".join(f"{chr(34)}{7000 + 100 * i + p}:80{chr(34)}" for p in range(40))}]\n'
                   for i, g in enumerate(GUESTS))


def ports_of(pf: PortfwdHost, guest: str) -> Set[int]:
    i = GUESTS.index(guest)
    found = set()
    for key, _ in pf.elements().get("any4_ip", []):
        key = key["elem"]["val"] if "elem" in key else key
        port = key["concat"][-1]
        if 7000 + 100 * i <= port < 7100 + 100 * i:
            found.add(port)
    return found


def leftovers(pf: PortfwdHost) -> List[str]:
    guests = os.path.join(pf.run_dir, "guests")
    names = os.listdir(pf.run_dir) + [f"guests/{n}" for n in
                                      (os.listdir(guests) if os.path.isdir(guests) else [])]
    try:
        current = os.readlink(os.path.join(pf.run_dir, "compiled"))
    except OSError:
        current = ""
    return [n for n in names if ".tmp." in n or n.startswith("compiled.new.")
            or (n.startswith("compiled.") and n != current)]


def killed(argv: List[str], pf: PortfwdHost, stdin: bytes, after: float) -> None:
    p = subprocess.Popen(["ip", "netns", "exec", pf.lab.host, *argv], stdin=subprocess.PIPE,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=pf.env,
                         start_new_session=True)
    assert p.stdin is not None
    try:
        p.stdin.write(stdin)
        p.stdin.close()
    except BrokenPipeError:
        pass
    p.stdin = None
    time.sleep(after)
    try:
        os.killpg(p.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    p.communicate(timeout=30)


def test_sigkill_anywhere_leaves_old_or_new_and_the_next_run_repairs(pf: PortfwdHost) -> None:
    rng = random.Random(int(os.environ.get("PORTFWD_SEED", "3")))
    pf.write_config(config())
    full = {g: {7000 + 100 * i + p for p in range(40)} for i, g in enumerate(GUESTS)}
    running: Set[str] = set()
    for trial in range(TRIALS):
        guest = rng.choice(GUESTS)
        op = "stopped" if guest in running and rng.random() < 0.5 else "started"
        what = rng.choice(["hook", "hook", "reapply"])
        if what == "hook":
            argv = [sys.executable, "-I", HOOK, guest, op, "end" if op == "stopped" else "begin",
                    "-"]
        else:
            argv = [sys.executable, "-m", "portfwd.cli", "reapply"]
        if trial % 7 == 0:  # now and then a stale cache, so the kill may hit compiling too
            pf.write_config(config() + f"# trial {trial}\n")
        killed(argv, pf, domain_xml(guest), rng.uniform(0.0, 0.25))
        for g in GUESTS:  # every guest: all of its forwards or none
            assert ports_of(pf, g) in (set(), full[g]), f"trial {trial}: {g} half applied"
        # the next runs repair: the guest's hook again, to completion
        if what == "hook":
            sub = "end" if op == "stopped" else "begin"
            r = pf.hook(guest, op, sub)
            assert (r.returncode, r.stdout) == (0, b""), r.stderr
            (running.add if op == "started" else running.discard)(guest)
        else:
            r = pf.cli("reapply")
            assert r.returncode == 0, r.stderr
        for g in GUESTS:
            assert ports_of(pf, g) == (full[g] if g in running else set()), \
                f"trial {trial}: {g} not repaired"
        assert leftovers(pf) == [], f"trial {trial}: left in the run directory"
