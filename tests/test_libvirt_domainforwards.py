"""Forwards declared in a domain's <metadata>, with a real libvirtd, its hooks and QEMU:
applied by the hook at start (from the XML on stdin), gone at stop, a forward outside
[options] domain_ports refused and shown in status, `virsh metadata` on a running
guest taken up by `portfwd sync`."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from typing import Iterator, List

import pytest

from libvirtlab import LibvirtLab
from netlab import CLIENT4, HOST4
from test_libvirt import Servers, elements, portfwd, probe

pytestmark = pytest.mark.kernel

IP = "192.168.122.10"
NAME, MAC = "pf-meta", "52:54:00:70:66:21"
CONFIG = '[options]\ndomain_forwards = true\ndomain_ports = ["10000-19999"]\n'
METADATA = f"""
    <pf:forwards xmlns:pf="urn:portfwd:forwards:1">
      <pf:forward ports="18080:80" ipv4="{IP}"/>
      <pf:forward ports="8080:80 5353:53/udp" ipv4="{IP}"/>
    </pf:forwards>
  """


@pytest.fixture(scope="module")
def mlab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LibvirtLab]:
    lab = LibvirtLab(str(tmp_path_factory.mktemp("libvirt")))
    servers = Servers()
    try:
        lab.write_config(CONFIG)
        lab.ensure_network("default")
        standin = lab.standin("virbr0", IP, "192.168.122.1")
        servers.start(standin)
        lab.start(NAME, "default", MAC, metadata=METADATA)
        lab.virsh("destroy", NAME)  # defined; each test starts it
        yield lab
    finally:
        servers.stop()
        lab.close()
    assert lab.pids() == {}, "processes left behind"


def rows(lab: LibvirtLab) -> List[List[str]]:
    r = portfwd(lab, "status", "--json")
    return sorted([row["guest"], row["listen"], row["state"], row["reason"]]
                  for row in json.loads(r.stdout)["forwards"])


def test_a_forward_only_in_the_metadata_follows_the_guest(mlab: LibvirtLab) -> None:
    assert probe(mlab, "tcp", HOST4, 18080, tries=1) is None
    mlab.virsh("start", NAME)
    try:
        assert probe(mlab, "tcp", HOST4, 18080) == f"tcp 80 {CLIENT4}"
        assert probe(mlab, "tcp", HOST4, 8080, tries=1) is None  # outside domain_ports
        assert rows(mlab) == [
            [NAME, "*:18080", "active", ""],
            [NAME, "-", "refused", "forward[1].ports[0]: refused: host port(s) 8080-8080/tcp"
                                   " lie outside [options] domain_ports (10000-19999) of"
                                   f" {mlab.config}"],
            [NAME, "-", "refused", "forward[1].ports[1]: refused: host port(s) 5353-5353/udp"
                                   " lie outside [options] domain_ports (10000-19999) of"
                                   f" {mlab.config}"]]
        # sync reads the metadata from libvirt's XML of the running domain: nothing changes
        r = portfwd(mlab, "sync")
        assert r.returncode == 0, r.stderr
        assert probe(mlab, "tcp", HOST4, 18080) == f"tcp 80 {CLIENT4}"
        # the README's recipe: set the metadata of the running guest, then sync
        mlab.virsh("metadata", NAME, "--uri", "urn:portfwd:forwards:1", "--key", "pf", "--set",
                   f'<forwards><forward ports="18081:80" ipv4="{IP}"/></forwards>', "--live",
                   "--config")
        r = portfwd(mlab, "sync")
        assert r.returncode == 0, r.stderr
        assert probe(mlab, "tcp", HOST4, 18081) == f"tcp 80 {CLIENT4}"
        assert probe(mlab, "tcp", HOST4, 18080, tries=1) is None
        mlab.virsh("metadata", NAME, "--uri", "urn:portfwd:forwards:1", "--live", "--config",
                   "--remove")
        assert portfwd(mlab, "sync").returncode == 0
        assert probe(mlab, "tcp", HOST4, 18081, tries=1) is None
        assert elements(mlab) == 0
        mlab.virsh("metadata", NAME, "--uri", "urn:portfwd:forwards:1", "--key", "pf", "--set",
                   f'<forwards><forward ports="18081:80" ipv4="{IP}"/></forwards>', "--live")
        assert portfwd(mlab, "sync").returncode == 0
    finally:
        mlab.virsh("destroy", NAME)
    assert probe(mlab, "tcp", HOST4, 18081, tries=1) is None
    assert elements(mlab) == 0
    assert [row for row in rows(mlab) if row[0] == NAME] == []


def test_add_and_remove_domain_write_the_metadata_through_libvirt(mlab: LibvirtLab) -> None:
    portfwd(mlab, "remove", "--domain", NAME, "--no-apply")  # whatever an earlier test left
    r = portfwd(mlab, "add", "--domain", NAME, "19080:80", "--ipv4", IP)
    assert r.returncode == 0, r.stderr
    assert r.stdout.decode().splitlines()[0] == f"{NAME} <metadata>: forward[0]: added: ports 19080:80"
    assert r.stdout.decode().splitlines()[-1] == \
        f"guest {NAME} is not running: its forwards apply when it starts"
    mlab.virsh("start", NAME)
    try:
        assert probe(mlab, "tcp", HOST4, 19080) == f"tcp 80 {CLIENT4}"
        r = portfwd(mlab, "add", "--domain", NAME, "19082:80", "--ipv4", IP)  # live and config
        assert r.returncode == 0, r.stderr
        assert probe(mlab, "tcp", HOST4, 19082) == f"tcp 80 {CLIENT4}"
        r = portfwd(mlab, "add", "--domain", NAME, "8081:80", "--ipv4", IP)
        assert (r.returncode, r.stderr.decode().splitlines()) == (1, [
            f"{NAME} <metadata>: forward[2].ports[0]: refused: host port(s) 8081-8081/tcp lie"
            f" outside [options] domain_ports (10000-19999) of {mlab.config}",
            f"{NAME} <metadata>: not changed"])
        r = portfwd(mlab, "remove", "--domain", NAME, "19082")
        assert r.returncode == 0, r.stderr
        assert r.stdout.decode().splitlines()[0] == f"{NAME} <metadata>: forward[1]: removed"
        assert probe(mlab, "tcp", HOST4, 19082, tries=1) is None
        assert probe(mlab, "tcp", HOST4, 19080) == f"tcp 80 {CLIENT4}"
    finally:
        mlab.virsh("destroy", NAME)
    persistent = mlab.virsh("dumpxml", "--inactive", NAME).stdout.decode()
    assert 'ports="19080:80"' in persistent and "19082" not in persistent
    assert elements(mlab) == 0


def test_the_daemon_follows_a_change_of_the_metadata(mlab: LibvirtLab) -> None:
    env = dict(os.environ, PORTFWD_CONFIG=mlab.config, PORTFWD_RUNDIR=mlab.run_dir)
    path = os.path.join(mlab.base, "daemon.log")
    mlab.virsh("start", NAME)
    try:
        with open(path, "wb") as log:
            daemon = subprocess.Popen(mlab.argv(mlab.lab, sys.executable, "-m", "portfwd.cli",
                                                "daemon"), stdout=log, stderr=log, env=env)
        try:
            deadline = time.monotonic() + 30
            while "synced:" not in read(path):  # its first reconcile, at connecting, is done
                assert daemon.poll() is None and time.monotonic() < deadline, read(path)
                time.sleep(0.1)
            # nothing but libvirt's metadata event tells the daemon now
            mlab.virsh("metadata", NAME, "--uri", "urn:portfwd:forwards:1", "--key", "pf",
                       "--set", f'<forwards><forward ports="19090:80" ipv4="{IP}"/></forwards>',
                       "--live")
            while probe(mlab, "tcp", HOST4, 19090, tries=1) is None:
                assert time.monotonic() < deadline + 30, "the daemon did not apply the metadata"
                time.sleep(0.2)
            mlab.virsh("metadata", NAME, "--uri", "urn:portfwd:forwards:1", "--live", "--remove")
            while probe(mlab, "tcp", HOST4, 19090, tries=1) is not None:
                assert time.monotonic() < deadline + 60, "the daemon kept a removed forward"
                time.sleep(0.2)
        finally:
            daemon.terminate()
            daemon.wait(timeout=30)
    finally:
        mlab.virsh("destroy", NAME)


def read(path: str) -> str:
    with open(path, encoding="utf-8", errors="replace") as f:
        return f.read()
