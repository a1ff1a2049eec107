"""The drop rule for outside packets to 127.0.0.0/8 never goes missing while
route_localnet is on: a running daemon rebuilds a table deleted behind its back
(``nft delete table``, ``nft flush ruleset``) within seconds, and turns
route_localnet off when it cannot; portfwd turns route_localnet on only with the
rule in place, and off before the rule goes."""

from __future__ import annotations

import json
import os
from typing import Any, List

import pytest

from netlab import BRIDGE4, CLIENT4, HOST4, Lab
from pfhost import PortfwdHost, RunningDaemon, driver_uri, web1_config
from portfwd import constants
from portfwd.host import hostnet
from portfwd.rundir import state
from portfwd.engine import wholehost
from portfwd.engine import Engine

CONFIG = "[options]\nlocalhost = true\n" + web1_config("8080:80")
GUARD_BOUND = 5.0  # seconds: the guard is back (or route_localnet off) within this


def guard_in_kernel(lab: Lab) -> bool:
    """Whether chain raw_prerouting of inet portfwd drops 127.0.0.0/8 (asked with nft)."""
    r = lab.ns(lab.host, "nft", "-j", "list", "chain", "inet", "portfwd",
               constants.GUARD_CHAIN, check=False)
    if r.returncode != 0:
        return False
    rules = [o["rule"] for o in json.loads(r.stdout)["nftables"] if "rule" in o]
    return any(rule.get("comment") == constants.GUARD_COMMENT and {"drop": None} in rule["expr"]
               and "127.0.0.0" in json.dumps(rule["expr"]) for rule in rules)


def route_localnet(lab: Lab) -> str:
    return lab.ns(lab.host, "sysctl", "-n", "net.ipv4.conf.br0.route_localnet").stdout.decode().strip()


def localnet_record(pf: PortfwdHost) -> Any:
    """The bridges the run directory records route_localnet on for (the host record)."""
    return state.Store(pf.run_dir).localnet()


def forwards_work(lab: Lab) -> bool:
    return (lab.reach("tcp", "127.0.0.1", 8080, ns=lab.host) == f"tcp 80 {BRIDGE4}"
            and lab.reach("tcp", HOST4, 8080) == f"tcp 80 {CLIENT4}")


@pytest.fixture
def daemon(lab: Lab, pf: PortfwdHost) -> Any:
    """A daemon over guest web1 with a forward from 127.0.0.1, started and synced."""
    lab.serve("tcp", [80])
    pf.write_config(CONFIG)
    uri = driver_uri(os.path.join(os.path.dirname(pf.etc), "node.xml"), ["web1"])
    with RunningDaemon(pf, uri, interval=0.2) as d:
        d.until(lambda: guard_in_kernel(lab) and route_localnet(lab) == "1", "the first sync")
        assert forwards_work(lab)
        yield d
    assert "Traceback" not in d.text(), d.text()


@pytest.mark.kernel
@pytest.mark.parametrize("how", [["delete", "table", "inet", "portfwd"], ["flush", "ruleset"]],
                         ids=["delete table", "flush ruleset"])
def test_daemon_brings_the_guard_back(lab: Lab, pf: PortfwdHost, daemon: RunningDaemon,
                                      how: List[str]) -> None:
    lab.ns(lab.host, "nft", *how)
    assert not guard_in_kernel(lab) and route_localnet(lab) == "1"  # the window portfwd closes
    daemon.until(lambda: guard_in_kernel(lab) or route_localnet(lab) == "0",
                 "the guard back or route_localnet off", GUARD_BOUND)
    daemon.until(lambda: guard_in_kernel(lab) and route_localnet(lab) == "1", "rebuilt")
    assert forwards_work(lab)
    assert "gone, or without the drop rule" in daemon.text()
    assert "rebuilt: " in daemon.text()


@pytest.mark.kernel
def test_daemon_brings_back_a_guard_deleted_alone(lab: Lab, pf: PortfwdHost,
                                                  daemon: RunningDaemon) -> None:
    lab.ns(lab.host, "nft", "flush", "chain", "inet", "portfwd", constants.GUARD_CHAIN)
    daemon.until(lambda: guard_in_kernel(lab), "the guard back", GUARD_BOUND)
    daemon.until(lambda: route_localnet(lab) == "1", "route_localnet on again")
    assert forwards_work(lab)


@pytest.mark.kernel
def test_daemon_turns_route_localnet_off_when_it_cannot_rebuild(lab: Lab, pf: PortfwdHost,
                                                                daemon: RunningDaemon) -> None:
    """Someone else's table takes the name at once: portfwd never touches it, so the
    guard cannot come back; route_localnet goes off, and is recorded off. Once the
    name is free, the next attempt rebuilds and turns it on again."""
    lab.ns(lab.host, "nft", "-f", "-",
           input=b"delete table inet portfwd\nadd table inet portfwd\n")
    daemon.until(lambda: route_localnet(lab) == "0", "route_localnet off", GUARD_BOUND)
    daemon.until(lambda: localnet_record(pf) == [], "route_localnet recorded off")
    assert lab.probe("tcp", "127.0.0.1", 8080, ns=lab.host) is None
    assert "was not made by portfwd" in daemon.text()
    assert "route_localnet turned off on br0" in daemon.text()
    lab.ns(lab.host, "nft", "delete", "table", "inet", "portfwd")
    daemon.until(lambda: guard_in_kernel(lab) and route_localnet(lab) == "1"
                 and localnet_record(pf) == ["br0"], "rebuilt, route_localnet on and recorded")
    assert forwards_work(lab)


@pytest.mark.kernel
def test_route_localnet_goes_on_only_with_the_guard(lab: Lab, pf: PortfwdHost) -> None:
    """A run that finds route_localnet off (a bridge re-made) and the guard gone leaves
    it off and says so; reapply brings back the guard, then route_localnet."""
    lab.serve("tcp", [80])
    pf.write_config(CONFIG)
    assert pf.hook("web1", "started").returncode == 0
    assert route_localnet(lab) == "1" and guard_in_kernel(lab)
    lab.ns(lab.host, "nft", "flush", "chain", "inet", "portfwd", constants.GUARD_CHAIN)
    lab.ns(lab.host, "sysctl", "-qw", "net.ipv4.conf.br0.route_localnet=0")
    r = pf.network_hook("default", "started")()
    assert r.returncode == 0
    assert "route_localnet left off on br0: table inet portfwd lacks its drop rule" \
        in r.stderr.decode(), r.stderr
    assert route_localnet(lab) == "0"
    assert pf.cli("reapply").returncode == 0
    assert guard_in_kernel(lab) and route_localnet(lab) == "1"
    assert forwards_work(lab)


@pytest.mark.kernel
def test_guard_reader_tells_a_drop_from_anything_else(lab: Lab, pf: PortfwdHost) -> None:
    """``guard.present`` (one netlink dump, in the lab's namespace) says yes to the
    rule portfwd builds and no to a missing table, an empty chain, and a rule with
    the guard's comment that does not drop."""
    code = ("import sys\nfrom portfwd.host import guard\n"
            "print(guard.present(sys.argv[1]))\n")

    def present() -> str:
        return lab.ns(lab.host, pf_python(), "-c", code, "portfwd").stdout.decode().strip()

    assert present() == "False"
    pf.write_config(CONFIG)
    assert pf.hook("web1", "started").returncode == 0
    assert present() == "True"
    lab.ns(lab.host, "nft", "flush", "chain", "inet", "portfwd", constants.GUARD_CHAIN)
    assert present() == "False"
    lab.ns(lab.host, "nft", "add", "rule", "inet", "portfwd", constants.GUARD_CHAIN, "ip", "daddr",
           "127.0.0.0/8", "accept", "comment", f'"{constants.GUARD_COMMENT}"')
    assert present() == "False"
    assert pf.cli("reapply").returncode == 0
    assert present() == "True"


def pf_python() -> str:
    import sys

    return sys.executable


class Recording:
    """Stands for nftables in ``flush``: records each transaction among the sysctl
    writes (``events``), so that their order shows."""

    def __init__(self, events: List[str]) -> None:
        self.events = events

    def set_comment(self, table: str, name: str) -> str:
        return constants.TABLE_COMMENT

    def apply(self, commands: Any, dry_run: bool = False) -> None:
        if commands:
            self.events.append("nft " + " ".join(next(iter(c)) for c in commands))

    def list(self, what: Any) -> List[Any]:
        return []


def test_flush_turns_route_localnet_off_before_the_guard_goes(
        tmp_path: "os.PathLike[str]", monkeypatch: pytest.MonkeyPatch) -> None:
    events: List[str] = []

    def set_route_localnet(bridge: str, on: bool) -> bool:
        events.append(f"route_localnet {bridge} {int(on)}")
        return True

    monkeypatch.setattr(hostnet, "set_route_localnet", set_route_localnet)
    monkeypatch.setattr("portfwd.host.compat._legacy_rules", lambda fam, deadline: None)
    run_dir = os.path.join(str(tmp_path), "run")
    os.mkdir(run_dir)
    engine = Engine(os.path.join(str(tmp_path), "forward.toml"), run_dir,
                    nft=Recording(events))  # type: ignore[arg-type]
    engine.store.write_localnet(["br0", "br1"])
    wholehost.flush(engine, None)
    assert events == ["route_localnet br0 0", "route_localnet br1 0", "nft add delete"]
    assert engine.store.localnet() == []


def test_guard_comment_is_what_the_skeleton_writes() -> None:
    from portfwd.plan import rules

    raw = [c["add"]["rule"] for c in rules.skeleton("portfwd")
           if "add" in c and "rule" in c["add"] and c["add"]["rule"]["chain"] == constants.GUARD_CHAIN]
    assert [r["comment"] for r in raw] == [constants.GUARD_COMMENT]
    assert raw[0]["expr"][-1] == {"drop": None}
