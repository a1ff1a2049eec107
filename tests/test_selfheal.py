"""Self-healing without lying: reapply brings back only running guests, a removal
killed halfway leaves nothing a later reapply turns into a stale DNAT, and a
configuration missing for a moment removes nothing."""

from __future__ import annotations

import os
from typing import Any, List

import pytest

from pfhost import PortfwdHost, web1_config
from portfwd import constants
from portfwd.engine import guestpass
from portfwd.engine import Engine

pytestmark = pytest.mark.kernel

WEB2 = '\n[[forward]]\nguest = "web2"\nipv4 = "192.168.150.11"\nports = ["9090:90"]\n'


def targets(pf: PortfwdHost) -> List[str]:
    return sorted(e[1] for e in pf.elements().get("any4_ip", []))


def test_reapply_does_not_resurrect_a_guest_that_stopped(pf: PortfwdHost,
                                                         tmp_path: "os.PathLike[str]") -> None:
    status_dir = os.path.join(str(tmp_path), "libvirt-qemu")
    os.mkdir(status_dir)
    pf.env["PORTFWD_QEMU_STATUS_DIR"] = status_dir
    pf.write_config(web1_config("8080:80") + WEB2)
    for guest in ("web1", "web2"):
        open(os.path.join(status_dir, f"{guest}.xml"), "w").close()  # as libvirt keeps it
        assert pf.hook(guest, "started").returncode == 0
    assert targets(pf) == ["192.168.150.10", "192.168.150.11"]
    os.unlink(os.path.join(status_dir, "web2.xml"))  # web2 stopped; its hook never finished
    pf.lab.ns(pf.lab.host, "nft", "flush", "ruleset")
    r = pf.cli("reapply")
    assert r.returncode == 0, r.stderr
    assert "guest web2 is not running: forgetting its forwards" in r.stderr.decode()
    assert targets(pf) == ["192.168.150.10"]
    assert sorted(os.listdir(os.path.join(pf.run_dir, "guests"))) == ["web1.json"]


class Killed(BaseException):
    """Stands for SIGKILL arriving while nftables is being asked to remove elements."""


class DiesOnApply:
    def set_comment(self, table: str, name: str) -> str:
        return constants.TABLE_COMMENT

    def table_comment(self, table: str) -> str:
        return constants.TABLE_COMMENT

    def list(self, what: Any) -> List[Any]:
        return []  # no libvirt chains to look at

    def apply(self, commands: Any, dry_run: bool = False) -> None:
        raise Killed()


def test_stopped_killed_midway_leaves_nothing_to_resurrect(pf: PortfwdHost) -> None:
    pf.write_config(web1_config("8080:80") + WEB2)
    assert pf.hook("web1", "started").returncode == 0
    assert pf.hook("web2", "started").returncode == 0
    engine = Engine(pf.config, pf.run_dir, nft=DiesOnApply())  # type: ignore[arg-type]
    with pytest.raises(Killed):
        guestpass.remove_guest(engine, "web1")  # the `stopped` hook, killed at the kernel step
    assert "192.168.150.10" in targets(pf)  # the kernel still has it ...
    r = pf.cli("reapply")  # ... and the next rebuild drops it rather than restoring it
    assert r.returncode == 0, r.stderr
    assert targets(pf) == ["192.168.150.11"]


def test_missing_configuration_removes_nothing(pf: PortfwdHost) -> None:
    """An editor saving by delete-and-recreate leaves a moment without the file."""
    pf.write_config(web1_config("8080:80"))
    assert pf.hook("web1", "started").returncode == 0
    before = pf.table()
    os.unlink(pf.config)
    r = pf.hook("web1", "reconnect")
    assert (r.returncode, r.stdout) == (0, b"")
    assert "no such file" in r.stderr.decode()
    assert pf.table() == before


def test_listen_interface_and_address_claiming_one_port_keep_the_first(pf: PortfwdHost) -> None:
    """web1 listens on interface uplink, web2 on uplink's address: the file alone shows
    no overlap. The guest that holds the port keeps it; the other one waits, and says why."""
    from netlab import HOST4

    pf.write_config(web1_config("8080:80").replace('ports', 'listen = ["uplink"]\nports')
                    + WEB2.replace('"9090:90"', '"8080:90"').replace(
                        'ports', f'listen = ["{HOST4}"]\nports'))
    assert pf.hook("web2", "started").returncode == 0
    r = pf.hook("web1", "started")
    assert (r.returncode, r.stdout) == (0, b""), r.stderr
    assert f"host port {HOST4}:8080/tcp is held by guest web2" in r.stderr.decode()
    fwd4 = {tuple(k["elem"]["val"]["concat"] if "elem" in k else k["concat"]): v
            for k, v in pf.elements().get("fwd4_ip", [])}
    assert fwd4 == {(HOST4, "tcp", 8080): "192.168.150.11"}
    assert "fwd6_ip" in pf.elements()  # web1's IPv6 forward on uplink does not collide
    rows = pf.cli("status", "--json")
    assert b"is held by guest web2" in rows.stdout
    assert pf.hook("web2", "stopped", "end").returncode == 0
    assert pf.hook("web1", "reconnect").returncode == 0  # the port is free now: web1 takes it
    fwd4 = {tuple(k["elem"]["val"]["concat"] if "elem" in k else k["concat"]): v
            for k, v in pf.elements().get("fwd4_ip", [])}
    assert fwd4 == {(HOST4, "tcp", 8080): "192.168.150.10"}


def test_hook_never_hangs_on_a_fifo_configuration(pf: PortfwdHost) -> None:
    """A FIFO where forward.toml should be is refused unopened, by the hook too."""
    import subprocess
    import sys

    from pfhost import HOOK, domain_xml

    os.mkfifo(pf.config, 0o644)
    r = subprocess.run(["ip", "netns", "exec", pf.lab.host, sys.executable, "-I", HOOK, "web1",
                        "started", "begin", "-"], input=domain_xml("web1"), capture_output=True,
                       env=pf.env, timeout=60)
    assert (r.returncode, r.stdout) == (0, b""), r.stderr
    assert "not a regular file" in r.stderr.decode() or "FIFO" in r.stderr.decode(), r.stderr
    assert pf.table() is None
