"""A guest live-migrated between two libvirt hosts of a fleet, its forward following it.

    lan ns (bridge "lan", the client 203.0.113.2)
      ├── uplink ── host A (203.0.113.1): libvirtd, network "fleet" (virbr-fleet), portfwd hooks
      └── uplink ── host B (203.0.113.3): the same, the same network XML and forward.toml

Each host is a LibvirtLab (its own network and mount namespaces); their libvirtds talk
TCP over the LAN. The guest is a real QEMU (TCG) guest running a kernel and a busybox
initramfs that answers on port 80 with the id it drew at boot, so an answer with the same
id after ``virsh migrate --live`` shows that the running guest moved, not a new one.
"""

from __future__ import annotations

import json
import os
import sys
import threading
import time
from typing import Iterator, List, Optional, Tuple

import pytest

from guestimage import GUEST_PORT, boot_files
from libvirtlab import CONSOLE_LOG, Lan, LibvirtLab
from netlab import TRAFFIC

pytestmark = pytest.mark.kernel

GUEST, MAC, GUEST4 = "pf-mig", "52:54:00:70:66:10", "192.168.152.10"
HOST_PORT, FOUND_PORT = 8080, 8081
CONFIG = f"""
[[forward]]
guest = "{GUEST}"
ipv4  = "{GUEST4}"
ports = ["{HOST_PORT}:{GUEST_PORT}"]

[[forward]]   # no address: the network's DHCP reservation, the same on every host
guest = "{GUEST}"
ports = ["{FOUND_PORT}:{GUEST_PORT}"]
"""
# defined alike on every host of the fleet (libvirt draws each bridge's MAC: they differ)
NETWORK_XML = f"""<network>
  <name>fleet</name>
  <forward mode='nat'/>
  <bridge name='virbr-fleet' stp='off'/>
  <ip address='192.168.152.1' netmask='255.255.255.0'>
    <dhcp><host mac='{MAC}' ip='{GUEST4}'/></dhcp>
  </ip>
</network>
"""
Sample = Tuple[float, float, bool, bool]  # poll began, poll ended (wall clock), A claims, B claims


class Fleet:
    """Two hosts on one LAN, each with the fleet's network and forward.toml."""

    def __init__(self, base: str, config: str = CONFIG) -> None:
        self.lan = Lan()
        self.hosts: List[LibvirtLab] = []
        try:
            for n, host in ((1, "a"), (3, "b")):
                lab = LibvirtLab(os.path.join(base, host), self.lan, n, record_hooks=True)
                self.hosts.append(lab)
                lab.write_config(config)
                lab.ensure_network("fleet", NETWORK_XML)
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        for lab in reversed(self.hosts):
            lab.close()
        self.lan.close()


@pytest.fixture
def fleet(tmp_path: "os.PathLike[str]") -> Iterator[Fleet]:
    yield from running_fleet(str(tmp_path))


def running_fleet(base: str, config: str = CONFIG, metadata: str = "") -> Iterator[Fleet]:
    """A fleet whose host A runs the guest (``metadata``: in its <metadata>)."""
    kernel, initrd = boot_files()
    fleet = Fleet(base, config)
    try:
        a = fleet.hosts[0]
        a.start(GUEST, "fleet", MAC,
                (kernel, initrd, f"console=ttyS0 quiet pfaddr={GUEST4}/24 pfgw=192.168.152.1"),
                metadata)
        yield fleet
    finally:
        fleet.close()
    # each lab's leak check looks at its own network namespace
    assert [host.pids() for host in fleet.hosts] == [{}, {}], "processes left behind"


def ask(lab: LibvirtLab, addr: str, port: int = HOST_PORT) -> Optional[str]:
    """The guest's answer through ``addr``:``port`` from the client, or None."""
    r = lab.ns(lab.client, sys.executable, TRAFFIC, "probe", "tcp", addr, str(port),
               check=False)
    return r.stdout.decode().strip() if r.returncode == 0 else None


def wait_for_guest(lab: LibvirtLab, timeout: float = 120) -> str:
    """The answer of the booted guest through ``lab``'s forward."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        answer = ask(lab, lab.host4)
        if answer is not None:
            return answer
        time.sleep(0.5)
    try:
        with open(lab.path(CONSOLE_LOG.format(name=GUEST)), errors="replace") as f:
            console = f.read()[-2000:]
    except OSError as e:
        console = str(e)
    raise AssertionError(f"guest not reachable through {lab.host4}:{HOST_PORT}; console: {console}")


def claims(lab: LibvirtLab) -> bool:
    """Whether ``lab``'s portfwd table DNATs to the guest."""
    r = lab.ns(lab.lab, "nft", "-j", "list", "table", "inet", "portfwd", check=False)
    if r.returncode != 0:
        return False
    maps = [o["map"].get("elem", []) for o in json.loads(r.stdout)["nftables"] if "map" in o]
    return GUEST4 in json.dumps(maps)


def poll_claims(a: LibvirtLab, b: LibvirtLab, samples: List[Sample], stop: threading.Event) -> None:
    while not stop.is_set():
        began = time.time()  # the hooks' records use the wall clock too
        on_a, on_b = claims(a), claims(b)
        samples.append((began, time.time(), on_a, on_b))


def test_live_migration_moves_the_forward(fleet: Fleet) -> None:
    a, b = fleet.hosts
    with open(a.config, "rb") as fa, open(b.config, "rb") as fb:
        assert fa.read() == fb.read()  # one forward.toml for the fleet
    before = wait_for_guest(a)
    assert before.startswith("guest ")
    assert ask(a, a.host4, FOUND_PORT) == before
    assert (claims(a), claims(b)) == (True, False)
    assert ask(b, b.host4) is None  # no forward on B while the guest runs on A

    # a migration that fails on B after its `migrate begin` hook leaves nothing there
    b.virsh("net-destroy", "fleet")
    failed = a.migrate(GUEST, b)
    assert failed.returncode != 0 and b"network 'fleet' is not active" in failed.stderr
    assert [c for _, c in b.hook_calls()] == [f"{GUEST} {op}" for op in (
        "migrate begin -", "prepare begin -", "stopped end -", "release end -")]
    assert (claims(a), claims(b)) == (True, False)
    assert ask(a, a.host4) == before
    b.virsh("net-start", "fleet")

    samples: List[Sample] = []
    stop = threading.Event()
    poller = threading.Thread(target=poll_claims, args=(a, b, samples, stop))
    poller.start()
    try:
        time.sleep(0.3)  # samples from before the migration
        began = time.time()
        migrated = a.migrate(GUEST, b)
        ended = time.time()
        time.sleep(0.3)
    finally:
        stop.set()
        poller.join()
    assert migrated.returncode == 0, migrated.stderr.decode()
    print(f"\nmigration took {ended - began:.2f} s; {len(samples)} samples of both tables")

    assert b"running" in b.virsh("domstate", GUEST).stdout
    assert b"running" not in a.virsh("domstate", GUEST, check=False).stdout
    assert (claims(a), claims(b)) == (False, True)
    # the hooks libvirt ran, all within the migration: B the incoming guest's (migrate
    # begin applies the forwards), A the leaving guest's (stopped end removes them)
    calls = {lab.host4: [(t, c) for t, c in lab.hook_calls() if t >= began] for lab in (a, b)}
    assert [c for _, c in calls[b.host4]] == [f"{GUEST} {op}" for op in (
        "migrate begin -", "prepare begin -", "start begin -", "started begin -")], calls
    assert [c for _, c in calls[a.host4]] == [f"{GUEST} stopped end -",
                                              f"{GUEST} release end -"], calls
    assert all(t <= ended for t, _ in calls[a.host4] + calls[b.host4]), (ended, calls)
    # the forward was never gone from both, and both held it only while the migration ran
    assert all(on_a or on_b for _, _, on_a, on_b in samples), samples
    both = [(t0, t1) for t0, t1, on_a, on_b in samples if on_a and on_b]
    assert all(t1 >= began and t0 <= ended for t0, t1 in both), (began, ended, both)
    assert [s[2:] for s in samples if s[1] < began] and \
        all(s[2:] == (True, False) for s in samples if s[1] < began)
    assert [s[2:] for s in samples if s[0] > ended] and \
        all(s[2:] == (False, True) for s in samples if s[0] > ended)
    if both:
        print(f"both tables held the forward for at most {both[-1][1] - both[0][0]:.2f} s")

    # a client that reconnects, now to B, reaches the same running guest; A no longer forwards
    assert wait_for_guest(b, timeout=30) == before
    assert ask(b, b.host4, FOUND_PORT) == before
    assert ask(a, a.host4) is None
    assert ask(a, a.host4, FOUND_PORT) is None

