"""`portfwd status` for scripts and monitoring: per-forward counters that move with
real traffic, state and reason apart, exit codes, configuration errors in --json;
and a table an earlier layout built, migrated without losing a forward."""

from __future__ import annotations

import json
import os
from typing import Any, Dict, List

import pytest

from netlab import CLIENT4, CLIENT6, GUEST4, GUEST6, HOST4, HOST6
from pfhost import PortfwdHost, web1_config
from portfwd.plan import rules
from portfwd.rundir import state
from portfwd.constants import LAYOUT, TABLE_COMMENT

pytestmark = pytest.mark.kernel

GOLDEN = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "golden")


def status(pf: PortfwdHost, code: int = 0) -> Dict[str, Any]:
    r = pf.cli("status", "--json")
    assert r.returncode == code, (r.returncode, r.stderr)
    out: Dict[str, Any] = json.loads(r.stdout)
    return out


def rows(pf: PortfwdHost, code: int = 0) -> Dict[str, Dict[str, Any]]:
    """listen → row."""
    return {row["listen"]: row for row in status(pf, code)["forwards"]}


def test_counters_count_each_forwarded_connection_once(pf: PortfwdHost) -> None:
    lab = pf.lab
    lab.serve("tcp", [80])
    lab.serve("udp", [5000, 5001, 5002])
    pf.write_config(web1_config("8080:80", "5000-5002/udp"))
    assert pf.hook("web1", "started").returncode == 0
    before = rows(pf)
    assert {r["connections"] for r in before.values()} == {0}
    assert before["*:8080"]["bytes"] == 0 and before["*:8080"]["state"] == "active"
    for _ in range(3):
        assert lab.reach("tcp", HOST4, 8080) == f"tcp 80 {CLIENT4}"
    assert lab.reach("tcp", HOST6, 8080) == f"tcp 80 {CLIENT6}"
    assert lab.reach("udp", HOST4, 5001) == f"udp 5001 {CLIENT4}"
    after = rows(pf)
    assert after["*:8080"]["connections"] == 3 and after["*:8080"]["bytes"] > 0
    assert after["[*]:8080"]["connections"] == 1
    assert after["*:5000-5002"]["connections"] == 1  # a range is looked up once per connection
    assert after["[*]:5000-5002"]["connections"] == 0
    text = pf.cli("status").stdout.decode().splitlines()
    assert text[0].split() == ["GUEST", "PROTO", "LISTEN", "TARGET", "FROM", "CONNS", "STATE"]
    # "-> TARGET" is two words
    assert [line.split()[6] for line in text[1:] if line.split()[2] == "*:8080"] == ["3"]


def test_state_and_reason_are_separate_and_blocked_fails(pf: PortfwdHost) -> None:
    """A policy-drop forward chain that portfwd must not change: the forward is
    blocked, named with the chain; `status` exits 5 until it is gone."""
    lab = pf.lab
    pf.write_config(web1_config("8080:80") + '\n[[forward]]\nguest = "web2"\nipv4 = "192.168.150.11"'
                    '\nfrom = ["198.51.100.0/24", "203.0.113.0/24"]\nports = ["9090:90"]\n')
    assert pf.hook("web1", "started").returncode == 0
    assert pf.hook("web2", "started").returncode == 0
    out = status(pf)
    assert out["healthy"] is True and out["config"]["valid"] is True
    by = {row["listen"]: row for row in out["forwards"]}
    assert by["*:9090"]["sources"] == ["198.51.100.0/24", "203.0.113.0/24"]  # one row, a list
    assert (by["*:8080"]["state"], by["*:8080"]["reason"]) == ("active", "")
    assert by["*:8080"]["guest_address"] == GUEST4 and by["*:8080"]["host_ports"] == "8080"
    lab.ns(lab.host, "nft", "add table inet pftest_fw; add chain inet pftest_fw forward"
           " { type filter hook forward priority 0; policy drop; }")
    try:
        assert lab.probe("tcp", HOST4, 8080) is None
        blocked = rows(pf, 5)["*:8080"]
        assert blocked["state"] == "blocked"
        assert blocked["reason"].startswith("table inet pftest_fw chain forward: policy drop")
        r = pf.cli("status")
        assert r.returncode == 5 and "blocked: table inet pftest_fw chain forward" in r.stdout.decode()
    finally:
        lab.ns(lab.host, "nft", "delete", "table", "inet", "pftest_fw")
    assert status(pf)["healthy"] is True


def test_invalid_configuration_is_in_the_json_and_fails(pf: PortfwdHost) -> None:
    pf.write_config(web1_config("8080:80"))
    assert pf.hook("web1", "started").returncode == 0
    pf.write_config(web1_config("8080:80") + '[[forward]]\nguest = "x"\nports = ["99999"]\n')
    out = status(pf, 1)
    assert out["config"]["valid"] is False and out["healthy"] is False
    assert out["config"]["errors"] == [f"{pf.config}:9:10: forward[1].ports[0]: '99999':"
                                       " port 99999 not in 1..65535"]
    assert {row["state"] for row in out["forwards"]} == {"active"}  # what is applied, still shown
    r = pf.cli("status")
    assert r.returncode == 1 and "configuration invalid" in r.stderr.decode()


def test_missing_config_file_fails_status(pf: PortfwdHost) -> None:
    out = status(pf, 1)
    assert out["forwards"] == [] and "no such file" in out["config"]["errors"][0]


def _old_layout_table(pf: PortfwdHost) -> None:
    """Replace the table with what layout 4 built (no counters, ranges tested through
    their own map), holding the recorded forwards, as an earlier portfwd left it."""
    with open(os.path.join(GOLDEN, "skeleton-layout4.json"), encoding="utf-8") as f:
        old: List[Dict[str, Any]] = json.load(f)
    recorded = state.Store(pf.run_dir).all_guests()
    bindings = [b for st in recorded for b in st.bindings]
    elements = [c for c in rules.guest_update("portfwd", [], bindings)
                if not c["add"]["element"]["name"].endswith("rkeys")]
    lab = pf.lab
    lab.ns(lab.host, "nft", "delete", "table", "inet", "portfwd")
    lab.ns(lab.host, "nft", f'add table inet portfwd {{ comment "{TABLE_COMMENT}"; }}')
    lab.ns(lab.host, "nft", "-j", "-f", "-",
           input=json.dumps({"nftables": old + elements}).encode())
    with open(os.path.join(pf.run_dir, "layout.portfwd"), "w", encoding="ascii") as f:
        f.write("4")


@pytest.mark.parametrize("how", ["hook", "sync", "reapply"])
def test_a_layout_4_table_is_migrated_in_place(pf: PortfwdHost, how: str) -> None:
    lab = pf.lab
    lab.serve("tcp", [80])
    lab.serve("udp", [5000, 5001, 5002])
    config = web1_config("8080:80", "5000-5002/udp")
    other = '\n[[forward]]\nguest = "test"\nipv4 = "192.168.150.11"\nports = ["9090:90"]\n'
    pf.write_config(config + other)
    assert pf.hook("web1", "started").returncode == 0
    _old_layout_table(pf)
    maps = {o["map"]["name"]: o["map"] for o in pf.table() or [] if "map" in o}
    assert "stmt" not in maps["any4_ip"]
    assert lab.reach("udp", HOST4, 5000) == f"udp 5000 {CLIENT4}"  # the old table works
    if how == "hook":  # another guest starts: an incremental change
        r = pf.hook("test", "started")
    elif how == "sync":  # libvirt's test driver runs "test"; web1 is the hook's
        pf.write_config(config.replace('"web1"', '"test"'))
        r = pf.cli("sync", "--connect", "test:///default")
    else:
        r = pf.cli("reapply")
    assert r.returncode == 0, r.stderr
    maps = {o["map"]["name"]: o["map"] for o in pf.table() or [] if "map" in o}
    assert maps["any4_ip"]["stmt"] == [{"counter": None}]
    assert maps["any4_range"]["stmt"] == [{"counter": None}]
    with open(os.path.join(pf.run_dir, "layout.portfwd"), encoding="ascii") as f:
        assert f.read() == LAYOUT
    out = status(pf)
    assert out["healthy"] is True
    live = {(row["guest"], row["listen"]) for row in out["forwards"] if row["state"] == "active"}
    target = "test" if how == "sync" else "web1"
    assert {(target, "*:8080"), (target, "*:5000-5002"), (target, "[*]:8080")} <= live
    assert lab.reach("tcp", HOST4, 8080) == f"tcp 80 {CLIENT4}"
    assert lab.reach("udp", HOST6, 5002) == f"udp 5002 {CLIENT6}"
    counted = rows(pf)
    assert counted["*:8080"]["connections"] == 1 and counted["[*]:5000-5002"]["connections"] == 1


def test_status_of_guest_addresses_from_config(pf: PortfwdHost) -> None:
    """The JSON names the target address and ports apart from the display text."""
    pf.write_config(web1_config("7000-7001:8000-8001/udp"))
    assert pf.hook("web1", "started").returncode == 0
    out = status(pf)["forwards"]
    assert sorted((r["listen"], r["target"], r["guest_ports"], r["family"]) for r in out) == [
        ("*:7000", f"{GUEST4}:8000", "8000", 4), ("*:7001", f"{GUEST4}:8001", "8001", 4),
        ("[*]:7000", f"[{GUEST6}]:8000", "8000", 6), ("[*]:7001", f"[{GUEST6}]:8001", "8001", 6)]


def test_two_bridges_behind_libvirts_reject_are_both_active(pf: PortfwdHost) -> None:
    """portfwd's accepts for two bridges in libvirt's chain: neither forward is
    reported blocked (each bridge is judged with the others in place)."""
    lab = pf.lab
    lab.ns(lab.host, "ip", "link", "add", "br1", "type", "veth", "peer", "name", "br1p")
    lab.ns(lab.host, "ip", "addr", "add", "192.168.160.1/24", "dev", "br1")
    for name in ("br1", "br1p"):
        lab.ns(lab.host, "ip", "link", "set", name, "up")
    for bridge, net in (("br0", "192.168.150.0/24"), ("br1", "192.168.160.0/24")):
        if bridge == "br0":
            lab.ns(lab.host, "iptables", "-N", "LIBVIRT_FWI")
            lab.ns(lab.host, "iptables", "-A", "FORWARD", "-j", "LIBVIRT_FWI")
        lab.ns(lab.host, "iptables", "-A", "LIBVIRT_FWI", "-d", net, "-o", bridge, "-m",
               "conntrack", "--ctstate", "RELATED,ESTABLISHED", "-j", "ACCEPT")
        lab.ns(lab.host, "iptables", "-A", "LIBVIRT_FWI", "-o", bridge, "-j", "REJECT")
    pf.write_config(web1_config("8080:80") + '\n[[forward]]\nguest = "web2"\n'
                    'ipv4 = "192.168.160.10"\nports = ["9090:90"]\n')
    assert pf.hook("web1", "started").returncode == 0
    assert pf.hook("web2", "started").returncode == 0
    assert "-A LIBVIRT_FWI -o br1 -j PORTFWD_FWI" in lab.ns(lab.host, "iptables", "-S").stdout.decode()
    out = status(pf)
    assert {(r["listen"], r["state"]) for r in out["forwards"]} == {
        ("*:8080", "active"), ("[*]:8080", "active"), ("*:9090", "active")}
    lab.serve("tcp", [80])
    assert lab.reach("tcp", HOST4, 8080) == f"tcp 80 {CLIENT4}"


def test_configured_forward_of_a_running_guest_is_not_applied_not_stopped(
        pf: PortfwdHost, tmp_path: "os.PathLike[str]") -> None:
    """A guest that runs but whose hook never ran (libvirtd not restarted after
    installing) is "not applied" and fails; one libvirt does not run is "guest not
    running"; with neither libvirt nor its status files, status says it cannot tell."""
    from pfhost import domain_xml

    pf.write_config(web1_config("8080:80") + '\n[[forward]]\nguest = "db1"\nipv4 = "192.168.150.12"'
                    '\nports = ["5432"]\n')
    folder = os.path.join(str(tmp_path), "qemu")
    os.makedirs(folder)
    with open(os.path.join(folder, "web1.xml"), "wb") as f:
        f.write(domain_xml("web1"))

    def states(*args: str, code: int) -> Dict[str, List[str]]:
        r = pf.cli("status", "--json", "--connect", "test:///nonexistent", *args)
        assert r.returncode == code, (r.returncode, r.stderr)
        out: Dict[str, List[str]] = {}
        for line in json.loads(r.stdout)["forwards"]:
            out.setdefault(line["guest"], []).append(f"{line['state']}: {line['reason']}")
        return out

    seen = states("--libvirt-status", folder, code=5)
    assert set(seen["db1"]) == {"guest not running: "}
    assert set(seen["web1"]) == {"not applied: the guest runs, but its hook has not run: restart"
                                 " libvirtd (once after installing), or run `portfwd sync`"}
    text = pf.cli("status", "--libvirt-status", folder, "web1")
    assert text.returncode == 5 and b"db1" not in text.stdout, text
    assert b"not applied: the guest runs" in text.stdout
    assert set(states("--libvirt-status", folder, "db1", code=0)) == {"db1"}
    # libvirt unreachable and no status files (PORTFWD_QEMU_STATUS_DIR names none)
    unknown = states(code=0)["web1"][0]
    assert unknown.startswith("unknown: not applied: guest stopped, or its hook has not run")
    assert pf.hook("web1", "started").returncode == 0
    assert {r.split(":")[0] for r in states("--libvirt-status", folder, "web1", code=0)["web1"]} \
        == {"active"}


@pytest.mark.parametrize("command", [["status"], ["doctor"], ["trace", "--", "web2", "80"]])
def test_a_guest_not_configured_is_a_usage_error_with_did_you_mean(
        pf: PortfwdHost, command: List[str]) -> None:
    pf.write_config(web1_config("8080:80"))
    args = command if command[0] == "trace" else command + ["web2"]
    r = pf.cli(*args)
    assert (r.returncode, r.stdout) == (2, b""), r
    assert r.stderr.decode() == (f"portfwd {command[0]}: error: guest 'web2' is not configured;"
                                 " did you mean 'web1'? configured guests: web1\n")


def test_with_an_invalid_configuration_a_guest_is_not_called_unknown(pf: PortfwdHost) -> None:
    pf.write_config(web1_config("8080:80") + "bad =\n")
    r = pf.cli("status", "web1")
    assert r.returncode == 1 and b"not configured" not in r.stderr, r
