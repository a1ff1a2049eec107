"""``portfwd doctor`` gathering its facts from a real libvirtd: the running domain, its
tap from the live domain XML, libvirt's reject; and a libvirtd that does not answer
(stopped with SIGSTOP) costs doctor its bounded wait, then it reads libvirt's
status files instead."""

from __future__ import annotations

import json
import os
import signal
import time
from typing import Any, Dict, Iterator, List, Tuple

import pytest

from libvirtlab import LIBVIRTD_PID, LibvirtLab, _pid
from test_libvirt import Servers, portfwd

pytestmark = pytest.mark.kernel

WEB1_IP = "192.168.122.10"
WEB1 = ("pf-doc1", "default", "52:54:00:70:66:11")
CONFIG = f'\n[[forward]]\nguest = "pf-doc1"\nipv4  = "{WEB1_IP}"\nports = ["8080:80"]\n'


@pytest.fixture(scope="module")
def dvlab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LibvirtLab]:
    lab = LibvirtLab(str(tmp_path_factory.mktemp("libvirt-doctor")))
    servers = Servers()  # doctor's last layer connects to the guest's port 80
    try:
        lab.write_config(CONFIG)
        lab.ensure_network("default")
        servers.start(lab.standin("virbr0", WEB1_IP, "192.168.122.1", mac=WEB1[2]))
        lab.start(*WEB1)
        yield lab
    finally:
        servers.stop()
        lab.close()
    assert lab.pids() == {}, "processes left behind"


def doctor(lab: LibvirtLab) -> Tuple[int, List[Dict[str, Any]]]:
    r = portfwd(lab, "doctor", "pf-doc1", "--json")
    assert r.returncode in (0, 5), r.stderr
    checks: List[Dict[str, Any]] = json.loads(r.stdout)
    return r.returncode, checks


def tap(lab: LibvirtLab) -> str:
    out = lab.virsh("domiflist", "pf-doc1").stdout.decode().split()
    return out[0]


def test_doctor_with_a_real_libvirtd(dvlab: LibvirtLab) -> None:
    vnet = tap(dvlab)
    dvlab.ns(dvlab.lab, "bridge", "link", "set", "dev", vnet, "hairpin", "off")
    rc, checks = doctor(dvlab)
    by_layer = {c["layer"]: c for c in checks}
    assert by_layer["guest"]["detail"] == "running (libvirt qemu:///system)", checks
    assert by_layer["tap"]["detail"] == f"{vnet} is a port of virbr0, up", checks
    assert by_layer["filter"]["ok"], checks  # portfwd's accept heads LIBVIRT_FWI
    # br_netfilter is on in these namespaces: the tap's hairpin mode counts
    assert rc == 5 and checks[-1]["layer"] == "hairpin" and vnet in checks[-1]["fix"], checks
    dvlab.ns(dvlab.lab, "bridge", "link", "set", "dev", vnet, "hairpin", "on")
    rc, checks = doctor(dvlab)
    assert rc == 0 and all(c["ok"] for c in checks), checks
    # libvirt's reject above portfwd's accept (a firewall reload without the hook)
    dvlab.ns(dvlab.lab, "iptables", "-w", "-D", "LIBVIRT_FWI", "-o", "virbr0", "-j", "PORTFWD_FWI")
    try:
        rc, checks = doctor(dvlab)
        assert rc == 5 and checks[-1]["layer"] == "filter", checks
        assert "table ip filter chain LIBVIRT_FWI" in checks[-1]["detail"], checks
    finally:
        assert portfwd(dvlab, "reapply").returncode == 0


def test_a_hung_libvirtd_does_not_hang_doctor(dvlab: LibvirtLab) -> None:
    pid = _pid(dvlab.path(LIBVIRTD_PID))
    assert pid is not None
    os.kill(pid, signal.SIGSTOP)
    try:
        started = time.monotonic()
        rc, checks = doctor(dvlab)
        took = time.monotonic() - started
    finally:
        os.kill(pid, signal.SIGCONT)
    guest = next(c for c in checks if c["layer"] == "guest")
    assert guest["ok"], checks
    assert "did not answer within 10 s; from status files in /run/libvirt/qemu" in guest["detail"]
    print(f"doctor with a stopped libvirtd: {took:.1f} s")
