"""A Debian 13 (trixie) host inside this one: libvirt 11, nftables 1.1, Python 3.13.

    client ns ── uplink ── trixie ns (chroot: libvirtd, virbr0 / pfv6br, portfwd) ── stand-in ns

The root is built once with mmdebstrap from Debian's packages and cached in
ROOTS (rebuilt when the package list changes). Each lab mounts an overlay over
it (so every run starts from the pristine root and writes nothing into the
cache), inside a network namespace and a private mount namespace kept by a
holder process; every command runs there through ``nsenter`` + ``chroot``.
portfwd is installed into the root from this checkout with the root's own
Python, the way an admin on Debian 13 installs it. Closing kills every process
in that mount namespace, then the holder: nothing is left mounted or running.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from typing import Dict, List, Optional, Sequence

from netlab import (CLIENT4, CLIENT6, HOST4, HOST6, TRAFFIC, default_route, plug_and_wait, run,
                    standin_namespace, stop_processes, take_tap)

ROOT_PACKAGES = ["libvirt-daemon-system", "qemu-system-x86", "dnsmasq-base", "nftables",
                 "python3-nftables", "python3-libvirt", "iproute2", "procps", "busybox",
                 "python3-venv", "python3-setuptools", "iptables"]
SUITE = "trixie"
ROOTS = "/var/tmp/portfwd-test-roots"
CHECKOUT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
# libvirt's nftables backend adds `tc ... action csum` for DHCP checksums; this kernel has
# no act_csum. The checksum fix-up only matters to old DHCP clients: skip just that.
TC_WRAPPER = """#!/bin/sh
case "$*" in *"action csum"*) exit 0 ;; esac
exec /usr/sbin/tc "$@"
"""
HOLDER = """set -e
mount -t overlay overlay -o "lowerdir=$1,upperdir=$2,workdir=$3" "$4"
R=$4
mount -t proc proc "$R/proc"
mount -t sysfs sysfs "$R/sys"
mount --rbind /dev "$R/dev"
mount -t tmpfs tmpfs "$R/run"
mkdir -p "$R/run/lock"
mount -t tmpfs tmpfs "$R/tmp"
echo ready
exec sleep infinity
"""


def mirror() -> str:
    """The Debian mirror this machine's own apt sources name (never a hard-coded host)."""
    texts = []
    for folder, names in (("/etc/apt", ["sources.list"]),
                          ("/etc/apt/sources.list.d", sorted(os.listdir("/etc/apt/sources.list.d"))
                           if os.path.isdir("/etc/apt/sources.list.d") else [])):
        for name in names:
            if name.endswith((".list", ".sources")):
                try:
                    with open(os.path.join(folder, name)) as f:
                        texts.append(f.read())
                except OSError:
                    pass
    for text in texts:
        for m in re.finditer(r"^URIs:\s*(\S+)", text, re.M):
            if "security" not in m.group(1):
                return m.group(1)
        for m in re.finditer(r"^deb\s+(?:\[[^]]*\]\s+)?(\S+)\s+\S+", text, re.M):
            if "security" not in m.group(1):
                return m.group(1)
    raise RuntimeError("no Debian mirror in this machine's apt sources")


def cached_root(suite: str = SUITE, packages: Sequence[str] = ROOT_PACKAGES) -> str:
    """A Debian ``suite`` root holding ``packages``, built with mmdebstrap if not cached
    yet; roots of that suite with another package list are removed."""
    key = hashlib.sha256(" ".join([suite] + list(packages)).encode()).hexdigest()[:12]
    root = os.path.join(ROOTS, f"{suite}-{key}")
    if os.path.isfile(os.path.join(root, "etc", "debian_version")):
        return root
    os.makedirs(ROOTS, exist_ok=True)
    building = f"{root}.building.{os.getpid()}"
    r = subprocess.run(["mmdebstrap", "--variant=apt", "--include=" + ",".join(packages),
                        suite, building, mirror()], capture_output=True, text=True)
    if r.returncode != 0:
        shutil.rmtree(building, ignore_errors=True)
        raise RuntimeError(f"mmdebstrap failed: {r.stderr[-2000:]}")
    try:
        os.rename(building, root)
    except OSError:
        if not os.path.isfile(os.path.join(root, "etc", "debian_version")):
            raise
        shutil.rmtree(building, ignore_errors=True)  # another run built it meanwhile
    for stale in os.listdir(ROOTS):  # roots of an older package list (not ones being built)
        if (stale.startswith(f"{suite}-") and stale != os.path.basename(root)
                and ".building." not in stale):
            shutil.rmtree(os.path.join(ROOTS, stale), ignore_errors=True)
    return root


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
        return True
    except ProcessLookupError:
        return False


class RootLab:
    """A cached Debian root mounted as an overlay (every run starts from the pristine
    root; writes land below ``base``) inside a network namespace and a private mount
    namespace kept by a holder process; commands run there through nsenter + chroot."""

    def __init__(self, base: str, mountpoint: str) -> None:
        self.base = base
        self.root = mountpoint  # where the overlay sits in the holder's mount namespace
        self.holder: "Optional[subprocess.Popen[bytes]]" = None
        self.made_mountpoint = False

    def mount(self, lower: str, netns: str) -> None:
        """Mount ``lower`` with an overlay in a new mount namespace inside ``netns``."""
        upper, work = os.path.join(self.base, "upper"), os.path.join(self.base, "work")
        os.makedirs(upper)
        os.makedirs(work)
        if not os.path.isdir(self.root):
            os.makedirs(self.root)
            self.made_mountpoint = True
        self.holder = subprocess.Popen(
            ["ip", "netns", "exec", netns, "unshare", "--mount", "--propagation", "slave",
             "sh", "-c", HOLDER, "holder", lower, upper, work, self.root],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        assert self.holder.stdout is not None
        if self.holder.stdout.readline().strip() != b"ready":
            assert self.holder.stderr is not None
            raise RuntimeError(f"{lower}: root mounts failed: {self.holder.stderr.read().decode()}")

    def argv(self, *cmd: str) -> List[str]:
        assert self.holder is not None
        return ["nsenter", f"--target={self.holder.pid}", "--mount", "--net", "--",
                "chroot", self.root, "env", "-i", f"PATH={PATH}", "HOME=/root", "LC_ALL=C.UTF-8",
                *cmd]

    def sh(self, script: str, check: bool = True) -> "subprocess.CompletedProcess[bytes]":
        return run(*self.argv("sh", "-c", script), check=check)

    def ns(self, ns: str, *cmd: str, check: bool = True) -> "subprocess.CompletedProcess[bytes]":
        return run("ip", "netns", "exec", ns, *cmd, check=check)

    def file(self, path: str) -> str:
        """A path inside the root, as seen from outside."""
        assert self.holder is not None
        return f"/proc/{self.holder.pid}/root{self.root}{path}"

    def unmount(self) -> None:
        """End every process in the root, the holder and with it every mount; drop the
        overlay's writes."""
        if self.holder is not None:
            self._kill_namespace(self.holder.pid)
            self.holder.kill()
            self.holder.wait()
            self.holder = None
        shutil.rmtree(os.path.join(self.base, "upper"), ignore_errors=True)
        shutil.rmtree(os.path.join(self.base, "work"), ignore_errors=True)
        if self.made_mountpoint:
            try:
                os.rmdir(self.root)
            except OSError:
                pass

    @staticmethod
    def _kill_namespace(holder: int) -> None:
        """Every process in the holder's mount namespace but the holder: libvirtd,
        virtlogd, dnsmasq, QEMU."""
        try:
            ours = os.readlink(f"/proc/{holder}/ns/mnt")
        except OSError:
            return
        for sig in (signal.SIGTERM, signal.SIGKILL):
            left = []
            for entry in os.listdir("/proc"):
                if not entry.isdigit() or int(entry) == holder:
                    continue
                try:
                    if os.readlink(f"/proc/{entry}/ns/mnt") == ours:
                        os.kill(int(entry), sig)
                        left.append(int(entry))
                except OSError:
                    continue
            deadline = time.monotonic() + 10
            while left and time.monotonic() < deadline:
                left = [p for p in left if _alive(p) and not _zombie(p)]
                time.sleep(0.1)
            if not left:
                return


class TrixieLab(RootLab):
    def __init__(self, base: str, backend: Optional[str]) -> None:
        super().__init__(base, "/mnt/trixie")
        tag = f"pft{os.getpid() % 100000}"
        self.host, self.client = f"{tag}h", f"{tag}c"
        self.standins: List[str] = []
        self.ports: Dict[str, str] = {}  # stand-in → the name of its end in the host
        self.procs: "List[subprocess.Popen[bytes]]" = []
        self.backend = backend  # None: libvirt's own default (iptables in Debian 13's build)
        try:
            self._build(backend)
        except BaseException:
            self.close()
            raise

    def virsh(self, *args: str, check: bool = True) -> "subprocess.CompletedProcess[bytes]":
        return run(*self.argv("virsh", "-q", "-c", "qemu:///system", *args), check=check)

    def portfwd(self, *args: str) -> "subprocess.CompletedProcess[bytes]":
        return run(*self.argv("/opt/portfwd/bin/portfwd", *args), check=False)

    # -- setup ----------------------------------------------------------------
    def _build(self, backend: Optional[str]) -> None:
        lower = cached_root()
        for ns in (self.host, self.client):
            run("ip", "netns", "add", ns)
            self.ns(ns, "sysctl", "-qw", "net.ipv6.conf.all.accept_dad=0",
                    "net.ipv6.conf.default.accept_dad=0")
            self.ns(ns, "ip", "link", "set", "lo", "up")
        self.mount(lower, self.host)
        # the uplink to the client
        self.ns(self.host, "ip", "link", "add", "uplink", "type", "veth", "peer", "name", "eth0",
                "netns", self.client)
        self.ns(self.host, "ip", "addr", "add", f"{HOST4}/24", "dev", "uplink")
        self.ns(self.host, "ip", "addr", "add", f"{HOST6}/64", "dev", "uplink", "nodad")
        self.ns(self.host, "ip", "link", "set", "uplink", "up")
        self.ns(self.client, "ip", "addr", "add", f"{CLIENT4}/24", "dev", "eth0")
        self.ns(self.client, "ip", "addr", "add", f"{CLIENT6}/64", "dev", "eth0", "nodad")
        self.ns(self.client, "ip", "link", "set", "eth0", "up")
        self.ns(self.client, "ip", "route", "add", "default", "via", HOST4)
        self.ns(self.client, "ip", "-6", "route", "add", "default", "via", HOST6)
        self.ns(self.host, "sysctl", "-qw", "net.ipv4.ip_forward=1",
                "net.ipv6.conf.all.forwarding=1")
        # portfwd from this checkout, installed with the root's own Python
        src = self.file("/opt/portfwd-src")
        os.makedirs(src)
        for part in ("pyproject.toml", "README.md", "src", "hook", "config", "systemd"):
            if os.path.isdir(os.path.join(CHECKOUT, part)):
                shutil.copytree(os.path.join(CHECKOUT, part), os.path.join(src, part),
                                symlinks=True,
                                ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
            else:
                shutil.copy2(os.path.join(CHECKOUT, part), os.path.join(src, part))
        with open(self.file("/usr/local/sbin/tc"), "w") as f:
            f.write(TC_WRAPPER)
        os.chmod(self.file("/usr/local/sbin/tc"), 0o755)
        with open(self.file("/etc/libvirt/qemu.conf"), "a") as f:
            f.write('\nnamespaces = []\n')  # no per-domain mount namespace inside a chroot
        if backend:
            with open(self.file("/etc/libvirt/network.conf"), "a") as f:
                f.write(f'\nfirewall_backend = "{backend}"\n')
        self.sh("python3 -m venv --system-site-packages /opt/portfwd"
                " && /opt/portfwd/bin/pip install -q --no-build-isolation --no-deps --no-index"
                " /opt/portfwd-src && /opt/portfwd/bin/portfwd install >/dev/null")
        self.sh("virtlogd -d && libvirtd -d")
        deadline = time.monotonic() + 60
        while self.virsh("version", check=False).returncode != 0:
            if time.monotonic() > deadline:
                raise RuntimeError("libvirtd in the trixie root did not answer within 60 s")
            time.sleep(0.2)

    def versions(self) -> str:
        r = self.sh("libvirtd --version; nft --version; python3 --version")
        return " / ".join(line.strip() for line in r.stdout.decode().splitlines())

    def write_config(self, text: str) -> None:
        path = self.file("/etc/portfwd/forward.toml")
        with open(path + ".tmp", "w") as f:
            f.write(text)
        os.chmod(path + ".tmp", 0o644)
        os.replace(path + ".tmp", path)

    def define_network(self, xml: str) -> None:
        with open(self.file("/tmp/net.xml"), "w") as f:
            f.write(xml)
        self.virsh("net-define", "/tmp/net.xml")
        self.virsh("net-start", xml.split("<name>")[1].split("<")[0])

    def start(self, name: str, domain_xml: str) -> None:
        with open(self.file(f"/tmp/{name}.xml"), "w") as f:
            f.write(domain_xml)
        self.virsh("define", f"/tmp/{name}.xml")
        self.virsh("start", name)

    def standin(self, bridge: str, mac: str, addr4: Optional[str] = None,
                gw4: Optional[str] = None, addr6: Optional[str] = None,
                gw6: Optional[str] = None) -> str:
        """A stand-in guest on ``bridge`` answering tcp 80 and udp 53."""
        ns = f"{self.host[:-1]}g{len(self.standins)}"
        self.standins.append(ns)
        peer = f"pft{len(self.standins)}"
        standin_namespace(self.ns, self.host, ns, peer, mac, addr4, addr6)
        self.plug(peer, bridge)
        self.ports[ns] = peer
        if gw4:
            default_route(self.ns, ns, "-4", gw4)
        if gw6:
            default_route(self.ns, ns, "-6", gw6)
        for proto, port in (("tcp", "80"), ("udp", "53")):
            p = subprocess.Popen(["ip", "netns", "exec", ns, sys.executable, TRAFFIC, "serve",
                                  proto, port], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
            self.procs.append(p)
            assert p.stdout is not None and p.stdout.readline().strip() == b"ready"
        return ns

    def plug(self, peer: str, bridge: str) -> None:
        plug_and_wait(self.ns, self.host, peer, bridge)

    def as_tap(self, ns: str, name: str) -> None:
        """Make stand-in ``ns`` the network stack behind running domain ``name``'s tap
        (``netlab.take_tap``)."""
        self.ports[ns] = take_tap(self.ns, self.host, self.ports[ns],
                                  self.virsh("dumpxml", name).stdout)

    def probe(self, proto: str, addr: str, port: int, wait: float = 0.0) -> Optional[str]:
        """The stand-in's answer through ``addr:port`` from the client (polling up to
        ``wait`` seconds), or None."""
        deadline = time.monotonic() + wait
        while True:
            r = self.ns(self.client, sys.executable, TRAFFIC, "probe", proto, addr, str(port),
                        check=False)
            if r.returncode == 0:
                return str(r.stdout.decode().strip())
            if time.monotonic() >= deadline:
                return None
            time.sleep(0.2)

    def restart_libvirtd(self) -> None:
        """Stop libvirtd (SIGTERM; SIGKILL after 30 s, as systemd would), start it again,
        and wait until it answers."""
        pid = self.sh("cat /run/libvirtd.pid").stdout.decode().strip()
        self.sh(f"kill {pid}")
        deadline = time.monotonic() + 30
        while self.sh(f"kill -0 {pid}", check=False).returncode == 0:
            if time.monotonic() > deadline:
                self.sh(f"kill -9 {pid}", check=False)
                deadline = time.monotonic() + 10
            time.sleep(0.1)
        self.sh("libvirtd -d")
        deadline = time.monotonic() + 60
        while self.virsh("version", check=False).returncode != 0:
            if time.monotonic() > deadline:
                raise RuntimeError("libvirtd in the trixie root did not answer after a restart")
            time.sleep(0.2)

    # -- teardown ---------------------------------------------------------------
    def close(self) -> None:
        stop_processes(self.procs)
        self.unmount()
        for ns in self.standins + [self.client, self.host]:
            run("ip", "netns", "del", ns, check=False)


def _zombie(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] == "Z"
    except OSError:
        return True
