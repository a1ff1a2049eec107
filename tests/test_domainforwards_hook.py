"""The qemu hook and forwards in the domain's <metadata>: taken from the XML on stdin
when forward.toml allows them; a guest whose XML lacks the namespace, or whose
forwards are not allowed, keeps the hook's fast exit (no nftables, no TOML)."""

from __future__ import annotations

import os
from typing import Any, Dict, List

import pytest

from netlab import GUEST4
from pfhost import HOOK, PortfwdHost, domain_xml
from portfwd import hookindex

pytestmark = pytest.mark.kernel

ON = '[options]\ndomain_forwards = true\ndomain_ports = ["10000-19999"]\n'
METADATA = (f"<metadata><pf:forwards xmlns:pf='urn:portfwd:forwards:1'><pf:forward"
            f" ports='18080:80 8080:80' ipv4='{GUEST4}'/><pf:forward ports='18081:81'"
            f" ipv4='{GUEST4}'/></pf:forwards></metadata>")


def declaring(name: str) -> bytes:
    return domain_xml(name).replace(b"<devices>", METADATA.encode() + b"<devices>", 1)


def ports(pf: PortfwdHost) -> List[int]:
    """The IPv4 host ports of single-port forwards in the table."""
    out = []
    for name, elems in pf.elements().items():
        if name == "any4_ip":
            out += [(k["elem"]["val"] if "elem" in k else k)["concat"][1] for k, _ in elems]
    return sorted(out)


def test_the_hook_applies_the_forwards_of_the_xml_on_stdin(pf: PortfwdHost) -> None:
    pf.write_config(ON)
    r = pf.hook("meta1", "started", xml=declaring("meta1"))
    assert (r.returncode, r.stdout) == (0, b""), r.stderr
    assert ports(pf) == [18081]  # the first one claims 8080, outside domain_ports: refused
    assert "meta1 <metadata>: forward[0].ports[1]: refused: host port(s) 8080-8080/tcp lie" \
        " outside [options] domain_ports (10000-19999)" in r.stderr.decode()
    r = pf.hook("meta1", "stopped", "end", xml=declaring("meta1"))
    assert r.returncode == 0 and ports(pf) == []


@pytest.mark.parametrize("config, xml", [
    (ON, domain_xml("plain")),                     # no namespace in the XML
    (ON.replace("true", "false"), declaring("plain")),  # not allowed by forward.toml
])
def test_otherwise_the_hook_exits_before_importing_nftables(pf: PortfwdHost, config: str,
                                                            xml: bytes) -> None:
    pf.write_config(config)
    assert pf.hook("plain", "started", xml=xml).returncode == 0  # compiles the cache
    second = pf.hook("plain", "started", xml=xml, python_flags=["-X", "importtime"])
    assert second.returncode == 0 and second.stdout == b""
    imported = second.stderr.decode()
    assert "portfwd.hook" in imported  # the measurement works
    assert "nftables" not in imported and "tomllib" not in imported
    assert pf.table() is None


def test_two_domains_declaring_one_port_the_first_keeps_it(pf: PortfwdHost) -> None:
    pf.write_config(ON)
    other = declaring("meta2").replace(GUEST4.encode(), b"192.168.150.12")
    assert pf.hook("meta1", "started", xml=declaring("meta1")).returncode == 0
    other = other.replace(b"1b4e28ba", b"2b4e28ba")
    r = pf.hook("meta2", "started", xml=other)
    assert r.returncode == 0, r.stderr
    assert "meta2 <metadata>: forward[1]: refused: guest meta1 holds a host port of it" \
        in r.stderr.decode()
    assert sorted((row["guest"], row["listen"], row["state"]) for row in pf_status(pf)
                  if row["guest"] == "meta1") == [("meta1", "*:18081", "active")]
    # status shows meta2's as refused, read from libvirt's copy of its live XML
    os.makedirs(pf.env["PORTFWD_QEMU_STATUS_DIR"])
    with open(os.path.join(pf.env["PORTFWD_QEMU_STATUS_DIR"], "meta2.xml"), "wb") as f:
        f.write(b"<domstatus>" + other + b"</domstatus>")
    refused = [row for row in pf_status(pf) if row["state"] == "refused"]
    assert [(row["guest"], row["reason"]) for row in refused] == [
        ("meta2", "forward[0].ports[1]: refused: host port(s) 8080-8080/tcp lie outside"
                  f" [options] domain_ports (10000-19999) of {pf.config}"),
        ("meta2", "forward[1]: refused: guest meta1 holds a host port of it")]


def pf_status(pf: PortfwdHost) -> List[Dict[str, Any]]:
    import json

    rows: List[Dict[str, Any]] = json.loads(pf.cli("status", "--json").stdout)["forwards"]
    return rows


def test_the_sh_lines_never_skip_a_domain_that_may_declare_forwards(pf: PortfwdHost) -> None:
    """The hook index names no guest of forward.toml here, yet with domain_forwards on
    the sh lines hand every apply to Python: only the XML can tell."""
    pf.write_config(ON)
    pf.age_config()
    r = pf.hook("nobody", "started")  # compiles the configuration and writes the index
    assert (r.returncode, r.stderr) == (0, b"")
    assert hookindex.trusted(pf.run_dir, pf.config)
    r = pf.sh_hook(HOOK, "meta2", "started", "begin", "-", xml=declaring("meta2"))
    assert (r.returncode, r.stdout) == (0, b""), r.stderr
    assert ports(pf) == [18081]
    r = pf.sh_hook(HOOK, "meta2", "stopped", "end", "-", xml=declaring("meta2"))
    assert r.returncode == 0 and ports(pf) == []
