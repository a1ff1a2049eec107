"""Text for people: bindings as `portfwd status` and `sync --dry-run` show them."""

from __future__ import annotations

from .values import Selector

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import List, Sequence, Union

    from .plan import Binding
    from .values import Target


def target_text(target: Target, family: int, port: Union[int, str]) -> str:
    """``192.0.2.1:80``, ``[2001:db8::1]:80``, or what a discovered address will be."""
    if isinstance(target, Selector):
        return f"<{target.describe(family)}>:{port}"
    return f"[{target}]:{port}" if family == 6 else f"{target}:{port}"


def describe(bindings: Sequence[Binding]) -> List[str]:
    """Human-readable lines, one per binding, for --dry-run."""
    lines = []
    for b in sorted(bindings, key=lambda b: (b.guest, b.family, b.proto, b.host_port, b.listen)):
        target = target_text(b.target, b.family, b.guest_ports)
        lines.append(f"{b.guest}\t{b.proto}\t{listen_text(b)} -> {target}\tfrom {b.sources}"
                     f"\t# {b.comment}")
    return lines


def listen_text(b: Binding) -> str:
    listen = b.listen
    if listen == "*":
        listen = "*" if b.family == 4 else "[*]"
    elif b.family == 6:
        listen = f"[{listen}]"
    return f"{listen}:{b.host_ports}"


