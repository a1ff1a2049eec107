"""Forwards a domain declares in its <metadata> (domainforwards): opt-in, validated by
config's validator with errors located in the domain, limited to [options]
domain_ports, and forward.toml wins every conflict."""

from __future__ import annotations

from typing import Dict, List

import pytest

from portfwd.libvirt import domainxml
from portfwd import plan
from portfwd.config import parse
from portfwd.libvirt.domainforwards import forwards, refusals
from portfwd.errors import ConfigError
from portfwd.config.portspec import FORMS
from portfwd.commands.status import refused_row

ON = '[options]\ndomain_forwards = true\ndomain_ports = ["10000-19999", 20053]\n'
WEB1 = '\n[[forward]]\nguest = "web1"\nipv4 = "192.168.122.10"\nports = ["10080:80"]\n'


def xml(*elements: str, name: str = "dom1") -> bytes:
    inner = "".join(f"<pf:forward {e}/>" for e in elements)
    return (f"<domain type='qemu'><name>{name}</name><uuid>1b4e28ba-2fa1-11d2-883f-0016d3cca427"
            "</uuid><metadata><other xmlns='urn:x'/><pf:forwards"
            f" xmlns:pf='urn:portfwd:forwards:1'>{inner}</pf:forwards></metadata></domain>"
            ).encode()


def declared(config_text: str, data: bytes) -> "tuple[List[str], List[str]]":
    config = parse(config_text, "/etc/portfwd/forward.toml")
    domain = domainxml.parse(data)
    found, refused = forwards(domain.forwards, "dom1", domain.uuid, config)
    lines = [f"{b.proto} {b.listen or '*'}:{b.host_ports} -> {b.target}:{b.guest_ports}"
             f" from {b.sources}" for b in plan.forwards_bindings(found, "dom1")]
    return lines, refused


def test_the_element_reads_like_a_forward_table() -> None:
    found, refused = declared(ON, xml('ports="10080:80 12222:22" from="198.51.100.0/24"'
                                      ' ipv4="192.168.122.20"',
                                      'ports="20053:53" proto="udp tcp" ipv4="192.168.122.20"'))
    assert refused == []
    assert found == [
        "tcp *:10080 -> 192.168.122.20:80 from 198.51.100.0/24",
        "tcp *:12222 -> 192.168.122.20:22 from 198.51.100.0/24",
        "udp *:20053 -> 192.168.122.20:53 from *",
        "tcp *:20053 -> 192.168.122.20:53 from *"]


def test_off_unless_forward_toml_says_so() -> None:
    assert declared(WEB1, xml('ports="10080:80"')) == ([], [])
    assert declared('[options]\ndomain_forwards = false\n', xml('ports="10080:80"')) == ([], [])


def test_domain_forwards_needs_domain_ports() -> None:
    with pytest.raises(ConfigError) as e:
        parse("[options]\ndomain_forwards = true\n", "F")
    assert e.value.lines == ['F:2:1: options.domain_forwards: domain_forwards = true needs'
                             ' domain_ports, the host ports domains may claim: add e.g.'
                             ' domain_ports = ["10000-19999"] to [options]']
    with pytest.raises(ConfigError) as e:
        parse('[options]\ndomain_ports = ["2-1", "x"]\n', "F")
    assert e.value.lines == ["F:2:17: options.domain_ports[0]: '2-1': range 2-1 runs backwards;"
                             " write 1-2",
                             "F:2:24: options.domain_ports[1]: 'x': 'x' is not a port number; " + FORMS]


def test_errors_are_located_in_the_domain_and_refuse_only_their_forward() -> None:
    found, refused = declared(ON, xml('ports="10080:80"', 'ports="10081:8x" frm="10.0.0.0/8"',
                                      'ports="10082:82" guest="other" proto="icmp"'))
    # no address given: found when the domain runs, for both families
    assert [line.split(" -> ")[0] for line in found] == ["tcp *:10080", "tcp *:10080"]
    assert refused == [
        "dom1 <metadata>: forward[1].frm: unknown key 'frm'; did you mean 'from'? known keys:"
        " guest, uuid, interface, ipv4, ipv6, ports, listen, from, localhost",
        "dom1 <metadata>: forward[1].ports[0]: '10081:8x': '8x' is not a port number; " + FORMS,
        "dom1 <metadata>: forward[2].guest: a domain's forwards are its own: leave out guest",
        "dom1 <metadata>: forward[2].proto: 'icmp': unknown protocol 'icmp'; use tcp, udp or sctp"]


def test_ports_outside_the_allowlist_and_ports_forward_toml_claims_are_refused() -> None:
    found, refused = declared(ON + WEB1, xml('ports="8080:80" ipv4="192.168.122.20"',
                                             'ports="10080:80" ipv4="192.168.122.20"',
                                             'ports="10081:81" ipv4="192.168.122.20"',
                                             'ports="10081:81" ipv4="192.168.122.20"'))
    assert found == ["tcp *:10081 -> 192.168.122.20:81 from *"]
    assert refused == [
        "dom1 <metadata>: forward[0].ports[0]: refused: host port(s) 8080-8080/tcp lie outside"
        " [options] domain_ports (10000-19999, 20053) of /etc/portfwd/forward.toml",
        "dom1 <metadata>: forward[1].ports[0]: refused: host port(s) 10080-10080/tcp are claimed"
        " by /etc/portfwd/forward.toml forward[0].ports[0] for web1, which wins",
        "dom1 <metadata>: forward[3].ports[0]: refused: host port(s) 10081-10081/tcp are claimed"
        " by dom1 <metadata> forward[2].ports[0] for dom1, which wins"]


def test_status_rows_of_refused_forwards() -> None:
    config = parse(ON, "F")
    xmls: Dict[str, bytes] = {"dom1": xml('ports="80" ipv4="192.168.122.20"'),
                              "plain": b"<domain><name>plain</name></domain>"}
    rows = [refused_row(*r) for r in refusals(config, (), xmls)]
    assert [(r["guest"], r["state"], r["target"], r["reason"]) for r in rows] == [
        ("dom1", "refused", "dom1 <metadata>", "forward[0].ports[0]: refused: host port(s)"
         " 80-80/tcp lie outside [options] domain_ports (10000-19999, 20053) of F")]


def test_a_domain_without_the_namespace_has_no_forwards() -> None:
    assert domainxml.parse(b"<domain><name>a</name><metadata><x/></metadata></domain>"
                           ).forwards == ()
    # the namespace is what counts, not the prefix
    other = b"<domain><metadata><pf:forwards xmlns:pf='urn:portfwd:other'><pf:forward" \
            b" ports='10080'/></pf:forwards></metadata></domain>"
    assert domainxml.parse(other).forwards == ()
