"""The expected-plan text of a valid configuration (tests/data/valid/*.plan)."""

from __future__ import annotations

from typing import List

from portfwd.plan import display
from portfwd import plan
from portfwd.config.model import Config, Guest
from portfwd.plan import Binding

UUID_GUEST_NAME = "vm-by-uuid"


def plan_text(config: Config) -> str:
    """Every guest's bindings, guest by guest, as the hook and doctor plan them, one
    line per binding in the words of ``display``."""
    guests: List[Guest] = []
    for fwd in config.forwards:
        guest = Guest(fwd.guest, None) if fwd.guest else Guest(UUID_GUEST_NAME, fwd.uuid)
        if guest not in guests:
            guests.append(guest)
    lines = [f"table inet {config.options.table}"]
    for guest in guests:
        bindings = plan.forwards_bindings(config.forwards_for(guest.name, guest.uuid), guest.name)
        lines += [line(b) for b in sorted(bindings, key=lambda b: (b.guest, b.family, b.proto,
                                                                   b.host_port, b.listen))]
    return "\n".join(lines) + "\n"


def line(b: Binding) -> str:
    target = display.target_text(b.target, b.family, b.guest_ports)
    return (f"{b.guest}\t{b.proto}\t{display.listen_text(b)} -> {target}\tfrom {b.sources}"
            f"\t# {b.comment}")
