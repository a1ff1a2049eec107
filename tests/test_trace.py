"""``portfwd trace``: one probe through the forward, chain by chain, in a namespace lab;
the tracing table never stays behind."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from typing import List

import pytest

from netlab import CLIENT4, CLIENT6, GUEST4, GUEST6, HOST4, HOST6, Lab
from pfhost import PortfwdHost, web1_config

from portfwd.commands import trace

pytestmark = pytest.mark.kernel


@pytest.fixture
def tlab(lab: Lab, pf: PortfwdHost) -> Lab:
    pf.write_config(web1_config("8080:80", "5353:53/udp"))
    assert pf.hook("web1", "started").returncode == 0
    lab.serve("tcp", [80])
    return lab


def tables(lab: Lab) -> List[str]:
    return lab.ns(lab.host, "nft", "list", "tables").stdout.decode().split("\n")


def run_trace(pf: PortfwdHost, *args: str) -> "subprocess.CompletedProcess[bytes]":
    r = pf.cli("trace", "web1", *args)
    assert not any("portfwd_trace" in t for t in tables(pf.lab)), tables(pf.lab)
    return r


@pytest.mark.parametrize("args,target", [
    (["8080"], f"{GUEST4}:80"),
    (["8080", "--from", CLIENT4], f"{GUEST4}:80"),
    (["8080", "-6"], f"[{GUEST6}]:80"),
    (["8080", "--from", CLIENT6], f"[{GUEST6}]:80"),
    (["5353", "--proto", "udp"], f"{GUEST4}:53"),
], ids=["ipv4", "ipv4 from the client", "ipv6", "ipv6 from the client", "udp"])
def test_a_working_forward_shows_the_dnat_and_the_delivery(tlab: Lab, pf: PortfwdHost,
                                                          args: List[str], target: str) -> None:
    r = run_trace(pf, *args)
    out = r.stdout.decode()
    assert r.returncode == 0, out + r.stderr.decode()
    lines = out.splitlines()
    assert "a client's packet handed to the kernel on lo" in out
    dnat = [line for line in lines if line.startswith("  inet portfwd prerouting: rule")]
    assert len(dnat) == 1 and " dnat ip" in dnat[0] and dnat[0].endswith("-> accept"), out
    assert lines[-1] == f"delivered: out of br0 to {target}", out


def test_from_a_host_address_takes_the_output_path(tlab: Lab, pf: PortfwdHost) -> None:
    r = run_trace(pf, "8080", "--from", HOST4)
    out = r.stdout.decode()
    assert r.returncode == 0, out
    assert "sent by the host itself" in out
    assert any(line.startswith("  inet portfwd output: rule") and "dnat ip" in line
               for line in out.splitlines()), out
    assert not any(" prerouting: " in line for line in out.splitlines()), out
    assert out.splitlines()[-1] == f"delivered: out of br0 to {GUEST4}:80"


def test_a_foreign_drop_is_named_with_table_and_chain(tlab: Lab, pf: PortfwdHost) -> None:
    tlab.ns(tlab.host, "nft", "-f", "-",
            input=b"add table inet filter\nadd chain inet filter forward"
                  b" { type filter hook forward priority 0; }\n"
                  b"add rule inet filter forward oifname \"br0\" tcp dport 80 counter drop\n")
    r = run_trace(pf, "8080", "--from", CLIENT4)
    out = r.stdout.decode()
    assert r.returncode == 5, out
    assert "  inet filter forward: rule oifname \"br0\" tcp dport 80 counter" in out
    assert out.splitlines()[-1].startswith("dropped: table inet filter chain forward rule"), out
    # the same packet from the host itself never meets the forward hook: delivered
    r = run_trace(pf, "8080", "--from", HOST4)
    assert r.returncode == 0 and "delivered" in r.stdout.decode()


def test_no_dnat_means_the_host_takes_it(tlab: Lab, pf: PortfwdHost) -> None:
    """A port the table does not hold (the forward missing): the probe goes to input."""
    pf.cli("trace", "web1", "8080")  # recorded: the state names the forward
    tlab.ns(tlab.host, "nft", "flush", "map", "inet", "portfwd", "any4_ip")
    r = run_trace(pf, "8080")
    assert r.returncode == 5
    assert r.stdout.decode().splitlines()[-1].startswith("not delivered: the host took it")


def test_an_unknown_forward_is_a_located_error(tlab: Lab, pf: PortfwdHost) -> None:
    r = run_trace(pf, "9999")
    assert r.returncode == 1, r.stderr
    assert r.stderr.decode().strip() == ("guest web1: no applied IPv4 forward of host port 9999/tcp"
                                         " (see portfwd status; portfwd doctor web1)")


def _default_sigint() -> None:
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def test_ctrl_c_leaves_no_trace_table(tlab: Lab, pf: PortfwdHost) -> None:
    # the probe is dropped before any chain of the trace's sees it: the trace waits for
    # its whole --timeout, so Ctrl-C always lands while it waits (a probe that went
    # through at once would let it end by itself, exit 0, before the signal)
    tlab.ns(tlab.host, "nft", "add table inet pfblock; add chain inet pfblock pre { type filter"
            " hook prerouting priority -1000; }; add rule inet pfblock pre tcp dport 8080 drop")
    # a suite started in the background (`tests/run &`, as CI may) runs with SIGINT
    # ignored, which exec passes on: the trace must get the default disposition back
    p = subprocess.Popen(["ip", "netns", "exec", tlab.host, sys.executable, "-m", "portfwd.cli",
                          "trace", "web1", "8080", "--timeout", "60"], env=pf.env,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         preexec_fn=_default_sigint)
    try:
        deadline = time.monotonic() + 20
        while not any("portfwd_trace" in t for t in tables(tlab)):
            assert time.monotonic() < deadline and p.poll() is None, p.communicate()
            time.sleep(0.05)
        time.sleep(0.5)  # the probe sent and dropped: the trace is waiting for lines
        p.send_signal(signal.SIGINT)  # ip netns exec passes it on (same process, exec'd)
        _, err = p.communicate(timeout=30)
    finally:
        if p.poll() is None:
            p.kill()
            p.communicate()
        tlab.ns(tlab.host, "nft", "delete table inet pfblock")
    assert p.returncode == 130, err
    assert not any("portfwd_trace" in t for t in tables(tlab))


def test_parse_and_outcome() -> None:
    lines = [
        'trace id 1a inet t prerouting packet: iif "lo" ip saddr 192.0.2.1 ip daddr 10.0.0.1',
        "trace id 1a inet t prerouting rule meta nftrace set 1 (verdict continue)",
        "trace id 1a inet portfwd prerouting rule dnat ip to 10.1.0.5:80 (verdict accept)",
        "trace id 1a ip filter FORWARD rule jump LIBVIRT_FWI (verdict jump LIBVIRT_FWI)",
        'trace id 1a ip filter LIBVIRT_FWI rule oifname "virbr0" reject (verdict drop)',
        "trace id 2b inet portfwd prerouting rule dnat ip to 10.1.0.5:80 (verdict accept)",
    ]
    steps = trace.parse(lines, "t")
    assert [(s.table, s.chain, s.kind, s.verdict) for s in steps] == [
        ("t", "prerouting", "packet", ""), ("portfwd", "prerouting", "rule", "accept"),
        ("filter", "FORWARD", "rule", "jump LIBVIRT_FWI"),
        ("filter", "LIBVIRT_FWI", "rule", "drop")]
    delivered, ending = trace.outcome(steps, "virbr0")
    assert not delivered
    assert ending == 'dropped: table ip filter chain LIBVIRT_FWI rule oifname "virbr0" reject'


def test_probe_checksums() -> None:
    """The probe's checksums verify (the sum over a correct header is 0)."""
    pkt = trace.packet("tcp", "192.0.2.1", "203.0.113.1", 40000, 8080)
    assert trace._checksum(pkt[:20]) == 0
    pseudo = pkt[12:20] + bytes([0, 6, 0, len(pkt) - 20])
    assert trace._checksum(pseudo + pkt[20:]) == 0
    assert HOST6 and len(trace.packet("udp", "2001:db8::1", HOST6, 1, 2)) == 48


def test_lost_outside_nftables(tlab: Lab, pf: PortfwdHost) -> None:
    """IPv4 forwarding off: DNATed in prerouting, then routing drops it; trace says where."""
    tlab.ns(tlab.host, "sysctl", "-qw", "net.ipv4.ip_forward=0")
    r = run_trace(pf, "8080")
    assert r.returncode == 5
    assert r.stdout.decode().splitlines()[-1].startswith(
        "lost after table inet portfwd chain prerouting: the kernel dropped it outside nftables")


def test_strict_rp_filter_is_told(tlab: Lab, pf: PortfwdHost) -> None:
    tlab.ns(tlab.host, "sysctl", "-qw", "net.ipv4.conf.lo.rp_filter=1")
    r = run_trace(pf, "8080")
    out = r.stdout.decode()
    assert r.returncode == 5 and "rp_filter is strict (1) here" in out, out
    assert out.splitlines()[-1].startswith("lost after table inet portfwd chain prerouting")
