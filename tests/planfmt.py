"""The expected-plan text of a valid configuration (tests/data/valid/*.plan)."""

from __future__ import annotations

from typing import List

from portfwd import display, plan
from portfwd.model import Config, Guest

UUID_GUEST_NAME = "vm-by-uuid"


def plan_text(config: Config) -> str:
    """Every guest's bindings, guest by guest, as ``display.describe`` prints them."""
    guests: List[Guest] = []
    for fwd in config.forwards:
        guest = Guest(fwd.guest, None) if fwd.guest else Guest(UUID_GUEST_NAME, fwd.uuid)
        if guest not in guests:
            guests.append(guest)
    lines = [f"table inet {config.options.table}"]
    for guest in guests:
        lines += display.describe(plan.guest_bindings(config, guest))
    return "\n".join(lines) + "\n"
