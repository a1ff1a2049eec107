"""portfwd sync|status|flush|install against real nftables, libvirt's test driver for sync."""

from __future__ import annotations

import glob
import json
import os
import shutil
import stat
import subprocess
import sys
from typing import Callable, Dict, List, Tuple

import pytest

from netlab import GUEST4, GUEST6
from portfwd.config import load
from pfhost import PortfwdHost

pytestmark = pytest.mark.kernel

# libvirt's built-in test driver (no daemon) always has one running domain, "test"
TEST_URI = "test:///default"
TEST_UUID = "6695eb01-f6a4-8304-79aa-97f2502e193f"
CONFIG = f"""
[[forward]]
guest = "test"
ipv4  = "{GUEST4}"
ipv6  = "{GUEST6}"
ports = ["8080:80"]

[[forward]]
uuid  = "{TEST_UUID}"
ipv4  = "{GUEST4}"
ports = ["2222:22"]

[[forward]]
guest = "stopped-guest"
ipv4  = "192.168.150.99"
ports = ["9999"]
"""


def status(pf: PortfwdHost, code: int = 0) -> List[Tuple[str, str, str, str, str]]:
    r = pf.cli("status", "--json", "--connect", TEST_URI)
    assert r.returncode == code, r.stderr
    return sorted((row["guest"], row["proto"], row["listen"], row["target"], row["state"])
                  for row in json.loads(r.stdout)["forwards"])


def test_sync_dry_run_changes_nothing(pf: PortfwdHost) -> None:
    pf.write_config(CONFIG)
    r = pf.cli("sync", "--connect", TEST_URI, "--dry-run")
    assert r.returncode == 0, r.stderr
    lines = r.stdout.decode().splitlines()
    assert lines[0].startswith("# table inet portfwd, 1 running guest: dry run, nothing applied")
    assert any(line.startswith("+ test\ttcp\t*:8080 -> 192.168.150.10:80") for line in lines)
    assert any(line.startswith("+ test\ttcp\t*:2222 -> 192.168.150.10:22") for line in lines)
    assert not any("9999" in line for line in lines)
    assert lines[-1] == "added 3, removed 0, unchanged 0"
    assert pf.table() is None


def test_sync_dry_run_diff_folds_ranges(pf: PortfwdHost) -> None:
    """Added, removed and unchanged forwards against what is applied; a range stored
    port by port (guest ports shifted) is one line, with --json the same as lists."""
    pf.write_config(CONFIG)
    assert pf.cli("sync", "--connect", TEST_URI).returncode == 0
    shifted = CONFIG.replace('ports = ["8080:80"]', 'ports = ["8080:80", "7000-7009:8000-8009/udp"]')
    pf.write_config(shifted.replace('ports = ["2222:22"]', 'ports = ["2223:22"]'))
    r = pf.cli("sync", "--connect", TEST_URI, "--dry-run")
    assert r.returncode == 0, r.stderr
    lines = r.stdout.decode().splitlines()
    assert [line.split("\t")[:3] for line in lines[1:-1]] == [
        ["+ test", "tcp", "*:2223 -> 192.168.150.10:22"],
        ["+ test", "udp", "*:7000-7009 -> 192.168.150.10:8000-8009"],
        ["+ test", "udp", "[*]:7000-7009 -> [fd00:150::10]:8000-8009"],
        ["- test", "tcp", "*:2222 -> 192.168.150.10:22"],
        ["= test", "tcp", "*:8080 -> 192.168.150.10:80"],
        ["= test", "tcp", "[*]:8080 -> [fd00:150::10]:80"],
    ]
    assert lines[-1] == "added 3, removed 1, unchanged 2"
    r = pf.cli("sync", "--connect", TEST_URI, "--dry-run", "--json")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["counts"] == {"added": 3, "removed": 1, "unchanged": 2, "pending": 0}
    assert [(i["listen"], i["target"], i["bindings"]) for i in out["added"]] == [
        ("*:2223", "192.168.150.10:22", 1), ("*:7000-7009", "192.168.150.10:8000-8009", 10),
        ("[*]:7000-7009", "[fd00:150::10]:8000-8009", 10)]
    assert out["removed"][0]["sources"] == [] and out["applied"] is False
    assert len(pf.elements()["any4_ip"]) == 2  # nothing applied


def test_sync_status_flush(pf: PortfwdHost) -> None:
    pf.write_config(CONFIG)
    # a stale forward of a guest that is no longer running, left by its hook
    stale = '[[forward]]\nguest = "gone"\nipv4 = "192.168.150.50"\nports = ["7777"]\n'
    pf.write_config(CONFIG + stale)
    assert pf.hook("gone", "started").returncode == 0
    pf.write_config(CONFIG)

    r = pf.cli("sync", "--connect", TEST_URI)
    assert r.returncode == 0, r.stderr
    assert r.stdout.decode().strip() == "synced: 3 forwards for 1 guest in table inet portfwd"
    assert status(pf) == [
        ("stopped-guest", "tcp", "*:9999", "192.168.150.99:9999", "guest not running"),
        ("test", "tcp", "*:2222", "192.168.150.10:22", "active"),
        ("test", "tcp", "*:8080", "192.168.150.10:80", "active"),
        ("test", "tcp", "[*]:8080", "[fd00:150::10]:80", "active"),
    ]
    again = pf.table()
    assert pf.cli("sync", "--connect", TEST_URI).returncode == 0
    assert pf.table() == again  # reruns are harmless

    # a rule set wiped behind portfwd's back shows up as missing
    pf.lab.ns(pf.lab.host, "nft", "flush", "ruleset")
    assert {row[-1] for row in status(pf, 5) if row[0] == "test"} == {"missing"}

    text = pf.cli("status", "--connect", TEST_URI)
    assert text.returncode == 5  # a forward is missing: monitoring sees it
    assert text.stdout.decode().splitlines()[0].split() == ["GUEST", "PROTO", "LISTEN", "TARGET",
                                                            "FROM", "CONNS", "STATE"]
    assert "missing: not in the table: run `portfwd reapply`" in text.stdout.decode()
    assert pf.cli("sync", "--connect", TEST_URI).returncode == 0
    r = pf.cli("flush")
    assert (r.returncode, r.stdout.decode().strip()) == (0, "removed: table inet portfwd")
    assert pf.table() is None
    assert pf.cli("flush").stdout.decode().strip() == "removed: nothing (no portfwd table)"
    # libvirt says "test" runs: its forwards are not applied (exit 5), not "not running"
    assert [row[-1] for row in status(pf, 5)] == ["guest not running"] + ["not applied"] * 3


def test_sync_with_invalid_config_changes_nothing(pf: PortfwdHost) -> None:
    pf.write_config(CONFIG)
    assert pf.cli("sync", "--connect", TEST_URI).returncode == 0
    before = pf.table()
    pf.write_config(CONFIG + "[[forward]]\nguest = 1\n")
    r = pf.cli("sync", "--connect", TEST_URI)
    assert r.returncode == 1
    assert f"{pf.config}:18:9: forward[3].guest: expected a domain name string, got an integer (1)" \
        in r.stderr.decode()
    assert pf.table() == before
    flush = pf.cli("flush")  # flush works whatever the file says
    assert flush.returncode == 0 and pf.table() is None


def test_sync_unreachable_libvirt_is_a_host_error(pf: PortfwdHost) -> None:
    pf.write_config(CONFIG)
    r = pf.cli("sync", "--connect", "qemu+unix:///system?socket=/nonexistent/sock")
    assert r.returncode == 3
    err = r.stderr.decode()
    assert "cannot connect to libvirt" in err and "Traceback" not in err


@pytest.mark.parametrize("command", ["check", "sync", "status", "flush", "reapply", "daemon",
                                     "install", "uninstall", "import"])
def test_every_command_has_help(pf: PortfwdHost, command: str) -> None:
    r = pf.cli(command, "--help")
    assert r.returncode == 0 and b"usage: portfwd " + command.encode() in r.stdout


def test_install_puts_a_working_hook_in_qemu_d(pf: PortfwdHost, tmp_path: "os.PathLike[str]") -> None:
    root = os.path.join(str(tmp_path), "root")
    r = subprocess.run([sys.executable, "-m", "portfwd.cli", "install", "--root", root],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    hook = os.path.join(root, "etc/libvirt/hooks/qemu.d/portfwd")
    for kind in ("qemu", "network"):
        path = os.path.join(root, f"etc/libvirt/hooks/{kind}.d/portfwd")
        with open(path) as f:
            assert f.readline() == "#!/bin/sh\n"
            rest = f.read()
            assert f"\npy={sys.executable}\n" in rest and f'exit_now("{kind}", sys.argv[1:], xml)' in rest
        assert os.stat(path).st_mode & 0o777 == 0o755
    config = os.path.join(root, "etc/portfwd/forward.toml")
    assert stat.S_IMODE(os.stat(config).st_mode) == 0o644
    installed = load(config)  # valid, and forwards nothing until the admin says so
    assert installed.forwards == () and installed.options.table == "portfwd"
    for unit, command in (("portfwd-sync", "sync"), ("portfwd-reapply", "reapply"),
                          ("portfwd", "daemon")):
        with open(os.path.join(root, f"etc/systemd/system/{unit}.service")) as f:
            text = f.read()
        assert f"ExecStart={os.path.join(root, 'usr/local/sbin/portfwd')} {command}\n" in text
        if command == "reapply":  # a restart of nftables (flush ruleset) re-applies
            assert "PartOf=nftables.service\n" in text
    # an existing configuration is kept
    with open(config, "w") as f:
        f.write(f'[[forward]]\nguest = "web1"\nipv4 = "{GUEST4}"\nports = [80]\n')
    r = subprocess.run([sys.executable, "-m", "portfwd.cli", "install", "--root", root],
                       capture_output=True, text=True)
    assert "kept existing" in r.stdout
    # the installed hook runs as libvirt would run it
    env = dict(pf.env, PORTFWD_CONFIG=config)
    run = pf.lab.ns(pf.lab.host, hook, "web1", "started", "begin", "-", input=b"<domain/>", env=env,
                    check=False)
    assert (run.returncode, run.stdout) == (0, b""), run.stderr
    assert len(pf.elements()["any4_ip"]) == 1


def test_uninstall_removes_what_install_put_and_every_rule(pf: PortfwdHost,
                                                           tmp_path: "os.PathLike[str]") -> None:
    root = os.path.join(str(tmp_path), "root")
    r = pf.cli("install", "--root", root)
    assert r.returncode == 0, r.stderr
    installed = [os.path.join(root, p) for p in (
        "etc/libvirt/hooks/qemu.d/portfwd", "etc/libvirt/hooks/network.d/portfwd",
        "etc/systemd/system/portfwd.service", "etc/systemd/system/portfwd-sync.service",
        "etc/systemd/system/portfwd-reapply.service", "usr/local/sbin/portfwd")]
    assert all(os.path.lexists(p) for p in installed)
    other_hook = os.path.join(root, "etc/libvirt/hooks/qemu.d/other")
    with open(other_hook, "w") as f:
        f.write("#!/bin/sh\n")
    config = os.path.join(root, "etc/portfwd/forward.toml")
    pf.write_config(CONFIG)
    assert pf.cli("sync", "--connect", TEST_URI).returncode == 0
    assert pf.table() is not None

    r = pf.cli("uninstall", "--root", root)
    assert r.returncode == 0, r.stderr
    out = r.stdout.decode().splitlines()
    assert "removed: table inet portfwd and portfwd's accepts in libvirt's chains" in out
    assert f"kept: {config} (remove it too with --purge)" in out
    assert not any(os.path.lexists(p) for p in installed)
    assert os.path.exists(other_hook) and os.path.exists(config)  # others' hooks, the config
    assert pf.table() is None and not os.path.exists(pf.run_dir)

    r = pf.cli("uninstall", "--root", root, "--purge")
    assert r.returncode == 0, r.stderr
    assert f"removed: {config}" in r.stdout.decode().splitlines()
    assert not os.path.exists(os.path.dirname(config))


# -- install refuses an interpreter or package others could change ----------------------

def venv_with_portfwd(base: str, copies: bool = False) -> Tuple[str, str]:
    """A venv (its python3) and a copy of portfwd's package for it, all root's."""
    venv = os.path.join(base, "venv")
    subprocess.run(["/usr/bin/python3", "-m", "venv", "--without-pip", venv]
                   + (["--copies"] if copies else []), check=True)
    package = os.path.join(base, "lib", "portfwd")
    src = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "src",
                       "portfwd")
    shutil.copytree(src, package, ignore=shutil.ignore_patterns("__pycache__"))
    return os.path.join(venv, "bin", "python3"), package


def install_as(python: str, package: str, root: str) -> "subprocess.CompletedProcess[str]":
    return subprocess.run([python, "-m", "portfwd.cli", "install", "--root", root],
                          env={"PYTHONPATH": os.path.dirname(package), "LC_ALL": "C",
                               "PATH": "/usr/sbin:/usr/bin:/sbin:/bin"},
                          cwd=os.path.dirname(root), capture_output=True, text=True)


WHO_CAN_WRITE: Dict[str, Tuple[str, Callable[[str], None], bool, str]] = {
    "the venv's bin": ("venv/bin", lambda p: os.chmod(p, 0o775), False,
                       "{p}: refused: this directory is writable by group gid 0 (mode 0775),"
                       " who could replace {p}/python3, the Python the hooks would run,"),
    "the interpreter": ("venv/bin/python3", lambda p: os.chown(p, 1000, -1), True,
                        "{p}: refused: this file (the Python the hooks would run) is writable"
                        " by its owner, uid 1000"),
    "pyvenv.cfg": ("venv/pyvenv.cfg", lambda p: os.chmod(p, 0o646), False,
                   "{p}: refused: this file (the venv's pyvenv.cfg, which tells that Python"
                   " where its library is) is writable by everyone"),
    "site-packages": ("venv/lib/python3.11/site-packages", lambda p: os.chmod(p, 0o757), False,
                      "{p}: refused: this directory (a site-packages directory of that Python)"
                      " is writable by everyone"),
    "the package": ("lib/portfwd", lambda p: os.chmod(p, 0o757), False,
                    "{p}: refused: this directory (portfwd's package) is writable by everyone"),
    "a module": ("lib/portfwd/hook.py", lambda p: os.chown(p, 1000, 1000), False,
                 "{p}: refused: this file (part of portfwd's package) is writable by its"
                 " owner, uid 1000"),
    "a directory above": ("lib", lambda p: os.chmod(p, 0o757), False,
                          "{p}: refused: this directory is writable by everyone (mode 0757), who"
                          " could replace {p}/portfwd, portfwd's package,"),
}


@pytest.mark.parametrize("case", sorted(WHO_CAN_WRITE))
def test_install_refuses_what_others_could_change(tmp_path: "os.PathLike[str]",
                                                  case: str) -> None:
    """The hooks run the interpreter and the package as root in every guest start: one
    file or directory on their way that another user may write, and install writes
    nothing, names it and says what to do."""
    relative, weaken, copies, message = WHO_CAN_WRITE[case]
    base = str(tmp_path)
    python, package = venv_with_portfwd(base, copies)
    if relative.startswith("venv/lib/python3.11/"):  # whichever Python 3 made the venv
        relative = os.path.relpath(glob.glob(os.path.join(base, "venv/lib/python3*/"
                                                                "site-packages"))[0], base)
    root = os.path.join(base, "root")
    assert install_as(python, package, root).returncode == 0  # all root's: installed
    shutil.rmtree(root)
    path = os.path.join(base, relative)
    weaken(path)
    r = install_as(python, package, root)
    assert r.returncode == 3, r.stderr
    assert r.stderr.startswith("portfwd: error: " + message.format(p=path)), r.stderr
    assert r.stderr.endswith("portfwd: error: nothing installed\n") and "Traceback" not in r.stderr
    assert not os.path.exists(root)
