"""Text for people: a binding's listen side and target as `portfwd status`, `sync
--dry-run` and the hook's messages show them."""

from __future__ import annotations

from portfwd.values import Selector

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Union

    from portfwd.plan import Binding
    from portfwd.values import PortSpan, Target


def target_text(target: Target, family: int, port: Union[int, PortSpan]) -> str:
    """``192.0.2.1:80``, ``[2001:db8::1]:80``, or what a discovered address will be."""
    if isinstance(target, Selector):
        return f"<{target.describe(family)}>:{port}"
    return f"[{target}]:{port}" if family == 6 else f"{target}:{port}"


def listen_text(b: Binding) -> str:
    listen = b.listen
    if listen == "*":
        listen = "*" if b.family == 4 else "[*]"
    elif b.family == 6:
        listen = f"[{listen}]"
    return f"{listen}:{b.host_ports}"


