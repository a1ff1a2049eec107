"""The systemd units as shipped: hardened (exposure at most 4.0 by `systemd-analyze
security`) and still able to do their job under that sandbox.

The proof boots systemd in a container (`systemd-nspawn`) whose file system is an
overlay of this host's (portfwd's source copied in; the host's own portfwd units
masked in the overlay) and whose network is a namespace made for the test. The
units run there with every sandbox setting they ship with; only the command is
this checkout's portfwd, asking libvirt's test driver (one running domain, "test").
The overlay lives in a private mount namespace that ends with the container.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import time
from typing import Callable, Iterator, List

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
UNITS = ("portfwd.service", "portfwd-sync.service", "portfwd-reapply.service")
BRIDGE4, GUEST4 = "192.168.150.1", "192.168.150.10"
COMMAND = "/usr/bin/python3 -m portfwd.cli"
ARGS = {"daemon": "daemon --connect test:///default --interval 3600",  # only SIGHUP wakes it
        "sync": "sync --connect test:///default", "reapply": "reapply"}
CONFIG = f'[options]\nlocalhost = true\n\n[[forward]]\nguest = "test"\nipv4 = "{GUEST4}"\n' \
         'ports = ["8080:80"]\n'


def unit_text(name: str) -> str:
    with open(os.path.join(ROOT, "systemd", name), encoding="utf-8") as f:
        return f.read()


@pytest.mark.parametrize("name", UNITS)
def test_units_exposure_at_most_4(name: str, tmp_path: "os.PathLike[str]") -> None:
    if shutil.which("systemd-analyze") is None:
        pytest.fail("systemd-analyze missing (package systemd)")
    path = os.path.join(str(tmp_path), name)
    with open(path, "w", encoding="utf-8") as f:
        f.write(unit_text(name).replace("@PORTFWD@", "/usr/local/sbin/portfwd"))
    r = subprocess.run(["systemd-analyze", "security", "--offline=true", "--no-pager", path],
                       capture_output=True, text=True)
    found = re.search(r"Overall exposure level for \S+: (\d+\.\d)", r.stdout)
    assert found, r.stdout + r.stderr
    assert float(found.group(1)) <= 4.0


@pytest.mark.parametrize("name", UNITS)
def test_units_pull_in_no_libvirt_daemon_and_name_the_man_page(name: str) -> None:
    text = unit_text(name)
    assert not re.search(r"^(Wants|Requires|BindsTo)=.*(libvirtd|virtqemud)", text, re.M)
    assert re.search(r"^Documentation=man:portfwd\(8\)( |$)", text, re.M)
    assert "SyslogIdentifier=portfwd\n" in text


def test_daemon_unit_reloads_with_sighup() -> None:
    assert "ExecReload=/bin/kill -HUP $MAINPID\n" in unit_text("portfwd.service")


class Container:
    """systemd booted by systemd-nspawn on an overlay of this host, in netns ``net``."""

    def __init__(self, base: str) -> None:
        self.base = base
        self.tag = f"pfu{os.getpid() % 100000}"
        self.net = self.tag
        self.upper = os.path.join(base, "upper")
        self.root = os.path.join(base, "root")
        self.proc: "subprocess.Popen[bytes] | None" = None
        self.leader = 0

    def netns(self, *cmd: str, check: bool = True) -> "subprocess.CompletedProcess[str]":
        return subprocess.run(["ip", "netns", "exec", self.net, *cmd], capture_output=True,
                              text=True, check=check)

    def inside(self, *cmd: str, check: bool = True) -> "subprocess.CompletedProcess[str]":
        return subprocess.run(["nsenter", "-t", str(self.leader), "-m", "-u", "-i", "-p", "-n",
                               *cmd], capture_output=True, text=True, check=check)

    def write(self, path: str, text: str, mode: int = 0o644) -> None:
        full = os.path.join(self.upper, path.lstrip("/"))
        os.makedirs(os.path.dirname(full), mode=0o755, exist_ok=True)
        with open(full, "w", encoding="utf-8") as f:
            f.write(text)
        os.chmod(full, mode)

    def start(self) -> None:
        subprocess.run(["ip", "netns", "add", self.net], check=True)
        for cmd in (["ip", "link", "set", "lo", "up"],
                    ["ip", "link", "add", "pfbr0", "type", "veth", "peer", "name", "pfbr1"],
                    ["ip", "addr", "add", f"{BRIDGE4}/24", "dev", "pfbr0"],
                    ["ip", "link", "set", "pfbr0", "up"], ["ip", "link", "set", "pfbr1", "up"],
                    # libvirt's iptables chain with its reject, as a NAT network has it
                    ["iptables", "-N", "LIBVIRT_FWI"], ["iptables", "-A", "FORWARD", "-j", "LIBVIRT_FWI"],
                    ["iptables", "-A", "LIBVIRT_FWI", "-o", "pfbr0", "-j", "REJECT"]):
            self.netns(*cmd)
        for sub in ("upper", "work", "root"):
            os.makedirs(os.path.join(self.base, sub), mode=0o755)
        shutil.copytree(os.path.join(ROOT, "src", "portfwd"),
                        os.path.join(self.upper, "opt/pfu-src/portfwd"))
        for name in UNITS:  # the host's own units stay out of the container
            os.makedirs(os.path.join(self.upper, "etc/systemd/system"), exist_ok=True)
            os.symlink("/dev/null", os.path.join(self.upper, "etc/systemd/system", name))
            command = name.replace("portfwd-", "").replace("portfwd.", "daemon.").split(".")[0]
            text = unit_text(name).replace(
                "@PORTFWD@ " + command, f"{COMMAND} {ARGS[command]}").replace(
                "[Service]\n", "[Service]\nEnvironment=PYTHONPATH=/opt/pfu-src\n")
            assert COMMAND in text
            self.write(f"/etc/systemd/system/{name.replace('.service', '-proof.service')}", text)
        self.write("/etc/systemd/system/pfu.target",
                   "[Unit]\nDescription=portfwd unit proof\nRequires=portfwd-proof.service\n"
                   "After=portfwd-proof.service\n")
        self.write("/etc/portfwd/forward.toml", CONFIG)
        os.chmod(os.path.join(self.upper, "etc/portfwd"), 0o755)
        script = (f"mount -t overlay overlay -o lowerdir=/,upperdir={self.upper},"
                  f"workdir={self.base}/work {self.root} && exec systemd-nspawn --quiet"
                  f" --register=no --keep-unit --capability=CAP_NET_ADMIN -D {self.root}"
                  f" --network-namespace-path=/run/netns/{self.net} -M {self.tag}"
                  " -b -- --unit=pfu.target")
        self.proc = subprocess.Popen(["unshare", "-m", "--propagation", "private", "sh", "-c",
                                      script], stdin=subprocess.DEVNULL,
                                     stdout=open(os.path.join(self.base, "boot.log"), "wb"),
                                     stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            self.leader = self._init_pid()
            if self.leader and self.inside("systemctl", "is-active", "pfu.target",
                                           check=False).stdout.strip() == "active":
                return
            assert self.proc.poll() is None, self.boot_log()
            time.sleep(0.3)
        raise AssertionError("container did not reach pfu.target:\n" + self.boot_log())

    def _init_pid(self) -> int:
        assert self.proc is not None
        try:
            children = open(f"/proc/{self.proc.pid}/task/{self.proc.pid}/children").read().split()
        except OSError:
            return 0
        return int(children[0]) if children else 0

    def boot_log(self) -> str:
        with open(os.path.join(self.base, "boot.log"), encoding="utf-8", errors="replace") as f:
            return f.read()[-3000:]

    def journal(self, unit: str) -> List[str]:
        return self.inside("journalctl", "-b", "-u", unit, "-o", "cat", "--no-pager").stdout \
            .splitlines()

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            if self.leader:
                self.inside("systemctl", "poweroff", check=False)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        subprocess.run(["ip", "netns", "del", self.net], check=False)
        shutil.rmtree(self.base, ignore_errors=True)


def until(ready: Callable[[], bool], explain: Callable[[str], List[str]], unit: str,
          seconds: float = 15) -> None:
    """Wait for ``ready``; on timeout fail with the unit's journal."""
    deadline = time.monotonic() + seconds
    while not ready():
        assert time.monotonic() < deadline, "\n".join(explain(unit))
        time.sleep(0.2)


@pytest.fixture
def container() -> Iterator[Container]:
    for tool in ("systemd-nspawn", "nsenter", "unshare", "iptables"):
        if shutil.which(tool) is None:
            pytest.fail(f"{tool} missing (packages systemd-container, util-linux, iptables)")
    box = Container(f"/dev/shm/pfu{os.getpid()}")
    try:
        box.start()
        yield box
    finally:
        box.stop()


@pytest.mark.kernel
def test_hardened_units_still_do_their_job(container: Container) -> None:
    box = container
    # the daemon: its table (with counters), route_localnet for the forward from
    # 127.0.0.1, the accept in libvirt's chain through iptables, its state
    until(lambda: any("synced" in line for line in box.journal("portfwd-proof.service")),
          box.journal, "portfwd-proof.service")
    table = box.netns("nft", "list", "table", "inet", "portfwd").stdout
    assert 'tcp . 8080 counter packets 0 bytes 0 comment "test forward[0].ports[0] 8080:80/tcp"' \
        ' : 192.168.150.10' in table
    assert box.netns("sysctl", "-n", "net.ipv4.conf.pfbr0.route_localnet").stdout == "1\n"
    rules = box.netns("iptables", "-S").stdout
    assert "-A LIBVIRT_FWI -o pfbr0 -j PORTFWD_FWI" in rules and "-A PORTFWD_FWI" in rules
    assert "guests" in box.inside("ls", "/run/portfwd").stdout.split()
    lines = box.journal("portfwd-proof.service")
    ours = [line for line in lines if "synced" in line or "connected" in line]
    assert ours == ["connected to libvirt at test:///default", "synced: 2 forward(s) for 1 guest(s)"]

    # reload: the configuration is read again (the interval of an hour would not)
    box.write("/etc/portfwd/forward.toml", CONFIG.replace('"8080:80"', '"8080:80", "9090:90"'))
    box.inside("systemctl", "reload", "portfwd-proof.service")
    until(lambda: "9090" in box.netns("nft", "list", "map", "inet", "portfwd", "any4_ip").stdout,
          box.journal, "portfwd-proof.service")
    lines = box.journal("portfwd-proof.service")
    assert lines.count("synced: 4 forward(s) for 1 guest(s)") == 1  # once: not syslog as well
    # the drop rule for outside packets to 127.0.0.0/8 deleted behind its back: the daemon
    # reads it back over netlink and rebuilds, within the unit's restrictions
    box.netns("nft", "flush", "chain", "inet", "portfwd", "raw_prerouting")
    until(lambda: "drop" in box.netns("nft", "list", "chain", "inet", "portfwd",
                                      "raw_prerouting").stdout,
          box.journal, "portfwd-proof.service")
    until(lambda: box.netns("sysctl", "-n", "net.ipv4.conf.pfbr0.route_localnet").stdout == "1\n",
          box.journal, "portfwd-proof.service")
    assert any(line.startswith("rebuilt: ") for line in box.journal("portfwd-proof.service"))
    assert not any("cannot read chain" in line for line in box.journal("portfwd-proof.service"))
    # an invalid edit is an error in the journal, at error priority, and changes nothing
    box.write("/etc/portfwd/forward.toml", CONFIG + "bad =\n")
    box.inside("systemctl", "reload", "portfwd-proof.service")

    def errors() -> List[str]:
        return box.inside("journalctl", "-b", "-u", "portfwd-proof.service", "-p", "err",
                          "-o", "cat", "--no-pager").stdout.splitlines()

    until(lambda: bool(errors()), box.journal, "portfwd-proof.service")
    found = errors()
    assert found[0] == "error: /etc/portfwd/forward.toml:8:6: TOML syntax: Invalid value"
    assert "9090" in box.netns("nft", "list", "map", "inet", "portfwd", "any4_ip").stdout
    assert box.inside("systemctl", "is-active", "portfwd-proof.service").stdout == "active\n"

    # the oneshots: reapply rebuilds a wiped table from /run/portfwd; sync from libvirt
    box.inside("systemctl", "stop", "portfwd-proof.service")
    box.netns("nft", "flush", "ruleset")
    r = box.inside("systemctl", "start", "portfwd-reapply-proof.service", check=False)
    assert r.returncode == 0, box.journal("portfwd-reapply-proof.service")
    assert "9090" in box.netns("nft", "list", "map", "inet", "portfwd", "any4_ip").stdout
    box.write("/etc/portfwd/forward.toml", CONFIG)
    r = box.inside("systemctl", "start", "portfwd-sync-proof.service", check=False)
    assert r.returncode == 0, box.journal("portfwd-sync-proof.service")
    assert "9090" not in box.netns("nft", "list", "map", "inet", "portfwd", "any4_ip").stdout
    assert "synced: 2 forwards for 1 guest in table inet portfwd" in \
        box.journal("portfwd-sync-proof.service")
