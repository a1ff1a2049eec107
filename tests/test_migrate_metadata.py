"""A guest whose only forward sits in its own <metadata>, live-migrated between two
libvirt hosts: the metadata travels with the domain, the destination's hook applies
the forward from the XML libvirt hands it, the source's removes it (test_migrate's
fleet, with forward.toml allowing domain forwards on both hosts and declaring none)."""

from __future__ import annotations

import os
import time
from typing import Iterator

import pytest

from guestimage import GUEST_PORT
from libvirtlab import LibvirtLab
from test_migrate import GUEST, GUEST4, Fleet, ask, running_fleet

pytestmark = pytest.mark.kernel

CONFIG = '[options]\ndomain_forwards = true\ndomain_ports = ["10000-19999"]\n'
PORT = 18080
METADATA = (f"<pf:forwards xmlns:pf='urn:portfwd:forwards:1'><pf:forward"
            f" ports='{PORT}:{GUEST_PORT}' ipv4='{GUEST4}'/></pf:forwards>")


@pytest.fixture
def fleet(tmp_path: "os.PathLike[str]") -> Iterator[Fleet]:
    yield from running_fleet(str(tmp_path), CONFIG, METADATA)


def answer(lab: LibvirtLab, addr: str, timeout: float) -> str:
    """The guest's answer through ``addr``:PORT, waited for up to ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while True:
        got = ask(lab, addr, PORT)
        if got is not None:
            return got
        assert time.monotonic() < deadline, f"no answer through {addr}:{PORT}"
        time.sleep(0.5)


def test_a_metadata_forward_follows_the_migrated_guest(fleet: Fleet) -> None:
    a, b = fleet.hosts
    before = answer(a, a.host4, 120)
    assert before.startswith("guest ")
    assert ask(b, b.host4, PORT) is None
    migrated = a.migrate(GUEST, b)
    assert migrated.returncode == 0, migrated.stderr.decode()
    assert answer(b, b.host4, 30) == before  # the same running guest, through B now
    assert ask(a, a.host4, PORT) is None
