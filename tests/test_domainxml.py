"""The domain XML read by ``domainxml`` (no root needed): NICs and taps, the UUID
by parse and by byte search, MAC validity, libvirt's status files."""

from __future__ import annotations

import os
import subprocess
import sys
from typing import Optional

import pytest

from pfhost import domain_xml
from portfwd.libvirt import domainxml
from portfwd.libvirt.domainxml import Domain, domain_uuid, mac_addresses, mac_problem, parse, taps

UUID = "1b4e28ba-2fa1-11d2-883f-0016d3cca427"


def test_taps_of_every_interface_in_order() -> None:
    assert taps(domain_xml("web1")) == ["vnet0"]
    assert taps(domain_xml("web1", taps=("vnet3", "vnet7"))) == ["vnet3", "vnet7"]


def test_taps_skip_what_is_no_interface_name() -> None:
    nic = "<interface type='network'><mac address='52:54:00:00:00:0{}'/>{}</interface>"
    xml = ("<domain><devices><interfaces/>"
           + nic.format(1, "")  # no tap (type='user')
           + nic.format(2, "<target dev=\"tap1\" managed='no'/>").replace("<interface ",
                                                                         "<interface\n")
           + nic.format(3, "<target dev='a&amp;b'/>")  # an entity: read as the kernel's a&b
           + "".join(nic.format(4, f"<target dev='{bad}'/>")
                     for bad in ("../x", "", ".", "a:b", "a b", "x" * 16))
           + nic.format(5, "<target dev='tap1'/>")  # the same tap again: once
           + "<interface type='network'><target dev='nomac'/></interface>"  # no MAC: no NIC
           + "</devices></domain>").encode()
    assert taps(xml) == ["tap1", "a&b"]
    assert [n.tap for n in parse(xml).nics] == [None, "tap1", "a&b"] + [None] * 6 + ["tap1"]
    assert taps(b"") == []


def test_an_xml_that_is_not_well_formed_has_nothing() -> None:
    """Cut short, or bytes that are no UTF-8 (libvirt writes neither): no NIC, no tap."""
    whole = domain_xml("web1")
    for xml in (whole[:whole.index(b"</interface>")], whole.replace(b"vnet0", b"vn\xff")):
        domain = parse(xml)
        assert (domain.name, domain.uuid, domain.nics, domain.taps) == (None, None, (), [])


def test_a_domain_and_a_status_file_read_alike() -> None:
    xml = domain_xml("web1", uuid=UUID.upper(), mac="52:54:00:AB:CD:00", taps=("vnet0", "vnet1"))
    status = b"<domstatus state='running' pid='42'><monitor path='/x'/>" + xml + b"</domstatus>"
    for text in (xml, status):
        domain = parse(text)
        assert (domain.name, domain.uuid) == ("web1", UUID)
        assert [(n.mac, n.network, n.bridge, n.tap) for n in domain.nics] == [
            ("52:54:00:ab:cd:00", "default", "virbr0", "vnet0"),
            ("52:54:00:ab:cd:01", "default", "virbr0", "vnet1")]
        assert domain_uuid(text) == UUID
        assert mac_addresses(text) == ["52:54:00:ab:cd:00", "52:54:00:ab:cd:01"]


def test_one_xml_is_parsed_once() -> None:
    """The hook hands one XML to the resolver and to hairpin mode: one parse."""
    xml = domain_xml("web1")
    assert parse(xml) is parse(xml)
    assert parse(domain_xml("db")).name == "db"  # another XML is parsed anew
    assert parse(xml).name == "web1"


def test_uuid_by_byte_search() -> None:
    assert domain_uuid(b"<domain><uuid> AB-cd </uuid></domain>") == "ab-cd"
    assert domain_uuid(b"<domain><uuid></uuid></domain>") is None
    assert domain_uuid(b"<domain><uuid>cut") is None
    assert domain_uuid(b"") is None


@pytest.mark.parametrize("mac,problem", [
    ("52:54:00:12:34:56", None), ("52:54:00:AB:cd:EF", None),
    ("52:54:00:12:34", "is not a MAC address"), ("52:54:00:12:34:zz", "is not a MAC address"),
    ("52-54-00-12-34-56", "is not a MAC address"), ("01:00:5e:00:00:01", "multicast"),
    ("00:00:00:00:00:00", "all-zero")])
def test_mac_problem(mac: str, problem: Optional[str]) -> None:
    found = mac_problem(mac)
    assert (found is None) if problem is None else (found is not None and problem in found
                                                    and mac in found)


def test_status_files(tmp_path: "os.PathLike[str]", monkeypatch: pytest.MonkeyPatch) -> None:
    folder = str(tmp_path)
    for name in ("web1", "db"):
        with open(os.path.join(folder, f"{name}.xml"), "wb") as f:
            f.write(domain_xml(name))
    with open(os.path.join(folder, "notes.txt"), "w") as f:
        f.write("not a domain")
    os.mkdir(os.path.join(folder, "dir.xml"))  # unreadable as a file: skipped
    assert domainxml.status_files(folder) == {"db": domain_xml("db"), "web1": domain_xml("web1")}
    assert domainxml.status_files(os.path.join(folder, "missing")) is None
    monkeypatch.setenv(domainxml.ENV_STATUS_DIR, folder)
    assert domainxml.status_dir() == folder
    assert sorted(domainxml.status_files() or {}) == ["db", "web1"]


def test_empty_domain() -> None:
    assert Domain().taps == [] and Domain().nics == ()


def test_importing_it_imports_no_xml_parser() -> None:
    """The hook imports it for every guest event; ElementTree only when parsing."""
    code = ("import sys, portfwd.libvirt.domainxml as d; d.domain_uuid(b'<uuid>x</uuid>');"
            " print(any('xml' in m for m in sys.modules if m != 'portfwd.libvirt.domainxml'))")
    r = subprocess.run([sys.executable, "-I", "-c", code], capture_output=True, text=True,
                       check=True)
    assert r.stdout.strip() == "False"
