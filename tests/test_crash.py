"""SIGKILL at random points of hook, reapply, `portfwd sync` and `portfwd daemon` runs:
the kernel holds the old forwards or the new ones, never a mix; the next run repairs
what was left half-written; nothing temporary stays in the run directory.

PORTFWD_CRASH_TRIALS=N sets the number of trials of each test (default: 40 hook and
reapply kills, 15 of sync, 10 of the daemon)."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from typing import Callable, Dict, List, Optional, Set

import pytest

from pfhost import HOOK, PortfwdHost, domain_xml

pytestmark = pytest.mark.kernel

TRIALS = int(os.environ.get("PORTFWD_CRASH_TRIALS", "0"))
GUESTS = ["k0", "k1", "k2"]
PORTS = 40  # per guest, at most

Forwards = Dict[str, Set[int]]  # guest → host ports in the kernel


def config(counts: Optional[Dict[str, int]] = None) -> str:
    """Guest k<i> forwards ports 7000+100*i .. (``counts``: how many; default all 40)."""
    out = []
    for i, g in enumerate(GUESTS):
        n = PORTS if counts is None else counts[g]
        if n:
            ports = ", ".join(f'"{7000 + 100 * i + p}:80"' for p in range(n))
            out.append(f'[[forward]]\nguest = "{g}"\nipv4 = "192.168.150.{30 + i}"\n'
                       f"ports = [{ports}]\n")
    return "".join(out)


def expected(counts: Dict[str, int]) -> Forwards:
    return {g: {7000 + 100 * i + p for p in range(counts[g])} for i, g in enumerate(GUESTS)}


def live(pf: PortfwdHost) -> Forwards:
    return {g: ports_of(pf, g) for g in GUESTS}


def node_xml(path: str) -> str:
    """libvirt's test driver (``test:///PATH``, no daemon) with every guest running."""
    with open(path, "w", encoding="utf-8") as f:
        f.write("<node>" + "".join(f"<domain type='test'><name>{g}</name><memory>65536</memory>"
                                   "<os><type>hvm</type></os></domain>" for g in GUESTS)
                + "</node>\n")
    return f"test://{path}"


def ports_of(pf: PortfwdHost, guest: str) -> Set[int]:
    i = GUESTS.index(guest)
    found = set()
    targets = pf.targets()
    for key, _ in targets.get("any4_ip", []) + targets.get("any4_to", []):
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


def killed(argv: List[str], pf: PortfwdHost, stdin: bytes, after: float,
           before_kill: Optional[Callable[[], None]] = None, output: Optional[str] = None
           ) -> None:
    """Run ``argv`` in the host namespace and SIGKILL it ``after`` seconds (after
    ``before_kill``, if given, has run); its stdout and stderr go to the file
    ``output`` if given."""
    with open(output or os.devnull, "wb") as out:
        p = subprocess.Popen(["ip", "netns", "exec", pf.lab.host, *argv], stdin=subprocess.PIPE,
                             stdout=out, stderr=out, env=pf.env, start_new_session=True)
    assert p.stdin is not None
    try:
        p.stdin.write(stdin)
        p.stdin.close()
    except BrokenPipeError:
        pass
    p.stdin = None
    try:
        if before_kill is not None:
            before_kill()
        time.sleep(after)
    finally:
        try:
            os.killpg(p.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        p.communicate(timeout=30)


def timed(run: Callable[[], "subprocess.CompletedProcess[bytes]"]) -> float:
    """Seconds one complete run takes (to spread the kills over all of it)."""
    t0 = time.monotonic()
    r = run()
    assert r.returncode == 0, r.stderr
    return time.monotonic() - t0


def read(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def other_counts(rng: random.Random, old: Dict[str, int]) -> Dict[str, int]:
    """Per guest 0, 20 or 40 forwards, different from ``old``."""
    while True:
        new = {g: rng.choice([0, 20, PORTS]) for g in GUESTS}
        if new != old:
            return new


def assert_repaired(pf: PortfwdHost, want: Forwards, trial: int) -> None:
    assert live(pf) == want, f"trial {trial}: not repaired"
    states = {}
    for name in os.listdir(os.path.join(pf.run_dir, "guests")):
        with open(os.path.join(pf.run_dir, "guests", name), encoding="utf-8") as f:
            record = json.load(f)  # every state file whole
        states[record["guest"]] = {b[2][-1] for b in record["bindings"]}
    assert states == {g: ports for g, ports in want.items() if ports}, \
        f"trial {trial}: recorded state differs from the kernel"
    assert leftovers(pf) == [], f"trial {trial}: left in the run directory"


def test_sigkill_anywhere_leaves_old_or_new_and_the_next_run_repairs(pf: PortfwdHost) -> None:
    rng = random.Random(int(os.environ.get("PORTFWD_SEED", "3")))
    pf.write_config(config())
    full = {g: {7000 + 100 * i + p for p in range(40)} for i, g in enumerate(GUESTS)}
    running: Set[str] = set()
    for trial in range(TRIALS or 40):
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


def test_sigkill_of_sync_leaves_old_or_new_and_the_next_sync_repairs(pf: PortfwdHost) -> None:
    """`portfwd sync` applies the whole table in one transaction: killed anywhere,
    the kernel holds every guest's old forwards or every guest's new ones."""
    rng = random.Random(int(os.environ.get("PORTFWD_SEED", "5")))
    uri = node_xml(os.path.join(os.path.dirname(pf.etc), "node.xml"))
    counts = {g: PORTS for g in GUESTS}
    pf.write_config(config(counts))
    took = timed(lambda: pf.cli("sync", "--connect", uri))
    for trial in range(TRIALS or 15):
        old, counts = expected(counts), other_counts(rng, counts)
        pf.write_config(config(counts))
        killed([sys.executable, "-m", "portfwd.cli", "sync", "--connect", uri], pf, b"",
               rng.uniform(0.0, took * 1.2))
        assert live(pf) in (old, expected(counts)), f"trial {trial}: a mix of old and new"
        r = pf.cli("sync", "--connect", uri)
        assert r.returncode == 0, r.stderr
        assert_repaired(pf, expected(counts), trial)


def test_sigkill_of_the_daemon_leaves_old_or_new_and_the_next_run_repairs(pf: PortfwdHost) -> None:
    """The daemon killed while it starts (its first sync) or while it applies an edit
    of the configuration: old or new in the kernel; the next daemon, or a sync, repairs."""
    rng = random.Random(int(os.environ.get("PORTFWD_SEED", "7")))
    uri = node_xml(os.path.join(os.path.dirname(pf.etc), "node.xml"))
    argv = [sys.executable, "-m", "portfwd.cli", "daemon", "--connect", uri, "--interval", "0.05"]
    counts = {g: PORTS for g in GUESTS}
    pf.write_config(config(counts))
    assert pf.cli("sync", "--connect", uri).returncode == 0
    took = timed(lambda: pf.cli("sync", "--connect", uri))
    for trial in range(TRIALS or 10):
        old, counts = expected(counts), other_counts(rng, counts)
        new = config(counts)
        if rng.random() < 0.5:  # killed in the sync it makes when it starts
            pf.write_config(new)
            killed(argv, pf, b"", rng.uniform(0.0, took * 1.5))
        else:  # killed while it applies an edit made while it runs
            output = os.path.join(os.path.dirname(pf.etc), f"killed{trial}.log")

            def settled_then_edit() -> None:
                deadline = time.monotonic() + 30
                while b"synced: " not in read(output):  # its first sync, done (it logs it)
                    assert time.monotonic() < deadline, read(output)
                    time.sleep(0.05)
                assert live(pf) == old
                pf.write_config(new)

            killed(argv, pf, b"", rng.uniform(0.0, took * 1.5), settled_then_edit, output)
        assert live(pf) in (old, expected(counts)), f"trial {trial}: a mix of old and new"
        if rng.random() < 0.5:
            r = pf.cli("sync", "--connect", uri)
            assert r.returncode == 0, r.stderr
        else:  # the next daemon repairs as it starts
            log = os.path.join(os.path.dirname(pf.etc), f"daemon{trial}.log")
            with open(log, "wb") as out:
                p = subprocess.Popen(["ip", "netns", "exec", pf.lab.host, *argv], env=pf.env,
                                     stdout=out, stderr=out, start_new_session=True)
            try:
                deadline = time.monotonic() + 30
                while b"synced: " not in read(log):  # its first sync, recorded
                    assert time.monotonic() < deadline, read(log)
                    time.sleep(0.05)
            finally:
                os.killpg(p.pid, signal.SIGTERM)
                p.wait(timeout=30)
        assert_repaired(pf, expected(counts), trial)
