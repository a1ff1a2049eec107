"""Hairpin mode of guests' bridge ports (their taps): turned on and put back
through sysfs (read by ``hostnet.link``).

With ``br_netfilter`` (``net.bridge.bridge-nf-call-iptables = 1``, Docker loads
it) a guest's connection to its own forward is DNATed on the bridge and sent
back out of the port it came in by, which a bridge port refuses unless its
hairpin mode is on. portfwd turns it on for the taps of guests with forwards,
on the bridges those forwards lead to, and puts back what it found when the
forwards go (the record: ``run_host.HostRecord.hairpin_ports``).

Cheap to import (only os and hostnet): the hook calls it on every guest start.
"""

from __future__ import annotations

import os

from portfwd.host.hostnet import SYS_NET, link

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Dict, List, Set, Tuple

    # guest → tap → (ifindex, hairpin mode before portfwd: "0" or "1")
    Records = Dict[str, Dict[str, Tuple[int, str]]]


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
            p = link(name)
            if p is None or p.hairpin is None or p.master not in bridges[guest]:
                continue
            before = old.get(name)
            was = before[1] if before and before[0] == p.ifindex else _mode(p.hairpin)
            if not p.hairpin:
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
            p = link(name)
            if p is None or p.ifindex != ifindex or p.hairpin is None or _mode(p.hairpin) == was:
                continue  # gone, or another interface by now: nothing of ours to undo
            try:
                set_hairpin(name, was)
            except OSError as e:
                problems.append(f"guest {guest}: hairpin mode of bridge port {name}: {e}")
                out.setdefault(guest, {})[name] = (ifindex, was)  # try again next time
    return out, problems


def _mode(hairpin: bool) -> str:
    """A hairpin mode as sysfs and the record write it."""
    return "1" if hairpin else "0"
