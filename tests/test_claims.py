"""Who holds which host port: pure, no root."""

from __future__ import annotations

from portfwd.plan.claims import Claims
from portfwd.plan import Binding
from portfwd.values import PortSpan


def _b(port: "int | str", listen: str = "203.0.113.5", proto: str = "tcp") -> Binding:
    ports = PortSpan.from_json(port)
    return Binding("fwd", 4, (listen, proto, ports), "192.168.122.10", ports.first, "g", "c")


def test_single_ports_and_ranges_overlap_both_ways() -> None:
    held = Claims()
    held.add(_b(8080), "web1")
    held.add(_b("9000-9100"), "db1")
    assert held.holder(_b(8080)) == "web1"
    assert held.holder(_b(8081)) is None
    assert held.holder(_b("8000-8080")) == "web1"  # a range over a held single port
    assert held.holder(_b(9050)) == "db1"  # a single port inside a held range
    assert held.holder(_b("9100-9200")) == "db1"  # ranges that touch at one port
    assert held.holder(_b("9101-9200")) is None


def test_other_slots_do_not_compete() -> None:
    held = Claims()
    held.add(_b(8080), "web1")
    assert held.holder(_b(8080, proto="udp")) is None
    assert held.holder(_b(8080, listen="203.0.113.6")) is None
    every = Binding("any", 4, ("tcp", PortSpan(8080)), "192.168.122.10", 8080, "g", "c")
    assert held.holder(every) is None  # every address vs one address: the planner's call
