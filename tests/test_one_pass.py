"""One pass per guest event: a steady guest start or stop makes one nftables
transaction and at most one read, runs no subprocess and writes at most two files
under the run directory (counted around the real hook, against real nftables)."""

from __future__ import annotations

import json
import os
import sys
from typing import Any, Dict, List

import pytest

from netlab import GUEST4
from pfhost import PortfwdHost, domain_xml, web1_config

pytestmark = pytest.mark.kernel

COUNTED = os.path.join(os.path.dirname(os.path.abspath(__file__)), "counted_hook.py")
WEB2 = (web1_config("9090:90").replace('"web1"', '"web2"')
        .replace("192.168.150.10", "192.168.150.11").replace("fd00:150::10", "fd00:150::11"))


def counted(pf: PortfwdHost, guest: str, op: str) -> Dict[str, List[Any]]:
    """Run the hook for ``guest`` ``op`` as libvirt does; what it did to the host."""
    out = os.path.join(pf.run_dir + ".counts.json")
    sub = "end" if op in ("stopped", "release") else "begin"
    r = pf.lab.ns(pf.lab.host, sys.executable, "-I", COUNTED, guest, op, sub, "-",
                  input=domain_xml(guest, mac="52:54:00:12:34:57" if guest == "web2"
                                   else "52:54:00:12:34:56",
                                   taps=("vnet1",) if guest == "web2" else ("vnet0",)),
                  env=dict(pf.env, COUNTS_OUT=out), check=False)
    assert (r.returncode, r.stdout) == (0, b""), r.stderr
    assert b"error" not in r.stderr, r.stderr
    with open(out, encoding="utf-8") as f:
        counts: Dict[str, List[Any]] = json.load(f)
    os.unlink(out)
    return counts


def web1_forwarded(pf: PortfwdHost) -> bool:
    return any(GUEST4 in str(value) for elems in pf.elements().values() for _, value in elems)


def test_steady_start_and_stop_are_one_pass(pf: PortfwdHost) -> None:
    pf.write_config(web1_config("8080:80", "5000-5002/udp") + WEB2)
    counted(pf, "web2", "started")  # web2 keeps the bridge's accepts and hairpin entry
    first = counted(pf, "web1", "started")
    assert web1_forwarded(pf)
    counted(pf, "web1", "stopped")
    for _ in range(2):  # steady: the table, the host record and the bridge set as before
        start = counted(pf, "web1", "started")
        assert web1_forwarded(pf)
        stop = counted(pf, "web1", "stopped")
        assert not web1_forwarded(pf)
        for what, counts in (("started", start), ("stopped", stop)):
            assert len(counts["transactions"]) == 1, (what, counts)
            assert len(counts["transactions"]) + len(counts["reads"]) <= 2, (what, counts)
            assert counts["subprocesses"] == [], (what, counts)
            assert len(counts["writes"]) <= 2, (what, counts)
        assert sorted(start["writes"]) == ["guests/web1.json", "host.json"]
        # the removal is recorded before it is made; the record goes after
        assert stop["writes"] == ["guests/web1.json", "host.json"]
        assert stop["removals"] == ["guests/web1.json"]
    # the first start after web2's made no more than a steady one either: same bridge
    assert len(first["transactions"]) == 1 and first["subprocesses"] == []


def test_a_new_bridge_looks_at_libvirts_chains_once(pf: PortfwdHost) -> None:
    """The first guest on a bridge: the accepts in libvirt's chains are looked at (a
    read) and go into the same transaction; the next event on that bridge reads nothing."""
    pf.write_config(web1_config("8080:80") + WEB2)
    first = counted(pf, "web1", "started")
    assert len(first["reads"]) >= 1 and first["subprocesses"] == []
    second = counted(pf, "web2", "started")
    assert second["reads"] == [] and len(second["transactions"]) == 1
