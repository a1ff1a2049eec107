"""The qemu hook fed exactly as libvirt feeds it, against real nftables in a namespace."""

from __future__ import annotations

import os
import subprocess
import sys
from typing import Any, List, Tuple

import pytest

from netlab import GUEST4
from pfhost import DNAT_RULES, HOOK, PortfwdHost, domain_xml, run_reading_all, web1_config
from portfwd.hook import STRICT_FAILURE

pytestmark = pytest.mark.kernel
# through Python (as before) and through the hook's sh lines, index current
BOTH = pytest.mark.parametrize("pf", ["python", "sh"], indirect=True)

WEB1 = web1_config("8080:80", "5000-5002/udp")
WEB2 = """
[[forward]]
guest = "web2"
ipv4  = "192.168.150.11"
ports = ["9090:90"]
"""


def count(pf: PortfwdHost) -> int:
    """How many map elements the table holds, all maps together."""
    return sum(len(e) for e in pf.elements().values())


def keys(pf: PortfwdHost, name: str) -> List[Tuple[Any, ...]]:
    """The keys of one map, as tuples, e.g. ("tcp", 8080)."""
    out = []
    for key, _ in pf.elements().get(name, []):
        key = key["elem"]["val"] if "elem" in key else key
        out.append(tuple(key["concat"]))
    return sorted(out, key=repr)


@BOTH
def test_started_applies_and_stopped_removes(pf: PortfwdHost) -> None:
    pf.write_config(WEB1)
    r = pf.hook("web1", "started")
    assert (r.returncode, r.stdout) == (0, b""), r.stderr
    # per family: 8080 in an address map and a port map, the range as one element
    assert count(pf) == 6
    assert keys(pf, "any4_ip") == [("tcp", 8080)] and keys(pf, "any6_port") == [("tcp", 8080)]
    assert keys(pf, "any4_range") == [("udp", {"range": [5000, 5002]})]
    assert keys(pf, "any6_range") == [("udp", {"range": [5000, 5002]})]
    comments = {e[0]["elem"]["comment"] for m in ("any4_ip", "any4_range")
                for e in pf.elements()[m]}
    assert comments == {"web1 forward[0].ports[0] 8080:80/tcp",
                        "web1 forward[0].ports[1] 5000-5002:5000-5002/udp"}
    r = pf.hook("web1", "stopped", "end")
    assert (r.returncode, r.stdout) == (0, b""), r.stderr
    assert count(pf) == 0
    assert not os.listdir(os.path.join(pf.run_dir, "guests"))


@BOTH
@pytest.mark.parametrize("again", ["started", "reconnect", "attach", "restore", "migrate"])
def test_twice_is_once(pf: PortfwdHost, again: str) -> None:
    pf.write_config(WEB1)
    assert pf.hook("web1", "started").returncode == 0
    before = pf.table()
    r = pf.hook("web1", again)
    assert (r.returncode, r.stdout) == (0, b""), r.stderr
    assert count(pf) == 6
    assert len(pf.rules()) == DNAT_RULES
    assert pf.table() == before


@BOTH
@pytest.mark.parametrize("op", ["migrate", "restore"])
def test_migrate_and_restore_apply_and_keep_stdout_empty(pf: PortfwdHost, op: str) -> None:
    pf.write_config(WEB1)
    r = pf.hook("web1", op)
    assert r.returncode == 0, r.stderr
    assert r.stdout == b""  # libvirt would read anything here as the new domain XML
    assert count(pf) == 6


@BOTH
@pytest.mark.parametrize("op, sub", [("stopped", "end"), ("release", "end")])
def test_removal_also_after_the_guest_left_the_config(pf: PortfwdHost, op: str, sub: str) -> None:
    pf.write_config(WEB1 + WEB2)
    assert pf.hook("web1", "started").returncode == 0
    assert pf.hook("web2", "started").returncode == 0
    pf.write_config(WEB2)
    r = pf.hook("web1", op, sub, "shutdown")
    assert (r.returncode, r.stdout) == (0, b""), r.stderr
    assert keys(pf, "any4_ip") == [("tcp", 9090)]


@BOTH
def test_config_change_moves_a_running_guest_on_restart_event(pf: PortfwdHost) -> None:
    pf.write_config(WEB1)
    assert pf.hook("web1", "started").returncode == 0
    pf.write_config(WEB1.replace("8080:80", "8081:80"))
    assert pf.hook("web1", "reconnect").returncode == 0
    assert ("tcp", 8081) in keys(pf, "any4_ip")
    assert ("tcp", 8080) not in keys(pf, "any4_ip")
    assert count(pf) == 6


@BOTH
def test_other_phases_do_nothing(pf: PortfwdHost) -> None:
    pf.write_config(WEB1)
    for op, sub in [("prepare", "begin"), ("start", "begin"), ("shutdown", "end"),
                    ("restore", "end"), ("bogus", "x")]:
        r = pf.hook("web1", op, sub)
        assert (r.returncode, r.stdout) == (0, b"")
    assert pf.table() is None


def test_unmanaged_guest_exits_before_importing_nftables(pf: PortfwdHost) -> None:
    pf.write_config(WEB1)
    first = pf.hook("other", "started", python_flags=["-X", "importtime"])
    assert first.returncode == 0
    second = pf.hook("other", "started", python_flags=["-X", "importtime"])
    assert second.returncode == 0 and second.stdout == b""
    imported = second.stderr.decode()
    assert "portfwd.hook" in imported  # the measurement works
    assert "nftables" not in imported and "tomllib" not in imported and "json" not in imported
    assert pf.table() is None
    stopped = pf.hook("other", "stopped", "end", python_flags=["-X", "importtime"])
    assert stopped.returncode == 0 and "nftables" not in stopped.stderr.decode()


@BOTH
def test_guest_matched_by_uuid(pf: PortfwdHost) -> None:
    uuid = "6f1c1e36-4a61-4d2a-9d5f-3b8c6d1e2f70"
    pf.write_config(f'[[forward]]\nuuid = "{uuid.upper()}"\nipv4 = "{GUEST4}"\nports = [22]\n')
    assert pf.hook("vm", "started", xml=domain_xml("vm", uuid=uuid)).returncode == 0
    assert keys(pf, "any4_ip") == [("tcp", 22)]
    assert pf.hook("vm", "release", "end", xml=domain_xml("vm", uuid=uuid)).returncode == 0
    assert count(pf) == 0


BROKEN = '[[forward]]\nguest = "web2"\nipv4 = "192.168.150.11"\nports = ["99999"]\n'


@BOTH
def test_broken_config_keeps_rules_and_exits_zero(pf: PortfwdHost) -> None:
    pf.write_config(WEB1)
    assert pf.hook("web1", "started").returncode == 0
    before = pf.table()
    pf.write_config(WEB1 + BROKEN.replace("guest = \"web2\"", "guest = \"web1\""))
    for op in ("started", "reconnect", "prepare"):
        r = pf.hook("web1", op)
        assert (r.returncode, r.stdout) == (0, b""), op
        assert f"{pf.config}:10:10: forward[1].ports[0]: '99999': port 99999 not in 1..65535" \
            in r.stderr.decode()
        assert "Traceback" not in r.stderr.decode()
        assert pf.table() == before
    pf.write_config("[[forward]\n")
    r = pf.hook("web1", "started")
    assert r.returncode == 0 and f"{pf.config}:1:" in r.stderr.decode()
    assert pf.table() == before


@BOTH
def test_strict_fails_start_phases_only(pf: PortfwdHost) -> None:
    pf.write_config(WEB1)
    assert pf.hook("web1", "started").returncode == 0
    pf.write_config("[options]\nstrict = true\n" + WEB1 + BROKEN)
    for op, code in [("prepare", STRICT_FAILURE), ("start", STRICT_FAILURE),
                     ("started", STRICT_FAILURE), ("reconnect", 0),
                     ("restore", 0), ("migrate", 0)]:
        r = pf.hook("web2", op)
        assert r.returncode == code, (op, r.stderr)
        assert r.stdout == b""
    r = pf.hook("web1", "stopped", "end")
    assert r.returncode == 0
    assert count(pf) == 0  # removal needs no configuration


@BOTH
def test_strict_with_unreadable_toml_uses_last_valid_setting(pf: PortfwdHost) -> None:
    pf.write_config("[options]\nstrict = true\n" + WEB1)
    assert pf.hook("web1", "started").returncode == 0
    pf.write_config("[options]\nstrict = tru\n" + WEB1)
    assert pf.hook("web1", "prepare").returncode == STRICT_FAILURE


@BOTH
def test_nftables_refusal_fails_started_only_when_strict(pf: PortfwdHost) -> None:
    # a foreign map of another type where ours belongs: nftables refuses our batch
    pf.lab.ns(pf.lab.host, "nft", "add table inet portfwd { comment \"portfwd: made by portfwd\"; };"
              " add map inet portfwd any4_ip"
              " { type inet_proto . inet_service : ipv6_addr; }")
    pf.write_config(WEB1)
    r = pf.hook("web1", "started")
    assert (r.returncode, r.stdout) == (0, b"")
    assert "nftables refused the change" in r.stderr.decode()
    assert "Traceback" not in r.stderr.decode()
    pf.write_config("[options]\nstrict = true\n" + WEB1)
    assert pf.hook("web1", "started").returncode == STRICT_FAILURE
    assert pf.hook("web1", "reconnect").returncode == 0
    assert pf.elements() == {}


def test_reads_all_of_stdin(pf: PortfwdHost) -> None:
    """libvirt writes the whole XML; a hook that stops reading would make it fail (EPIPE)."""
    pf.write_config(WEB1)
    r = run_reading_all(["ip", "netns", "exec", pf.lab.host, sys.executable, "-I", HOOK, "other",
                         "started", "begin", "-"], pf.env, "other")
    assert (r.returncode, r.stdout) == (0, b"")


def test_concurrent_hooks_are_serialised(pf: PortfwdHost) -> None:
    guests = [f"g{i}" for i in range(6)]
    pf.write_config("".join(
        f'[[forward]]\nguest = "{g}"\nipv4 = "192.168.150.{20 + i}"\nports = ["{7000 + i}:22"]\n'
        for i, g in enumerate(guests)))
    procs = []
    for g in guests + guests:  # every guest twice, all at once, as libvirtd's reconnect does
        procs.append(subprocess.Popen(
            ["ip", "netns", "exec", pf.lab.host, sys.executable, "-I", HOOK, g, "reconnect", "begin",
             "-"], stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=pf.env))
    for p, g in zip(procs, guests + guests):
        out, err = p.communicate(domain_xml(g), timeout=60)
        assert (p.returncode, out) == (0, b""), err
    assert keys(pf, "any4_ip") == [("tcp", 7000 + i) for i in range(6)]
    assert len(pf.rules()) == DNAT_RULES
