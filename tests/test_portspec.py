from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from portfwd.config import portspec
from portfwd.config.model import PortRange

ports = st.integers(min_value=1, max_value=65535)
protos = st.sampled_from(["tcp", "udp", "sctp"])


@pytest.mark.parametrize("spec, expected", [
    ("80", PortRange("tcp", 80, 80, 80)),
    ("8080:80", PortRange("tcp", 8080, 8080, 80)),
    ("2222:22/tcp", PortRange("tcp", 2222, 2222, 22)),
    ("5000-5010/udp", PortRange("udp", 5000, 5010, 5000)),
    ("6000-6009:7000-7009/sctp", PortRange("sctp", 6000, 6009, 7000)),
    ("1:65535", PortRange("tcp", 1, 1, 65535)),
])
def test_parses_documented_forms(spec: str, expected: PortRange) -> None:
    assert portspec.parse(spec) == expected


@pytest.mark.parametrize("spec, message", [
    ("0", "port 0 not in 1..65535"),
    ("65536", "port 65536 not in 1..65535"),
    ("80/TCP", "unknown protocol 'TCP'"),
    ("80/", "unknown protocol ''"),
    ("a:80", "'a' is not a port number"),
    ("８０", "is not a port number"),
    ("-80", "a port is 1 to 65535, not -80"),
    ("8086-:80", "the range '8086-' has no last port (write 8086-END, or 8086 alone)"),
    (" 80", "' 80' is not a port number"),
    ("90-80", "range 90-80 runs backwards"),
    ("1-2:3", "host range has 2 ports, guest range 1"),
    (":80", "no host port"),
    ("80:", "no guest port"),
    ("1:2:3", "'2:3' is not a port number"),
])
def test_rejects_with_reason(spec: str, message: str) -> None:
    with pytest.raises(portspec.PortSpecError) as e:
        portspec.parse(spec)
    assert message in str(e.value)
    assert repr(spec) in str(e.value)


def _span(first: int, last: int) -> str:
    return str(first) if first == last else f"{first}-{last}"


@given(ports, st.integers(0, 200), ports, protos, st.booleans(), st.booleans())
def test_round_trip(host: int, extra: int, guest: int, proto: str, with_host: bool,
                    with_proto: bool) -> None:
    """Any well-formed spec parses to the range it denotes, and prints back to it."""
    count = min(extra, 65535 - host, 65535 - guest) + 1
    host_span = _span(host, host + count - 1)
    guest_span = _span(guest, guest + count - 1)
    if not with_host:
        host, host_span = guest, guest_span
    spec = (f"{host_span}:" if with_host else "") + guest_span + (f"/{proto}" if with_proto else "")
    rng = portspec.parse(spec)
    assert rng == PortRange(proto if with_proto else "tcp", host, host + count - 1, guest)
    assert rng.count == count
    assert rng.pairs()[0] == (host, guest) and rng.pairs()[-1] == (host + count - 1, guest + count - 1)
    assert portspec.parse(str(rng)) == rng


@given(st.text(max_size=20))
def test_never_raises_anything_but_portspec_error(text: str) -> None:
    try:
        rng = portspec.parse(text)
    except portspec.PortSpecError:
        return
    assert 1 <= rng.host_first <= rng.host_last <= 65535
    assert 1 <= rng.guest_first <= rng.guest_last <= 65535
