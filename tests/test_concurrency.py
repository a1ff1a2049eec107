"""50 guests whose hooks run in parallel, started / stopped / reconnect / release
interleaved at random with `portfwd reapply`, `portfwd sync` (which asked libvirt
before the round: a stale view) and a running `portfwd daemon` (its libvirt view
frozen when it started), for many rounds: after every round the table holds
exactly the forwards of the guests that run — nothing lost, duplicated or
orphaned — /run/portfwd holds state for exactly those guests, and portfwd's
accept in libvirt's chains and the hairpin set are there exactly while a guest
with forwards runs.

libvirt's status files (``PORTFWD_QEMU_STATUS_DIR``) follow the guests as
libvirt's do: written before a guest's start hooks, gone before its stop hooks
end. libvirt itself is its in-process test driver (``test:///FILE``), which
lists the guests FILE names.

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

from portfwd.rundir import state

from netlab import run
from pfhost import HOOK, PortfwdHost, domain_xml
from test_compat import libvirt_iptables

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
    for elems in pf.targets().values():
        for key, target in elems:
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


def libvirt_view(path: str, running: Set[str]) -> str:
    """A node file for libvirt's test driver in which ``running`` run; its URI."""
    domains = "".join(f"<domain type='test'><name>{g}</name><memory>8192</memory>"
                      f"<os><type>hvm</type></os></domain>" for g in sorted(running))
    with open(path, "w", encoding="utf-8") as f:
        f.write(f"<node>{domains}</node>")
    return f"test://{path}"


def portfwd(pf: PortfwdHost, *args: str) -> "subprocess.Popen[bytes]":
    return subprocess.Popen(["ip", "netns", "exec", pf.lab.host, sys.executable, "-m",
                             "portfwd.cli", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, env=pf.env)


def accepts(pf: PortfwdHost) -> List[int]:
    """How often libvirt's LIBVIRT_FWI jumps to portfwd's accepts, per family."""
    return [run("ip", "netns", "exec", pf.lab.host, tool, "-w", "-S", "LIBVIRT_FWI")
            .stdout.decode().count("-j PORTFWD_FWI") for tool in ("iptables", "ip6tables")]


def hairpin(pf: PortfwdHost) -> List[str]:
    """The bridges of the hairpin set (elements are iif . oif, both the bridge)."""
    sets = [o["set"] for o in pf.table() or [] if "set" in o and o["set"]["name"] == "hairpin"]
    return [e["concat"][0] for s in sets for e in s.get("elem", [])]


def test_random_parallel_hooks_sync_daemon_and_reapply_keep_the_table_exact(
        pf: PortfwdHost, tmp_path: "os.PathLike[str]") -> None:
    base = str(tmp_path)
    status_dir = os.path.join(base, "qemu-status")
    os.mkdir(status_dir)
    pf.env["PORTFWD_QEMU_STATUS_DIR"] = status_dir
    libvirt_iptables(pf.lab)
    pf.write_config(config())
    rng = random.Random(int(os.environ.get("PORTFWD_SEED", "8")))
    running: Set[str] = set()
    daemon = portfwd(pf, "daemon", "--interval", "0.05", "--connect",
                     libvirt_view(os.path.join(base, "daemon-view.xml"), running))
    started = time.monotonic()
    try:
        for round_no in range(ROUNDS):
            guests = rng.sample(GUESTS, rng.randint(1, 12))  # one operation per guest a round
            ops: Dict[str, str] = {g: rng.choice(list(ON)) for g in guests}
            view = libvirt_view(os.path.join(base, f"view{round_no % 2}.xml"), running)
            for g, op in ops.items():  # libvirt's status file, before the hook runs
                status = os.path.join(status_dir, f"{g}.xml")
                if ON[op]:
                    open(status, "w").close()
                elif os.path.exists(status):
                    os.unlink(status)
            procs = [(g, op, hook(pf, g, op)) for g, op in ops.items()]
            if rng.random() < 0.2:  # a reapply racing the hooks
                procs.append(("-", "reapply", portfwd(pf, "reapply")))
            if rng.random() < 0.2:  # a sync that asked libvirt before this round's changes
                procs.append(("-", "sync", portfwd(pf, "sync", "--connect", view)))
            if rng.random() < 0.3:  # an edit of forward.toml wakes the daemon
                pf.write_config(config())
            for g, op, p in procs:
                out, err = p.communicate(timeout=120)
                if op in ("reapply", "sync"):
                    assert p.returncode == 0, (round_no, op, err)
                else:
                    assert (p.returncode, out) == (0, b""), (round_no, g, op, err)
                assert b"Traceback" not in err and b"error" not in err, (round_no, g, op, err)
            for g, op in ops.items():
                (running.add if ON[op] else running.discard)(g)
            assert daemon.poll() is None, daemon.communicate()[1][-2000:]
            with state.locked(pf.run_dir):  # the daemon may be between two steps
                got = live(pf)
                assert len(got) == len(set(got)), f"round {round_no}: duplicate elements"
                assert set(got) == expected(running), f"round {round_no}: table differs"
                states = {n[:-5] for n in os.listdir(os.path.join(pf.run_dir, "guests"))}
                assert states == running, f"round {round_no}: recorded state differs"
                want = 1 if running else 0
                assert accepts(pf) == [want, want], f"round {round_no}: libvirt accepts"
                assert hairpin(pf) == (["br0"] if running else []), f"round {round_no}: hairpin"
                leftovers = [n for n in os.listdir(pf.run_dir) if ".tmp." in n or ".new." in n]
                assert leftovers == [], f"round {round_no}: temporary files left: {leftovers}"
            if round_no % 500 == 499:  # progress of a long run (pytest -s shows it)
                print(f"{round_no + 1} rounds in {time.monotonic() - started:.1f} s", flush=True)
    finally:
        daemon.terminate()
        _, err = daemon.communicate(timeout=30)
    assert b"Traceback" not in err, err[-2000:]
    print(f"{ROUNDS} rounds in {time.monotonic() - started:.1f} s")
