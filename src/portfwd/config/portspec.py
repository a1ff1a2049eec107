"""Port specs: ``[HOST[-END]:]GUEST[-END][/tcp|udp|sctp]`` and the table form."""

from __future__ import annotations

from typing import List, Sequence, Tuple

from portfwd.config.model import PortRange
from portfwd.constants import PROTOCOLS


# nftables 1.0.6 cannot shift a port range in one element (the kernel's NAT port
# offset is out of its reach), so a range whose guest ports differ from its host
# ports costs one element per port; beyond this many the hook grows slow and big.
SHIFTED_MAX = 1024


class PortSpecError(ValueError):
    """A port spec is malformed; the message says how to write it."""


FORMS = ("accepted forms: \"8080:80\", \"80\", \"5000-5010\", \"8000-8010:9000-9010\", each"
         " with /tcp, /udp or /sctp, or { host = 8080, guest = 80 }")


def _port(text: str, spec: str) -> int:
    if not text.isdigit() or not text.isascii():
        raise PortSpecError(f"{spec!r}: {text!r} is not a port number; {FORMS}")
    value = int(text)
    if not 1 <= value <= 65535:
        raise PortSpecError(f"{spec!r}: port {text} not in 1..65535")
    return value


def parse_span(text: str, spec: str) -> Tuple[int, int]:
    """``"80"`` → (80, 80); ``"5000-5010"`` → (5000, 5010)."""
    first, sep, last = text.partition("-")
    if sep and not first:
        what = (f"a port is 1 to 65535, not {text}" if last.isdigit() and last.isascii()
                else f"the range {text!r} has no first port")
        raise PortSpecError(f"{spec!r}: {what}; {FORMS}")
    if sep and not last:
        raise PortSpecError(f"{spec!r}: the range {text!r} has no last port (write"
                            f" {first}-END, or {first} alone); {FORMS}")
    low = _port(first, spec)
    high = _port(last, spec) if sep else low
    if high < low:
        raise PortSpecError(f"{spec!r}: range {low}-{high} runs backwards; write {high}-{low}")
    return low, high


def check_proto(proto: str, spec: str) -> str:
    if proto not in PROTOCOLS:
        hint = f" (lower case: {proto.lower()!r})" if proto.lower() in PROTOCOLS else ""
        raise PortSpecError(f"{spec!r}: unknown protocol {proto!r}; use tcp, udp or sctp{hint}")
    return proto


def _docker_hint(spec: str, body: str) -> None:
    """Docker's ``ADDRESS:HOST:GUEST`` (``-p 127.0.0.1:8081:80``): say where the address goes."""
    rest, _, guest = body.rpartition(":")
    address, _, host = rest.rpartition(":")
    address = address.strip("[]")
    if address.isdigit():  # "1:2:3": not an address, just a malformed spec
        return
    proto = spec[len(body) + 1:]
    table = f"host = {host}, guest = {guest}" + (f", proto = \"{proto}\"" if proto else "")
    if address.startswith("127."):
        raise PortSpecError(
            f"{spec!r}: an address in a port spec is Docker's way; portfwd forwards 127.0.0.1"
            f" with localhost = true: write {{ {table} }} and set localhost = true in this"
            " [[forward]] (listen then says which other addresses answer)")
    raise PortSpecError(
        f"{spec!r}: an address in a port spec is Docker's way; portfwd takes it in listen:"
        f" {{ {table}, listen = [\"{address}\"] }} (or listen = [\"{address}\"] for the whole"
        " [[forward]])")


def make_range(proto: str, host: Tuple[int, int], guest: Tuple[int, int], spec: str) -> PortRange:
    """Join host and guest spans, which must be of equal length."""
    host_len = host[1] - host[0]
    guest_len = guest[1] - guest[0]
    if host_len != guest_len:
        raise PortSpecError(
            f"{spec!r}: host range has {host_len + 1} ports, guest range {guest_len + 1};"
            " ranges must be of equal length")
    count = host_len + 1
    if host[0] != guest[0] and count > SHIFTED_MAX:
        raise PortSpecError(
            f"{spec!r}: a range whose guest ports differ from its host ports holds at most"
            f" {SHIFTED_MAX} ports, this one {count}: nftables cannot shift a port range,"
            " so each of its ports would be an element of its own; forward the same ports"
            f" on both sides (\"{guest[0]}-{guest[1]}\" is one element), or split it")
    return PortRange(proto, host[0], host[1], guest[0])


def parse(spec: str) -> PortRange:
    """Parse the string form of a port spec."""
    body, slash, proto = spec.partition("/")
    proto = check_proto(proto, spec) if slash else "tcp"
    if body.count(":") >= 2:
        _docker_hint(spec, body)
    host_text, colon, guest_text = body.partition(":")
    if not colon:
        guest_text = host_text
    if not host_text or not guest_text:
        side = "host" if colon and not host_text else "guest"
        raise PortSpecError(f"{spec!r}: no {side} port; {FORMS}")
    return make_range(proto, parse_span(host_text, spec), parse_span(guest_text, spec), spec)


def with_protos(specs: Sequence[str], protos: Sequence[str]) -> List[str]:
    """``specs`` with each one written without ``/PROTO`` once per protocol of
    ``protos`` (none: as written, tcp); duplicates once."""
    out: List[str] = []
    for spec in specs:
        if "/" in spec or not protos:
            out.append(spec)
        else:
            out += [spec if p == "tcp" else f"{spec}/{p}" for p in protos]
    return list(dict.fromkeys(out))
