"""Hairpin mode of guests' bridge ports (their taps): read and set through sysfs.

With ``br_netfilter`` (``net.bridge.bridge-nf-call-iptables = 1``, Docker loads
it) a guest's connection to its own forward is DNATed on the bridge and sent
back out of the port it came in by, which a bridge port refuses unless its
hairpin mode is on. portfwd turns it on for the taps of guests with forwards,
on the bridges those forwards lead to, and puts back what it found when the
forwards go (the record: ``state.Store.hairpin_ports``).

Cheap to import (only os, _socket and hostnet): the hook calls it on every guest
start.
"""

from __future__ import annotations

import os
from _socket import if_nametoindex

from .hostnet import ifname

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Dict, List, Optional, Set, Tuple

    # guest → tap → (ifindex, hairpin mode before portfwd: "0" or "1")
    Records = Dict[str, Dict[str, Tuple[int, str]]]

SYS_NET = "/sys/class/net"


def taps(xml: bytes) -> List[str]:
    """The ``<target dev='…'/>`` of each ``<interface>`` of a domain XML, in order,
    found by a byte scan (no XML parser on the hook's path)."""
    out: List[str] = []
    pos = 0
    while True:
        start = xml.find(b"<interface", pos)
        if start < 0:
            return out
        pos = start + 10
        if xml[pos:pos + 1] not in (b" ", b">", b"\t", b"\n"):
            continue  # another element whose name starts so
        end = xml.find(b"</interface>", start)
        if end < 0:
            return out
        pos = end
        body = xml[start:end]
        tag = body.find(b"<target ")
        if tag < 0:
            continue
        dev = _attribute(body[tag:body.find(b">", tag)], b"dev")
        if dev and dev not in out:
            out.append(dev)


def _attribute(tag: bytes, name: bytes) -> Optional[str]:
    """The value of attribute ``name`` in one start tag, if plain (no entities),
    decoded as ``hostnet.ifname`` decodes the kernel's names."""
    at = tag.find(b" " + name + b"=")
    if at < 0:
        return None
    at += len(name) + 2
    quote = tag[at:at + 1]
    if quote not in (b"'", b'"'):
        return None
    end = tag.find(quote, at + 1)
    value = tag[at + 1:end] if end > 0 else b""
    if not value or b"&" in value or b"/" in value:
        return None
    return ifname(value)


class Port:
    """One bridge port as sysfs shows it."""

    __slots__ = ("name", "ifindex", "bridge", "hairpin")

    def __init__(self, name: str, ifindex: int, bridge: str, hairpin: str) -> None:
        self.name = name
        self.ifindex = ifindex
        self.bridge = bridge
        self.hairpin = hairpin  # "0" or "1"


def port(name: str) -> Optional[Port]:
    """The bridge port ``name`` of this network namespace; None when there is no such
    interface, it is on no bridge, or the sysfs mounted here belongs to another
    namespace (its ifindex then differs from the kernel's answer to this process)."""
    base = os.path.join(SYS_NET, name)
    try:
        bridge = os.path.basename(os.readlink(os.path.join(base, "brport", "bridge")))
        with open(os.path.join(base, "brport", "hairpin_mode"), encoding="ascii") as f:
            hairpin = f.read().strip()
        with open(os.path.join(base, "ifindex"), encoding="ascii") as f:
            ifindex = int(f.read())
        if if_nametoindex(name) != ifindex:
            return None
    except (OSError, ValueError):
        return None
    return Port(name, ifindex, bridge, hairpin)


def set_hairpin(name: str, value: str) -> None:
    """Write ``value`` ("0" or "1") to the port's hairpin mode (OSError if refused)."""
    with open(os.path.join(SYS_NET, name, "brport", "hairpin_mode"), "w", encoding="ascii") as f:
        f.write(value)


def reconcile(bridges: Dict[str, Set[str]], fresh: Dict[str, List[str]],
              records: Records) -> Tuple[Records, List[str]]:
    """Hairpin mode on for each tap of each guest of ``bridges`` (guest → the bridges
    its forwards lead to) that sits on one of those bridges; back to what it was
    before for every recorded tap no longer wanted. Taps come from ``fresh`` (guest →
    taps of its live domain XML, when this run has it), else from ``records``.
    Returns the new records and what could not be changed."""
    out: Records = {}
    problems: List[str] = []
    for guest in sorted(bridges):
        old = records.get(guest, {})
        for name in fresh.get(guest, list(old)):
            p = port(name)
            if p is None or p.bridge not in bridges[guest]:
                continue
            before = old.get(name)
            was = before[1] if before and before[0] == p.ifindex else p.hairpin
            if p.hairpin != "1":
                try:
                    set_hairpin(name, "1")
                except OSError as e:
                    problems.append(f"guest {guest}: hairpin mode of bridge port {name}: {e}")
                    continue
            out.setdefault(guest, {})[name] = (p.ifindex, was)
    for guest, recorded in sorted(records.items()):
        for name, (ifindex, was) in sorted(recorded.items()):
            if name in out.get(guest, {}):
                continue
            p = port(name)
            if p is None or p.ifindex != ifindex or p.hairpin == was:
                continue  # gone, or another interface by now: nothing of ours to undo
            try:
                set_hairpin(name, was)
            except OSError as e:
                problems.append(f"guest {guest}: hairpin mode of bridge port {name}: {e}")
                out.setdefault(guest, {})[name] = (ifindex, was)  # try again next time
    return out, problems
