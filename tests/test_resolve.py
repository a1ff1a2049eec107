"""resolve() with fakes: no root, no interfaces, no libvirt."""

from __future__ import annotations

from typing import Any, Dict, List, Optional, Tuple, Union, cast

import pytest

from portfwd.host import hostnet
from portfwd.libvirt.discover import Resolver
from portfwd.plan import Binding
from portfwd.plan.resolve import resolve
from portfwd.values import ListenIface, PortSpan, Reason, Selector

C = "web1 forward[0].ports[0] 8080:80/tcp"


class FakeRoutes:
    def __init__(self, routes: Dict[str, str]) -> None:
        self.routes = routes

    def interface_for(self, address: str) -> Optional[str]:
        return self.routes.get(address)


class FakeResolver:
    """Answers selectors from a table: (selector, family) → (address, where) or Reason."""

    def __init__(self, answers: Dict[Tuple[Selector, int], Union[Tuple[str, str], Reason]],
                 families: Tuple[int, ...] = (4, 6)) -> None:
        self.answers = answers
        self.families = families
        self.asked: List[Tuple[Selector, int]] = []

    def applies(self, selector: Selector, family: int) -> bool:
        return family in self.families

    def resolve(self, selector: Selector, family: int) -> Union[Tuple[str, str], Reason]:
        self.asked.append((selector, family))
        return self.answers.get((selector, family), Reason(Reason.WAITING, "no lease yet"))


@pytest.fixture
def host(monkeypatch: pytest.MonkeyPatch) -> Dict[str, Optional[str]]:
    """Fake kernel facts: interface → addresses per family, bridge → why IPv6 is off."""
    off: Dict[str, Optional[str]] = {}
    addrs = {("eth0", 4): (["203.0.113.5", "203.0.113.6"], []),
             ("eth0", 6): ([], ["2001:db8::5 is tentative: skipped"])}
    monkeypatch.setattr(hostnet, "usable_addresses",
                        lambda name, family: addrs.get((name, family), ([], [])))
    monkeypatch.setattr(hostnet, "ipv6_off", lambda iface=None: off.get(iface or ""))
    return off


def test_explicit_targets_pass_through(host: Dict[str, Optional[str]]) -> None:
    b = Binding("any", 4, ("tcp", PortSpan(8080)), "192.168.122.10", 80, "web1", C)
    out = resolve([b], None, cast(hostnet.RouteTable, FakeRoutes({})))
    assert out.bindings == [b] and out.pending == [] and out.address_from == {}


def test_listen_interface_becomes_each_address(host: Dict[str, Optional[str]]) -> None:
    b4 = Binding("fwd", 4, (ListenIface("eth0"), "tcp", PortSpan(8080)), "192.168.122.10", 80, "web1", C)
    b6 = Binding("fwd", 6, (ListenIface("eth0"), "tcp", PortSpan(8080)), "fd00::10", 80, "web1", C)
    out = resolve([b4, b6], None, cast(hostnet.RouteTable, FakeRoutes({})))
    assert [b.key for b in out.bindings] == [("203.0.113.5", "tcp", PortSpan(8080)),
                                             ("203.0.113.6", "tcp", PortSpan(8080))]
    assert out.pending == [(b6, Reason(Reason.WAITING,
                                       "no usable IPv6 address on listen interface eth0"))]
    assert out.warnings == ["2001:db8::5 is tentative: skipped"]


def test_selector_resolved_once_and_recorded(host: Dict[str, Optional[str]]) -> None:
    sel = Selector("52:54:00:00:00:01")
    bs = [Binding("any", 4, ("tcp", PortSpan(p)), sel, p, "web1", C) for p in (80, 443)]
    fake = FakeResolver({(sel, 4): ("192.168.122.10", "lease")})
    out = resolve(bs, cast(Resolver, fake), cast(hostnet.RouteTable, FakeRoutes({})))
    assert [b.target for b in out.bindings] == ["192.168.122.10"] * 2
    assert out.address_from == {"192.168.122.10": "lease"}
    assert fake.asked == [(sel, 4)]


def test_unresolved_selector_waits_and_inapplicable_family_is_skipped(
        host: Dict[str, Optional[str]]) -> None:
    sel = Selector()
    b4 = Binding("any", 4, ("tcp", PortSpan(80)), sel, 80, "web1", C)
    b6 = Binding("any", 6, ("tcp", PortSpan(80)), sel, 80, "web1", C)
    out = resolve([b4, b6], cast(Resolver, FakeResolver({}, families=(4,))),
                  cast(hostnet.RouteTable, FakeRoutes({})))
    assert out.bindings == [] and out.pending == [(b4, Reason(Reason.WAITING, "no lease yet"))]
    out = resolve([b4], None, None)
    assert [str(why) for _, why in out.pending] == ["no domain XML to find the guest's NIC in"]


def test_ipv6_off_on_the_bridge_found_through_the_ipv4_sibling(
        host: Dict[str, Optional[str]]) -> None:
    host["virbr0"] = "IPv6 is disabled on virbr0"
    b4 = Binding("any", 4, ("tcp", PortSpan(80)), "192.168.122.10", 80, "web1", C, "forward[0].ports[0]")
    b6 = Binding("any", 6, ("tcp", PortSpan(80)), "fd00::10", 80, "web1", C, "forward[0].ports[0]")
    other = Binding("any", 4, ("tcp", PortSpan(81)), "192.168.122.10", 81, "web1", C, "forward[0].ports[1]")
    routes = cast(hostnet.RouteTable, FakeRoutes({"192.168.122.10": "virbr0"}))
    out = resolve([b4, b6], None, routes)
    assert out.bindings == [b4]
    assert out.pending == [(b6, Reason(Reason.INACTIVE, "IPv6 is disabled on virbr0"))]
    assert str(out.pending[0][1]) == "inactive: IPv6 is disabled on virbr0"
    # the sibling is found by its configuration entry, not its comment
    out = resolve([other, b6], None, routes)
    assert out.bindings == [other, b6]


def test_recorded_state_of_earlier_versions_loads() -> None:
    """A guest state file as the previous version wrote it (7-field bindings,
    "?mac=…" targets, "@eth0" keys, "inactive: " reasons) reads into typed values."""
    from portfwd.rundir.record import GuestState

    raw: Dict[str, Any] = {"guest": "web1", "uuid": None, "table": "portfwd",
           "bindings": [["any", 4, ["tcp", 8080], "192.168.122.10", 80, "web1", C]],
           "pending": [["fwd", 4, ["@eth0", "tcp", 8080], "?mac=52:54:00:00:00:01", 80, "web1", C,
                        "no usable IPv4 address on listen interface eth0"],
                       ["any", 6, ["tcp", 8080], "fd00::10", 80, "web1", C,
                        "inactive: IPv6 is disabled on this host"]],
           "sources": {}, "warnings": []}
    st = GuestState.from_json(raw)
    assert st.bindings[0].address == "192.168.122.10" and st.bindings[0].entry == ""
    waiting, inactive = st.pending
    assert waiting[0].key[0] == ListenIface("eth0")
    assert waiting[0].target == Selector("52:54:00:00:00:01")
    assert waiting[1].cause == Reason.WAITING and inactive[1].cause == Reason.INACTIVE
    again = st.to_json()
    assert [p[:7] for p in again["pending"]] == [p[:7] for p in raw["pending"]]
    assert [p[8] for p in again["pending"]] == [  # written with the cause now
        ["waiting", "no usable IPv4 address on listen interface eth0"],
        ["inactive", "IPv6 is disabled on this host"]]
    assert GuestState.from_json(again).to_json() == again


def test_a_refusal_keeps_its_cause(host: Dict[str, Optional[str]]) -> None:
    """A refused discovered address waits as REFUSED (logged once), not as WAITING."""
    sel = Selector("52:54:00:00:00:01")
    refused = Reason(Reason.REFUSED, "refused 10.0.0.9 from lease on virbr0: outside the prefix")
    b = Binding("any", 4, ("tcp", PortSpan(80)), sel, 80, "web1", C)
    out = resolve([b], cast(Resolver, FakeResolver({(sel, 4): refused})),
                  cast(hostnet.RouteTable, FakeRoutes({})))
    assert out.bindings == [] and out.pending == [(b, refused)]


def test_a_removal_in_progress_is_recorded_and_read_back() -> None:
    """Bindings being removed stay on record (not as applied) until the removal ends."""
    from portfwd.rundir.record import GuestState

    b = Binding("any", 4, ("tcp", PortSpan(8080)), "192.168.122.10", 80, "web1", C, "forward[0].ports[0]")
    st = GuestState("web1", None, "portfwd", [], removing=[b])
    assert not st.empty and st.bindings == []
    again = GuestState.from_json(st.to_json())
    assert again.removing == [b] and again.bindings == []
    assert "removing" not in GuestState("web1", None, "portfwd", [b]).to_json()
