"""compat's decisions on hand-built rule sets: no root, no nftables, no iptables.

The live counterparts (the same layouts built in a namespace, with traffic) are
in tests/test_compat.py."""

from __future__ import annotations

import os
import time
from typing import Any, Dict, List, Optional, cast

import pytest

from portfwd.host import compat
from portfwd.constants import MARK
from portfwd.errors import HostError
from portfwd.host.nft import Nft
from portfwd.values import BlockerKind

Json = Dict[str, Any]


def _oif(bridge: str) -> Json:
    return {"match": {"op": "==", "left": {"meta": {"key": "oifname"}}, "right": bridge}}


def _reject(bridge: str, handle: int) -> Json:
    return {"family": "ip", "table": "libvirt_network", "chain": "guest_input", "handle": handle,
            "expr": [_oif(bridge), {"counter": None}, {"reject": None}]}


def _established(bridge: str, handle: int) -> Json:
    return {"family": "ip", "table": "libvirt_network", "chain": "guest_input", "handle": handle,
            "expr": [_oif(bridge),
                     {"match": {"op": "in", "left": {"ct": {"key": "state"}},
                                "right": ["established", "related"]}},
                     {"counter": None}, {"accept": None}]}


def _ours(bridge: str, handle: int) -> Json:
    mark = {"ct": {"key": "mark"}}
    return {"family": "ip", "table": "libvirt_network", "chain": "guest_input", "handle": handle,
            "comment": "portfwd",
            "expr": [_oif(bridge),
                     {"match": {"op": "in", "left": {"ct": {"key": "status"}}, "right": "dnat"}},
                     {"match": {"op": "==", "left": {"&": [mark, MARK]}, "right": MARK}},
                     {"counter": None}, {"accept": None}]}


class FakeNft:
    """Answers compat's listings from hand-built chains: (family, table, name) → rules."""

    def __init__(self, chains: Dict[Any, List[Json]], extra: Optional[List[Json]] = None) -> None:
        self.chains = chains
        self.extra = extra or []

    def list(self, what: Json) -> Optional[List[Json]]:
        if "chains" in what:
            return [{"chain": {"family": f, "table": t, "name": n}} for f, t, n in self.chains] \
                + self.extra
        c = what["chain"]
        rules = self.chains.get((c["family"], c["table"], c["name"]))
        return None if rules is None else [{"rule": r} for r in rules]


@pytest.fixture(autouse=True)
def no_host(monkeypatch: pytest.MonkeyPatch) -> None:
    """Nothing read from this machine: no iptables-legacy, every tool found."""
    monkeypatch.setattr(compat, "_legacy_rules", lambda fam, deadline: None)
    monkeypatch.setattr(compat, "which", lambda name: f"/usr/sbin/{name}")


def _read(guest_input: List[Json], extra: Optional[List[Json]] = None) -> compat.Firewall:
    fake = FakeNft({("ip", "libvirt_network", "guest_input"): guest_input,
                    ("ip", "libvirt_network", "forward"): []}, extra)
    return compat.read(cast(Nft, fake))


def test_nft_backend_gets_one_accept_per_rejecting_bridge_at_the_head() -> None:
    fw = _read([_established("virbr0", 5), _reject("virbr0", 6), _established("virbr1", 7),
                _reject("virbr1", 8)])
    commands, argvs = compat.changes(fw, {4: {"virbr0", "virbr9"}, 6: set()})
    assert argvs == []
    assert len(commands) == 1  # virbr9 has no reject: nothing to pass
    rule = commands[0]["insert"]["rule"]
    assert rule["table"] == "libvirt_network" and rule["chain"] == "guest_input"
    assert rule["comment"] == "portfwd" and rule["expr"][0] == _oif("virbr0")
    assert compat.blockers(fw, {4: {"virbr0"}}) != []


def test_accepts_in_place_change_nothing_and_block_nothing() -> None:
    fw = _read([_ours("virbr0", 9), _established("virbr0", 5), _reject("virbr0", 6)])
    assert compat.changes(fw, {4: {"virbr0"}}) == ([], [])
    assert compat.blockers(fw, {4: {"virbr0"}}) == []


def test_accept_below_the_reject_is_moved_to_the_head() -> None:
    fw = _read([_established("virbr0", 5), _reject("virbr0", 6), _ours("virbr0", 9)])
    commands, _ = compat.changes(fw, {4: {"virbr0"}})
    assert [next(iter(c)) for c in commands] == ["delete", "insert"]
    assert commands[0]["delete"]["rule"]["handle"] == 9


def test_accept_no_bridge_needs_is_removed() -> None:
    fw = _read([_ours("virbr0", 9), _established("virbr0", 5), _reject("virbr0", 6)])
    commands, _ = compat.changes(fw, {4: set()})
    assert commands == [{"delete": {"rule": {"family": "ip", "table": "libvirt_network",
                                             "chain": "guest_input", "handle": 9}}}]


def test_a_foreign_rule_with_our_comment_is_not_ours() -> None:
    fake = _reject("virbr0", 9)
    fake["comment"] = "portfwd"
    fw = _read([fake])
    assert [r.role for r in fw.guest_input[4]] == [compat.REJECT]


def test_iptables_backend_makes_the_chain_and_jumps_to_it() -> None:
    fw = compat.Firewall()
    fw.fwi[4] = [compat.Rule(compat.OTHER, "virbr0"), compat.Rule(compat.REJECT, "virbr0")]
    commands, argvs = compat.changes(fw, {4: {"virbr0"}})
    assert commands == []
    assert argvs == [
        ["iptables-nft", "-N", compat.CHAIN],
        ["iptables-nft", "-A", compat.CHAIN] + compat.ACCEPT_SPEC,
        ["iptables-nft", "-I", "LIBVIRT_FWI", "1", "-o", "virbr0", "-j", compat.CHAIN],
    ]


def test_iptables_backend_leaves_a_foreign_chain_content_alone() -> None:
    fw = compat.Firewall()
    fw.fwi[4] = [compat.Rule(compat.REJECT, "virbr0")]
    fw.our_chain[4] = compat.OTHER
    _, argvs = compat.changes(fw, {4: set()})
    assert argvs == []  # someone else's rules in PORTFWD_FWI: never flushed or deleted
    fw.our_chain[4] = compat.OURS
    _, argvs = compat.changes(fw, {4: set()})
    assert argvs == [["iptables-nft", "-F", compat.CHAIN],
                     ["iptables-nft", "-X", compat.CHAIN]]


def test_drop_policy_elsewhere_is_a_blocker_never_a_change() -> None:
    policy = {"chain": {"family": "inet", "table": "filter", "name": "forward",
                        "hook": "forward", "policy": "drop"}}
    fw = _read([], extra=[policy])
    assert compat.changes(fw, {4: {"virbr0"}, 6: {"virbr0"}}) == ([], [])
    lines = compat.blockers(fw, {4: {"virbr0"}, 6: set()})
    assert len(lines) == 1 and str(lines[0]).startswith(
        "table inet filter chain forward: policy drop")
    assert (lines[0].kind, lines[0].family, lines[0].table, lines[0].chain) == (
        BlockerKind.POLICY, "inet", "filter", "forward")
    assert compat.blockers(fw, {4: set(), 6: set()}) == []


# -- bounded iptables runs ------------------------------------------------------

def _tool(tmp_path: "os.PathLike[str]", body: str) -> str:
    """A stand-in for an iptables tool: a shell script that logs its arguments."""
    path = os.path.join(str(tmp_path), "fake-iptables")
    with open(path, "w", encoding="ascii") as f:
        f.write(f'#!/bin/sh\necho "$@" >> "{path}.args"\n{body}\n')
    os.chmod(path, 0o755)
    return path


def test_a_held_lock_delays_a_run_no_longer_than_the_hook_waits_for_its_own() -> None:
    from portfwd import hook

    # the last call may start with under a second left and get `-w 1`, then its margin
    assert compat.XTABLES_WAIT + 1 + compat.EXIT_MARGIN <= hook.LOCK_WAIT


def test_each_call_waits_for_the_lock_only_as_long_as_the_run_has_left(
        tmp_path: "os.PathLike[str]") -> None:
    tool = _tool(tmp_path, "exit 0")
    compat.xtables([tool, "-S", "X"], time.monotonic() + 1.6)
    compat.xtables([tool, "-S", "X"], time.monotonic() - 10)  # spent: still a bounded try
    with open(tool + ".args", encoding="ascii") as f:
        assert f.read().splitlines() == ["-w 2 -S X", "-w 1 -S X"]


def test_a_lock_that_stays_held_is_a_clear_error(tmp_path: "os.PathLike[str]") -> None:
    tool = _tool(tmp_path, 'echo "Another app is currently holding the xtables lock. Stopped'
                           ' waiting after 1s." >&2\nexit 4')
    with pytest.raises(HostError) as e:
        compat.run_iptables([[tool, "-I", "LIBVIRT_FWI", "1", "-o", "virbr0", "-j", "X"]],
                            time.monotonic() + 1)
    assert str(e.value) == (f"`{tool} -I LIBVIRT_FWI 1 -o virbr0 -j X`: another program held the"
                            " xtables lock for 1 s; portfwd gave up (run `portfwd reapply` once"
                            " it is free)")


def test_a_tool_that_hangs_is_killed(tmp_path: "os.PathLike[str]") -> None:
    tool = _tool(tmp_path, "exec sleep 60")
    start = time.monotonic()
    with pytest.raises(HostError) as e:
        compat.xtables([tool, "-S"], time.monotonic() + 1)
    assert str(e.value) == (f"`{tool} -w 1 -S` did not finish within"
                            f" {1 + compat.EXIT_MARGIN:g} s and was stopped")
    assert time.monotonic() - start < 30  # killed, not waited for


def test_a_missing_program_is_a_clear_error() -> None:
    from portfwd.host import proc

    with pytest.raises(HostError) as e:
        proc.run(["/nonexistent/iptables-legacy", "-S"], 5.0, package="iptables")
    assert str(e.value) == "/nonexistent/iptables-legacy not found: apt-get install iptables"
