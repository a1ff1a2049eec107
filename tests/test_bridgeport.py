"""Taps read from a domain XML by ``bridgeport.taps`` (no root needed)."""

from __future__ import annotations

from portfwd.bridgeport import taps
from pfhost import domain_xml


def test_taps_of_every_interface_in_order() -> None:
    assert taps(domain_xml("web1")) == ["vnet0"]
    assert taps(domain_xml("web1", taps=("vnet3", "vnet7"))) == ["vnet3", "vnet7"]


def test_taps_skip_what_is_no_plain_tap_name() -> None:
    xml = (b"<domain><devices><interfaces/>"
           b"<interface type='user'><mac address='52:54:00:00:00:01'/></interface>"
           b"<interface\ntype='bridge'><target dev=\"tap1\" managed='no'/></interface>"
           b"<interface type='network'><target dev='a&amp;b'/></interface>"
           b"<interface type='network'><target dev='../x'/></interface>"
           b"<interface type='network'><target dev=''/></interface>"
           b"<interface type='network'><target dev='tap1'/></interface>"
           b"<interface type='network'><target dev='cut")
    assert taps(xml) == ["tap1"]
    assert taps(b"") == []
