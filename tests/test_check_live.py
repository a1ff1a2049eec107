"""`portfwd check` on the host: an interface in one listen and one of its addresses
in another claim the same port (issue "Safe to leave running on a production host")."""

from __future__ import annotations

import pytest

from netlab import GUEST4, GUEST6
from pfhost import PortfwdHost

pytestmark = pytest.mark.kernel

CONFIG = f"""\
[[forward]]
guest = "web1"
ipv4 = "{GUEST4}"
ipv6 = "{GUEST6}"
listen = ["pfdummy0"]
ports = ["8080:80"]

[[forward]]
guest = "web2"
ipv4 = "192.168.150.11"
ipv6 = "fd00:150::11"
listen = ["LISTEN4", "LISTEN6"]
ports = ["8080:80"]
"""


def config(listen4: str, listen6: str) -> str:
    return CONFIG.replace("LISTEN4", listen4).replace("LISTEN6", listen6)


@pytest.fixture
def dummy(pf: PortfwdHost) -> PortfwdHost:
    """The lab host with an interface pfdummy0 holding 198.51.100.7 and 2001:db8:7::7
    (one end of a veth pair: this kernel has no dummy driver)."""
    lab = pf.lab
    lab.ns(lab.host, "ip", "link", "add", "pfdummy0", "type", "veth", "peer", "name", "pfdummy1")
    lab.ns(lab.host, "ip", "addr", "add", "198.51.100.7/32", "dev", "pfdummy0")
    lab.ns(lab.host, "ip", "addr", "add", "2001:db8:7::7/128", "dev", "pfdummy0", "nodad")
    for name in ("pfdummy0", "pfdummy1"):
        lab.ns(lab.host, "ip", "link", "set", name, "up")
    return pf


def test_check_reports_an_address_claimed_through_its_interface(dummy: PortfwdHost) -> None:
    dummy.write_config(config("198.51.100.7", "2001:db8:7::7"))
    r = dummy.cli("check")
    err = r.stderr.decode()
    assert r.returncode == 1, err
    path = dummy.config
    assert err.splitlines() == [
        f"{path}:13:10: forward[1].ports[0]: host port 8080/tcp on 198.51.100.7 (an address of"
        f" pfdummy0) is claimed twice: here for web2 and at {path}:6:10 (forward[0].ports[0])"
        " for web1; use another host port or listen address",
    ]  # one message per pair of entries, as for the static conflicts
    dummy.write_config(config("192.0.2.1", "2001:db8:7::7"))  # IPv6 alone clashes too
    r = dummy.cli("check")
    assert r.returncode == 1
    assert "host port 8080/tcp on 2001:db8:7::7 (an address of pfdummy0) is claimed twice" \
        in r.stderr.decode()
    assert r.stdout == b""


def test_check_accepts_addresses_the_interface_does_not_have(dummy: PortfwdHost) -> None:
    dummy.write_config(config("198.51.100.8", "2001:db8:7::8"))
    r = dummy.cli("check")
    assert r.returncode == 0, r.stderr.decode()
    assert r.stdout.decode().startswith(f"{dummy.config}: OK: 2 port forwards for 2 guests")
