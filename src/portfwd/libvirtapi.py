"""Questions to libvirt, for the CLI and the daemon only (never from a hook)."""

from __future__ import annotations

from typing import Any, List

from .errors import HostError
from .model import Guest

DEFAULT_URI = "qemu:///system"


def _libvirt() -> Any:
    try:
        import libvirt
    except ImportError:
        raise HostError("the libvirt Python bindings are missing:"
                        " apt-get install python3-libvirt") from None
    libvirt.registerErrorHandler(lambda _ctx, _err: None, None)  # we report errors ourselves
    return libvirt


def running_guests(uri: str) -> List[Guest]:
    """Name and UUID of every running domain at ``uri``."""
    libvirt = _libvirt()
    try:
        conn = libvirt.openReadOnly(uri)
    except libvirt.libvirtError as e:
        raise HostError(f"cannot connect to libvirt at {uri}: {e.get_error_message()}"
                        " (is libvirtd running? see --connect)") from None
    try:
        domains = conn.listAllDomains(libvirt.VIR_CONNECT_LIST_DOMAINS_ACTIVE)
        return sorted((Guest(d.name(), d.UUIDString().lower()) for d in domains),
                      key=lambda g: g.name)
    except libvirt.libvirtError as e:
        raise HostError(f"libvirt at {uri} could not list domains: {e.get_error_message()}") from None
    finally:
        conn.close()
