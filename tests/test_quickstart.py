"""The README's quick start, as written there, against a real libvirtd: its commands run
on a guest `web1` of libvirt's `default` network whose address comes from a DHCP lease,
their output is what the README shows, and the forward answers."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from typing import Iterator, List, Optional

import pytest

from netlab import CLIENT4
from test_libvirt_discovery import Lab, default_network_lab, until

pytestmark = pytest.mark.kernel

README = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "README.md")
CONFIG = "/etc/portfwd/forward.toml"
MAC = "52:54:00:70:66:21"


def quick_start() -> List[str]:
    """The lines of the quick start's shell block."""
    with open(README, encoding="utf-8") as f:
        text = f.read()
    section = text.split("\n## Quick start\n", 1)[1].split("\n## ", 1)[0]
    block = re.search(r"```sh\n(.*?)```", section, re.S)
    assert block, "the quick start has no sh block"
    return block.group(1).splitlines()


@pytest.fixture
def qlab(tmp_path: "os.PathLike[str]") -> Iterator[Lab]:
    # as the package leaves forward.toml: its forwards commented out
    with default_network_lab(str(tmp_path), "# [[forward]]\n") as lab:
        yield lab


def portfwd(qlab: Lab, *args: str) -> "subprocess.CompletedProcess[str]":
    return subprocess.run(qlab.lab.argv(qlab.lab.lab, sys.executable, "-m", "portfwd.cli", *args),
                          capture_output=True, text=True, env=qlab.env())


def test_the_quick_start_works_as_written(qlab: Lab) -> None:
    lab = qlab.lab
    lines = quick_start()
    edit, check, sync, status = lines[:4]
    assert edit.startswith("printf ") and edit.endswith(f">> {CONFIG}")
    assert [check.split()[:2], sync.split()[:2], status.split()] == [
        ["portfwd", "check"], ["portfwd", "sync"], ["portfwd", "status"]]
    header, row = lines[4:6]
    # the guest: a stand-in on its tap that takes its address from libvirt's dnsmasq
    standin = lab.standin("virbr0", None, None, mac=MAC, plug=False)
    qlab.serve(standin)
    lab.start("web1", "default", MAC)
    lab.as_tap(standin, "web1")
    qlab.dhcp(standin)
    leased = lab.ns(standin, "ip", "-4", "-o", "addr", "show", "dev", "eth0").stdout.decode()
    address = leased.split("inet ")[1].split("/")[0]

    subprocess.run(["sh", "-c", edit.replace(CONFIG, lab.config)], check=True)
    r = portfwd(qlab, "check")
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == check.split("# ", 1)[1].replace(CONFIG, lab.config)
    r = portfwd(qlab, "sync")
    assert r.returncode == 0, r.stderr

    def active() -> Optional[List[str]]:
        """status's lines once the forward is active; a lease counts once the kernel
        shows it is the guest's, which another sync then sees."""
        out = portfwd(qlab, "status").stdout.splitlines()
        if len(out) > 1 and "active" in out[1].split():
            return out
        portfwd(qlab, "sync")
        return None

    out = until(active, timeout=30)
    assert isinstance(out, list), "the forward never became active"
    assert out[0].split() == header.split()
    assert out[1].split() == row.replace("192.168.122.10", address).split()
    assert until(lambda: qlab.probe(8080)) == f"tcp 80 {CLIENT4}"
