"""Odd bytes on the host: interface names (any bytes but ``/``, ``:`` and ASCII
spaces) and process names (any bytes) are read as bytes, compared as the domain
XML names them, and shown escaped in every line portfwd prints or logs.

The parsers and the escaping run without root; the tests marked ``kernel`` give
a namespace's interfaces such names and run the hook, sync, status, check and
doctor there."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from typing import Iterator, List

import pytest

from netlab import HOST4, Lab
from pfhost import PortfwdHost, domain_xml, web1_config
from portfwd import escape
from portfwd.host import hostnet, listening
from portfwd.commands import trace
from portfwd.libvirt.domainxml import taps

# a UTF-8 name, and one that is no UTF-8 and holds an escape sequence
TAP_E = b"tap-\xc3\xa9"
ODD = b"odd\xff\x1b[31m"
# a process name: escape sequence, newline, a byte that is no UTF-8, RIGHT-TO-LEFT OVERRIDE
COMM = b"ev\x1b[2J\n\xff\xe2\x80\xae"
COMM_SHOWN = "ev\\x1b[2J\\x0a\\xff\\u202e"


@pytest.mark.parametrize("text, shown", [
    ("web1 tcp *:8080 -> 192.168.122.10:80", "web1 tcp *:8080 -> 192.168.122.10:80"),
    ("gäst 客", "gäst 客"),
    ("col\tumns", "col\tumns"),
    ("\x1b[31mred\x1b[0m", "\\x1b[31mred\\x1b[0m"),
    ("a\rb\x00c\x7f", "a\\x0db\\x00c\\x7f"),
    ("\x85\xa0", "\\x85\\xa0"),  # NEL, NO-BREAK SPACE
    ("evil\u202egnp.exe", "evil\\u202egnp.exe"),  # bidi override
    ("w\u200beb1\u2066\ufeff", "w\\u200beb1\\u2066\\ufeff"),  # zero-width, isolate, BOM
    ("line\u2028sep\nforged", "line\\u2028sep\\x0aforged"),  # one line stays one line
    ("tag\U000e0041", "tag\\U000e0041"),
    (hostnet.ifname(ODD), "odd\\xff\\x1b[31m"),  # a byte that was no UTF-8
    ("half \ud800", "half \\ud800"),  # a surrogate that stands for no byte
])
def test_escape_shows_what_is_not_printable(text: str, shown: str) -> None:
    assert escape.printable(text) == shown


def test_a_log_message_is_one_escaped_line_and_syslog_takes_it() -> None:
    """Before: a name holding a byte that was no UTF-8 made syslog raise
    UnicodeEncodeError inside the hook's logging, and a newline in a name made a
    second message."""
    code = ("from portfwd import log\nlog.use_syslog()\n"
            "log.error('guest x\\x1b[2J\\udcff\\u202e\\nforged')\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True,
                       env={"PATH": os.environ["PATH"], "LC_ALL": "C"})
    assert r.returncode == 0, r.stderr
    assert r.stderr == b"portfwd: error: guest x\\x1b[2J\\xff\\u202e\\x0aforged\n"


# the routes of a host with odd interface names, as /proc/net/route and ipv6_route print them
ROUTE = (b"Iface\tDestination\tGateway \tFlags\tRefCnt\tUse\tMetric\tMask\t\tMTU\tWindow\tIRTT\n"
         b"tap-\xc3\xa9\t0000090A\t00000000\t0001\t0\t0\t0\t00FFFFFF\t0\t0\t0\n"
         b"a\x1cb\t0000080A\t00000000\t0001\t0\t0\t0\t00FFFFFF\t0\t0\t0\n"
         b"junk\tnothex\t00000000\t0001\t0\t0\t0\t00FFFFFF\t0\t0\t0\n"
         b"\xff\xfe\t00000000\t0100000A\t0003\t0\t0\t5\t00000000\t0\t0\t0\n")
ROUTE6 = (b"fd090000000000000000000000000000 40 00000000000000000000000000000000 00"
          b" 00000000000000000000000000000000 00000100 00000001 00000000 00000001"
          b"   odd\xff\x1b[31m\n"
          b"fd0a0000000000000000000000000000 40 00000000000000000000000000000000 00"
          b" 00000000000000000000000000000000 00000100 00000001 00000000 00000001"
          b"   x\xe2\x80\xa8y\n"
          b"zz 40 00 00 00 00000100 00000001 00000000 00000001 bad\n")


def test_route_tables_are_parsed_as_bytes() -> None:
    """Fields split at ASCII whitespace only (str.split would cut the names at
    \\x1c and U+2028); names decoded as ``ifname`` does; a malformed line skipped."""
    routes = hostnet.RouteTable(ROUTE, ROUTE6)
    assert routes.interface_for("10.9.0.7") == "tap-é"
    assert routes.interface_for("10.8.0.7") == "a\x1cb"
    assert routes.interface_for("fd09::7") == "odd\udcff\x1b[31m"
    assert routes.interface_for("fd0a::7") == "x\u2028y"
    assert routes.default_interface(4) == "\udcff\udcfe"
    assert routes.default_interface(6) is None
    # the name opens the interface's files again: os turns it back into its bytes
    assert os.fsencode(routes.interface_for("fd09::7") or "") == ODD
    # as text (the form the tests of discovery give): the same table
    text = hostnet.RouteTable(ROUTE.decode("utf-8", "surrogateescape"),
                              ROUTE6.decode("utf-8", "surrogateescape"))
    assert text.routes == routes.routes


def test_proc_values_of_any_bytes_are_read(tmp_path: "os.PathLike[str]") -> None:
    path = os.path.join(str(tmp_path), "comm")
    with open(path, "wb") as f:
        f.write(COMM + b"\n")
    value = hostnet.read_sysctl(path)
    assert value is not None and escape.printable(value) == COMM_SHOWN


def test_listening_sockets_name_a_process_of_any_name(tmp_path: "os.PathLike[str]") -> None:
    """/proc/net/tcp and /proc/PID/comm of a fake /proc: the process is named, its
    bytes kept; a line the kernel would not print is skipped."""
    proc = str(tmp_path)
    os.makedirs(os.path.join(proc, "net"))
    os.makedirs(os.path.join(proc, "4242", "fd"))
    head = b"  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt" \
           b"   uid  timeout inode\n"
    with open(os.path.join(proc, "net", "tcp"), "wb") as f:
        f.write(head + b"   0: 00000000:1F90 00000000:0000 0A 00000000:00000000 00:00000000"
                       b" 00000000     0        0 12345 1 0000000000000000 100 0 0 10 0\n"
                       b"   1: zz:1F91 00000000:0000 0A 00000000:00000000 00:00000000"
                       b" 00000000     0        0 777 1 0000000000000000 100 0 0 10 0\n")
    os.symlink("socket:[12345]", os.path.join(proc, "4242", "fd", "3"))
    with open(os.path.join(proc, "4242", "comm"), "wb") as f:
        f.write(COMM + b"\n")
    found = listening.sockets(proc)
    assert [(s.proto, s.address, s.port) for s in found] == [("tcp", "0.0.0.0", 8080)]
    assert escape.printable(found[0].process) == f"{COMM_SHOWN} (pid 4242)"


def test_taps_of_the_domain_xml_equal_the_kernels_names() -> None:
    xml = domain_xml("web1", taps=("vn\xe9t0",))
    assert taps(xml) == [hostnet.ifname(b"vn\xc3\xa9t0")] == ["vnét0"]
    # bytes that are no UTF-8 make no XML (libvirt writes none): no tap, nothing raised
    assert taps(xml.replace("vnét0".encode(), ODD)) == []


def test_trace_reads_quoted_interface_names_whole() -> None:
    line = 'trace id 1 inet t postrouting packet: oif "x\u2028y" ip daddr 192.168.150.10 tcp dport 80'
    assert trace._field(line, "oif") == "x\u2028y"
    assert trace._field(line, "ip daddr") == "192.168.150.10"
    step = trace.Step("inet", "t", "postrouting", "packet", line.split("packet: ")[1], "")
    assert trace.outcome([step], "x\u2028y")[0] is True


# -- in a namespace --------------------------------------------------------------------------

STRICT = "[options]\nstrict = true\n" + web1_config("8080:80")


def ns_bytes(lab: Lab, *argv: bytes) -> None:
    """Run ``argv`` (bytes: interface names as the kernel takes them) in the host."""
    r = subprocess.run([b"ip", b"netns", b"exec", lab.host.encode(), *argv],
                       capture_output=True)
    assert r.returncode == 0, (argv, r.stderr)


def sysfs(lab: Lab, name: bytes, attribute: str) -> str:
    r = subprocess.run([b"ip", b"netns", b"exec", lab.host.encode(), b"cat",
                        b"/sys/class/net/" + name + b"/" + attribute.encode()],
                       capture_output=True, check=True)
    return r.stdout.decode().strip()


def odd_interfaces(lab: Lab) -> bytes:
    """A veth pair named ``tap-é`` and ``odd\\xff\\x1b[31m``, with routes of both
    families, and the guest's tap renamed ``vnét0``; returns the tap's name."""
    tap = b"vn\xc3\xa9t0"
    ns_bytes(lab, b"ip", b"link", b"add", TAP_E, b"type", b"veth", b"peer", b"name", ODD)
    ns_bytes(lab, b"ip", b"addr", b"add", b"10.9.0.1/24", b"dev", TAP_E)
    ns_bytes(lab, b"ip", b"addr", b"add", b"fd09::1/64", b"dev", ODD, b"nodad")
    for name in (TAP_E, ODD):
        ns_bytes(lab, b"ip", b"link", b"set", name, b"up")
    ns_bytes(lab, b"ip", b"link", b"set", b"vnet0", b"down")
    ns_bytes(lab, b"ip", b"link", b"set", b"vnet0", b"name", tap)
    ns_bytes(lab, b"ip", b"link", b"set", tap, b"master", b"br0", b"up")
    return tap


def node_xml(path: str) -> str:
    """libvirt's test driver with web1 running (no daemon: ``test:///PATH``)."""
    with open(path, "w", encoding="utf-8") as f:
        f.write("<node><domain type='test'><name>web1</name><memory>65536</memory>"
                "<os><type>hvm</type></os></domain></node>\n")
    return f"test://{path}"


def assert_clean(r: "subprocess.CompletedProcess[bytes]") -> None:
    assert r.returncode == 0, r.stderr
    assert b"internal error" not in r.stderr and b"Traceback" not in r.stderr, r.stderr


@pytest.mark.kernel
def test_odd_interface_names_change_nothing(pf: PortfwdHost, tmp_path: "os.PathLike[str]"
                                            ) -> None:
    """Before: the started hook raised UnicodeDecodeError reading /proc/net/ipv6_route
    and, with strict = true, failed the guest. Now hook, sync and status apply and
    show what they do without such names, and hairpin mode reaches the renamed tap."""
    lab = pf.lab
    pf.write_config(STRICT)
    assert_clean(pf.hook("web1", "started"))
    plain = pf.table()
    assert_clean(pf.hook("web1", "stopped", "end"))

    tap = odd_interfaces(lab)
    xml = domain_xml("web1", taps=(tap.decode(),)).replace(b"virbr0", b"br0")
    r = pf.hook("web1", "started", xml=xml)
    assert_clean(r)
    assert pf.table() == plain
    assert sysfs(lab, tap, "brport/hairpin_mode") == "1"  # the XML's name found the port
    lab.serve("tcp", [80])
    assert lab.reach("tcp", HOST4, 8080) is not None

    uri = node_xml(os.path.join(str(tmp_path), "node.xml"))
    assert_clean(pf.cli("sync", "--connect", uri))
    assert pf.table() == plain
    r = pf.cli("status", "--json")
    assert_clean(r)
    assert {row["state"] for row in json.loads(r.stdout)["forwards"]} == {"active"}
    assert_clean(pf.cli("status"))

    assert_clean(pf.hook("web1", "stopped", "end", xml=xml))
    assert pf.elements() == {}
    assert sysfs(lab, tap, "brport/hairpin_mode") == "0"  # put back


class Listener:
    """A process in the lab's host namespace named ``COMM``, listening on tcp 8080."""

    def __init__(self, lab: Lab) -> None:
        code = textwrap.dedent("""\
            import socket, sys
            with open("/proc/self/comm", "wb") as f:
                f.write(bytes.fromhex(sys.argv[1]))
            s = socket.socket()
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind(("0.0.0.0", 8080))
            s.listen()
            print("ready", flush=True)
            sys.stdin.read()
            """)
        self.proc = subprocess.Popen(["ip", "netns", "exec", lab.host, sys.executable, "-c",
                                      code, COMM.hex()], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE)
        assert self.proc.stdout is not None and self.proc.stdout.readline() == b"ready\n"

    def close(self) -> None:
        self.proc.communicate(timeout=30)


@pytest.fixture
def listener(lab: Lab) -> Iterator[Listener]:
    one = Listener(lab)
    try:
        yield one
    finally:
        one.close()


def shown_lines(out: bytes) -> List[str]:
    """Lines of output that hold nothing a terminal obeys."""
    text = out.decode("utf-8")
    assert all(c.isprintable() or c in "\t\n" for c in text), repr(text)
    return text.splitlines()


@pytest.mark.kernel
def test_a_process_name_is_shown_escaped_by_check_and_doctor(pf: PortfwdHost,
                                                             listener: Listener) -> None:
    """Before: doctor ended in a traceback (UnicodeDecodeError on /proc/PID/comm),
    and check printed the name raw: its escape sequence cleared the terminal."""
    lab = pf.lab
    pf.write_config(web1_config("8080:80"))
    r = pf.cli("check")
    assert r.returncode == 0, r.stderr
    warned = [line for line in shown_lines(r.stderr) if "listens there" in line]
    assert len(warned) == 1 and f": {COMM_SHOWN} (pid " in warned[0], r.stderr

    status = os.path.join(os.path.dirname(pf.config), "status")
    os.mkdir(status)
    mac = lab.ns(lab.guest, "cat", "/sys/class/net/eth0/address").stdout.decode().strip()
    xml = domain_xml("web1", mac=mac).replace(b"virbr0", b"br0")
    with open(os.path.join(status, "web1.xml"), "wb") as f:
        f.write(xml)
    assert_clean(pf.hook("web1", "started", xml=xml))
    lab.ns(lab.host, "bridge", "link", "set", "dev", "vnet0", "hairpin", "on")
    r = pf.cli("doctor", "--libvirt-status", status, "web1")
    assert r.returncode == 5, r.stderr
    assert b"Traceback" not in r.stderr
    lines = shown_lines(r.stdout)
    assert lines[-2].startswith("FAIL web1: listener: ") and lines[-1].startswith("     fix: ")
    assert f"{COMM_SHOWN} (pid " in lines[-2], lines
    r = pf.cli("doctor", "--libvirt-status", status, "--json", "web1")
    assert r.returncode == 5 and r.stdout.isascii()  # JSON escapes all but ASCII itself
    last = json.loads(r.stdout)[-1]
    assert last["layer"] == "listener" and hostnet.ifname(COMM) in last["detail"]
