"""``portfwd trace``: one probe through a forward, followed by nftables tracing.

The probe. A packet the host sends itself is not what a client sends: it takes
the output hooks (portfwd's nat ``output`` chain) and never meets the forward
hook, where libvirt's reject and most firewalls' drops sit. So by default the
probe is a client's packet: a TCP SYN (or a UDP datagram) from a source that is
not the host's, written to the loopback device with a packet socket. The kernel
receives it as it receives any packet (iif ``lo``): prerouting (portfwd's DNAT),
routing, forward, postrouting, out of the guest's bridge. Only rules that match
the input interface (``iifname "eth0"``) judge it differently from a real
client's. The default source is a documentation address (192.0.2.1,
2001:db8::1): the guest's answer goes to the default route and dies there.
``--from`` names another; a forward limited by ``from`` needs one of its
sources. A ``--from`` that is one of the host's own addresses sends a real
connection from the host instead (output hooks), as the host itself would reach
the forward.

The tracing. A table of its own, ``inet portfwd_trace_PID``, with chains at
priority -500 on prerouting and output that set ``meta nftrace`` for the probe's
exact addresses and ports, and empty chains at priority 500 on postrouting and
input that show where the packet leaves. ``nft monitor`` runs meanwhile (its
echo of the table's creation says it listens); its ``trace`` lines are parsed.
The table is deleted in every case (``finally``: errors, Ctrl-C).
"""

from __future__ import annotations

import argparse
import os
import random
import re
import socket
import struct
import subprocess
import time
from typing import Dict, List, Optional, Tuple

from portfwd.host import hostnet, proc
from portfwd import log
from portfwd.engine import Engine
from portfwd.errors import ConfigError, HostError

EXIT_NOT_DELIVERED = 5
DEFAULT_SOURCE = {4: "192.0.2.1", 6: "2001:db8::1"}
TRACE_PRIORITY = 500


class Step:
    """One trace event: a chain's rule or policy verdict, or a packet seen at a chain."""

    __slots__ = ("family", "table", "chain", "kind", "text", "verdict")

    def __init__(self, family: str, table: str, chain: str, kind: str, text: str,
                 verdict: str) -> None:
        self.family = family
        self.table = table
        self.chain = chain
        self.kind = kind  # "packet", "rule", "verdict", "policy"
        self.text = text
        self.verdict = verdict


class Result:
    __slots__ = ("probe", "how", "steps", "delivered", "ending", "bridge")

    def __init__(self, probe: str, how: str, steps: List[Step], bridge: Optional[str]) -> None:
        self.probe = probe
        self.how = how
        self.steps = steps
        self.bridge = bridge
        self.delivered, self.ending = outcome(steps, bridge)


_LINE = re.compile(r"^trace id (\S+) (\S+) (\S+) (\S+) (packet|rule|verdict|policy):? ?(.*)$")
_VERDICT = re.compile(r"\(verdict (\w+(?: \S+)?)\)\s*$")


def parse(lines: List[str], own_table: str) -> List[Step]:
    """Trace lines of ``nft monitor`` → the steps of the first traced packet (a host
    connection may retransmit), our own table's verdicts left out."""
    steps = []
    first: Optional[str] = None
    for line in lines:
        m = _LINE.match(line.strip())
        if not m:
            continue
        trace_id, family, table, chain, kind, rest = m.groups()
        first = first or trace_id
        if trace_id != first:
            continue
        rest = rest.strip()
        verdict = ""
        if kind == "rule":
            v = _VERDICT.search(rest)
            verdict = v.group(1) if v else ""
            rest = _VERDICT.sub("", rest).strip()
        elif kind in ("verdict", "policy"):
            verdict = rest.split()[0] if rest else ""
        if table == own_table and kind != "packet":
            continue
        steps.append(Step(family, table, chain, kind, rest, verdict))
    return steps


def _field(text: str, name: str) -> Optional[str]:
    """The value after ``name`` in a trace line; a quoted one (an interface name:
    any bytes but ASCII spaces) whole."""
    m = re.search(rf'(?:^| ){re.escape(name)} (?:"([^"]*)"|([^\s"]+))', text)
    return (m.group(1) if m.group(1) is not None else m.group(2)) if m else None


def outcome(steps: List[Step], bridge: Optional[str]) -> Tuple[bool, str]:
    """Whether the probe left by the guest's bridge, and the last line to print."""
    for s in steps:
        if s.kind != "packet" or s.chain != "postrouting":
            continue
        oif = _field(s.text, "oif")
        daddr = _field(s.text, "ip daddr") or f"[{_field(s.text, 'ip6 daddr')}]"
        dport = _field(s.text, "tcp dport") or _field(s.text, "udp dport")
        if oif and (bridge is None or oif == bridge):
            return True, f"delivered: out of {oif} to {daddr}:{dport}"
        if oif:
            return False, f"not delivered: routed out of {oif} to {daddr}:{dport}, not to the" \
                          f" guest's bridge {bridge} (no DNAT?)"
    for s in steps:
        if s.kind == "packet" and s.chain == "input":
            return False, "not delivered: the host took it itself (input): nothing DNATed it"
    for s in reversed(steps):
        if s.verdict in ("drop", "reject"):
            return False, f"dropped: table {s.family} {s.table} chain {s.chain}" + (
                f" rule {s.text}" if s.kind == "rule" else f" ({s.kind} {s.verdict})")
    last = next((s for s in reversed(steps) if s.kind != "packet"), None)
    where = f" after table {last.family} {last.table} chain {last.chain}" if last else ""
    return False, (f"lost{where}: the kernel dropped it outside nftables (routing: forwarding"
                   " off, rp_filter, no route to the guest) -- see portfwd doctor")


def render(r: Result) -> List[str]:
    out = [f"probe: {r.probe}", f"       {r.how}"]
    for s in r.steps:
        if s.kind == "packet":
            continue
        what = f"rule {s.text}" if s.kind == "rule" else s.kind
        out.append(f"  {s.family} {s.table} {s.chain}: {what} -> {s.verdict or '?'}")
    out.append(r.ending)
    return out


# -- the probe --------------------------------------------------------------------------

def _checksum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    total: int = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def packet(proto: str, src: str, dst: str, sport: int, dport: int) -> bytes:
    """An IPv4 or IPv6 packet: a TCP SYN or an empty UDP datagram, checksums filled in."""
    six = ":" in dst
    af = socket.AF_INET6 if six else socket.AF_INET
    s, d = socket.inet_pton(af, src), socket.inet_pton(af, dst)
    number = 6 if proto == "tcp" else 17
    if proto == "tcp":
        l4 = struct.pack("!HHLLBBHHH", sport, dport, random.getrandbits(32), 0, 5 << 4, 0x02,
                         65535, 0, 0)
        at = 16
    else:
        l4 = struct.pack("!HHHH", sport, dport, 8, 0)
        at = 6
    pseudo = s + d + (struct.pack("!L3xB", len(l4), number) if six
                      else struct.pack("!BBH", 0, number, len(l4)))
    l4 = l4[:at] + struct.pack("!H", _checksum(pseudo + l4)) + l4[at + 2:]
    if six:
        return struct.pack("!LHBB", 6 << 28, len(l4), number, 64) + s + d + l4
    head = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(l4), random.getrandbits(16), 0, 64,
                       number, 0, s, d)
    return head[:10] + struct.pack("!H", _checksum(head)) + head[12:] + l4


def inject(frame_payload: bytes, six: bool) -> None:
    """Hand a packet to the kernel as received on ``lo`` (written to lo, which loops it)."""
    with socket.socket(socket.AF_PACKET, socket.SOCK_RAW) as sk:
        sk.bind(("lo", 0))
        sk.send(b"\0" * 12 + struct.pack("!H", 0x86DD if six else 0x0800) + frame_payload)


def send_from_host(proto: str, src: str, dst: str, sport: int, dport: int) -> socket.socket:
    """The host's own connection attempt (left open until the trace is read)."""
    af = socket.AF_INET6 if ":" in dst else socket.AF_INET
    sk = socket.socket(af, socket.SOCK_STREAM if proto == "tcp" else socket.SOCK_DGRAM)
    sk.bind((src, sport))
    if proto == "tcp":
        sk.setblocking(False)
        try:
            sk.connect((dst, dport))
        except (BlockingIOError, OSError):
            pass
    else:
        sk.sendto(b"portfwd trace", (dst, dport))
    return sk


# -- the tracing table -------------------------------------------------------------------

def trace_table_text(table: str, proto: str, src: str, dst: str, sport: int, dport: int) -> str:
    ip = "ip6" if ":" in dst else "ip"
    match = f"{ip} saddr {src} {ip} daddr {dst} {proto} sport {sport} {proto} dport {dport}"
    return (f"add table inet {table}\n"
            f"add chain inet {table} prerouting {{ type filter hook prerouting priority"
            f" -{TRACE_PRIORITY}; }}\n"
            f"add chain inet {table} output {{ type filter hook output priority"
            f" -{TRACE_PRIORITY}; }}\n"
            f"add chain inet {table} postrouting {{ type filter hook postrouting priority"
            f" {TRACE_PRIORITY}; }}\n"
            f"add chain inet {table} input {{ type filter hook input priority"
            f" {TRACE_PRIORITY}; }}\n"
            f"add rule inet {table} prerouting {match} meta nftrace set 1\n"
            f"add rule inet {table} output {match} meta nftrace set 1\n")


NFT_WAIT = 30.0  # seconds an `nft` run of the trace may take


def _nft(text: str) -> None:
    r = proc.run(["nft", "-f", "-"], NFT_WAIT, package="nftables", input=text)
    if r.returncode != 0:
        raise HostError(f"nft refused the trace table: {r.stderr.strip()}")


class Lines:
    """Lines of a process's stdout read straight from its descriptor (a buffered
    file object would hide read-ahead lines from ``select``)."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.buffer = b""
        self.lines: List[str] = []

    def until(self, want: str, deadline: float, ends: Tuple[str, ...] = ()) -> List[str]:
        """Lines up to one containing ``want`` ("" = all until ``deadline``); after a
        line containing one of ``ends``, only a short while longer."""
        import select

        got: List[str] = []
        while True:
            while b"\n" in self.buffer:
                line, self.buffer = self.buffer.split(b"\n", 1)
                text = line.decode("utf-8", "surrogateescape")  # names as hostnet.ifname
                got.append(text)
                if want and want in text:
                    return got
                if any(end in text for end in ends):
                    deadline = min(deadline, time.monotonic() + 0.2)
            left = deadline - time.monotonic()
            if left <= 0:
                return got
            ready, _, _ = select.select([self.fd], [], [], left)
            if not ready:
                return got
            chunk = os.read(self.fd, 65536)
            if not chunk:
                return got
            self.buffer += chunk


# -- the command ---------------------------------------------------------------------------

def _forward(engine: Engine, guest: str, port: int, proto: str, family: int
             ) -> Tuple[str, str, int]:
    """(listen address or "*", guest address, guest port) of the applied forward."""
    st = engine.read_state(guest)
    for b in st.bindings if st else []:
        if b.proto == proto and b.family == family and port in b.host_ports:
            gport = port if b.is_range else b.guest_port
            return b.listen, b.address, gport
    raise ConfigError([f"guest {guest}: no applied IPv{family} forward of host port {port}/{proto}"
                       f" (see portfwd status; portfwd doctor {guest})"])


def _listen_address(listen: str, family: int, bridge: Optional[str]) -> str:
    """The forward's listen address; for every address, one of the host's that is not
    on the guest's bridge (where a client from outside would connect)."""
    if listen != "*":
        return listen
    skip = ("127.", "::1", "fe80:")
    routes = hostnet.RouteTable()
    found = sorted((routes.interface_for(a) == bridge, a) for a in hostnet.local_addresses()
                   if (":" in a) == (family == 6) and not a.startswith(skip))
    if not found:
        raise HostError(f"no IPv{family} address on this host to probe")
    return found[0][1]


def _strict_rp_filter() -> bool:
    """Whether reverse-path filtering is strict on lo (the kernel uses the larger of
    ``all`` and the interface's value)."""
    values = [hostnet.read_sysctl(f"/proc/sys/net/ipv4/conf/{c}/rp_filter") or "0"
              for c in ("all", "lo")]
    return max(int(v) for v in values) == 1


def shown(address: str) -> str:
    return f"[{address}]" if ":" in address else address


def run(config_path: str, guest: str, port: int, proto: str, source: Optional[str],
        family: int, timeout: float) -> Result:
    """Trace one probe to ``guest``'s forward of host ``port``; the table is always removed."""
    if source is not None:
        family = 6 if ":" in source else 4
    engine = Engine(config_path)
    listen, target, gport = _forward(engine, guest, port, proto, family)
    bridge = hostnet.RouteTable().interface_for(target)
    dst = _listen_address(listen, family, bridge)
    src = source or DEFAULT_SOURCE[family]
    local = src in hostnet.local_addresses()
    sport = random.randint(40000, 60000)
    table = f"portfwd_trace_{os.getpid()}"
    probe = f"{proto} {shown(src)}:{sport} -> {shown(dst)}:{port} (forward to {shown(target)}:{gport})"
    how = ("sent by the host itself (a host address): output hooks, not prerouting/forward"
           if local else "a client's packet handed to the kernel on lo: prerouting, forward,"
                         " postrouting")
    if not local and family == 4 and _strict_rp_filter():
        how += ("; but rp_filter is strict (1) here, which drops it after prerouting (its"
                " source is not routed via lo): a lost probe says nothing then; use --from a"
                " host address, or a real client")
    try:
        monitor = subprocess.Popen(["nft", "monitor"], stdout=subprocess.PIPE,
                                   stderr=subprocess.DEVNULL)
    except FileNotFoundError:
        raise HostError("nft not found: apt-get install nftables") from None
    assert monitor.stdout is not None
    reader = Lines(monitor.stdout.fileno())
    lines: List[str] = []
    sock: Optional[socket.socket] = None
    created = False
    try:
        created = True
        _nft(trace_table_text(table, proto, src, dst, sport, port))
        reader.until(f"table inet {table}", time.monotonic() + 5)  # it listens now
        if local:
            sock = send_from_host(proto, src, dst, sport, port)
        else:
            inject(packet(proto, src, dst, sport, port), family == 6)
        # the probe's journey ends at our own last chains, or at a drop
        lines = reader.until("", time.monotonic() + timeout, (
            f"inet {table} postrouting packet:", f"inet {table} input packet:",
            "(verdict drop)", "policy drop"))
    finally:
        if sock is not None:
            sock.close()
        monitor.terminate()
        try:
            monitor.wait(timeout=5)
        except subprocess.TimeoutExpired:
            monitor.kill()
            monitor.wait()
        if monitor.stdout is not None:
            monitor.stdout.close()
        if created:
            try:
                proc.run(["nft", "delete", "table", "inet", table], NFT_WAIT)
            except HostError as e:  # the trace table is ours alone: say how to remove it
                log.error(f"{e}; remove the trace table by hand: nft delete table inet {table}")
    return Result(probe, how, parse(lines, table), bridge)


def cmd_trace(args: argparse.Namespace) -> int:
    from portfwd.rundir import state
    from portfwd.console import say, unknown_asked, usage_error
    from portfwd.errors import EXIT_OK, EXIT_USAGE

    if args.source is not None and args.family == 6 and ":" not in args.source:
        say(f"portfwd trace: error: argument --from: {args.source} is an IPv4 address, and -6"
            " asks for the IPv6 forward: give an IPv6 address, or leave out -6", err=True)
        return EXIT_USAGE
    unknown = unknown_asked([args.guest], None, args.config)
    if unknown:
        return usage_error("trace", unknown)
    result = run(state.config_path(args.config), args.guest, args.port, args.proto,
                       args.source, args.family, args.timeout)
    say(*render(result))
    return EXIT_OK if result.delivered else EXIT_NOT_DELIVERED
