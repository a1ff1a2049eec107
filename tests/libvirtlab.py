"""A real libvirtd, with its networks, dnsmasq and QEMU guests, inside a throwaway namespace.

    client ns ── uplink ── lab ns (libvirtd, virbr0 / pfv6br, libvirt's firewall rules) ── stand-in ns

libvirtd runs inside the ``lab`` namespace, so its bridges, dnsmasq and
firewall rules live there. Guests are real QEMU (TCG) domains without a disk:
libvirt fires every hook for them exactly as for a real guest. Because such a
guest runs no operating system, a namespace holding the guest's address,
attached to the guest's bridge by a veth, stands in for its network stack.

Everything started here is stopped by PID, everything written is removed.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from typing import Dict, List, Optional

from netlab import CLIENT4, CLIENT6, HOST4, HOST6, run

PIDFILES = ["/run/libvirtd.pid", "/run/virtlogd.pid"]
# where libvirt leaves files of the networks and guests these tests create
LIBVIRT_STATE_DIRS = ["/var/lib/libvirt/dnsmasq", "/run/libvirt/network", "/var/log/libvirt/qemu",
                      "/run/libvirt/qemu"]
HOOK_FILES = ["/etc/libvirt/hooks/qemu.d/portfwd", "/etc/libvirt/hooks/network.d/portfwd"]
URI = "qemu:///system"

NET6_XML = """<network>
  <name>pfv6</name>
  <bridge name='pfv6br'/>
  <forward mode='nat'/>
  <ip address='192.168.151.1' netmask='255.255.255.0'/>
  <ip family='ipv6' address='fd00:151::1' prefix='64'/>
</network>
"""


def domain_xml(name: str, network: str, mac: str) -> str:
    return f"""<domain type='qemu'>
  <name>{name}</name>
  <memory unit='MiB'>64</memory>
  <vcpu>1</vcpu>
  <os><type arch='x86_64' machine='pc'>hvm</type></os>
  <devices>
    <interface type='network'>
      <source network='{network}'/>
      <mac address='{mac}'/>
      <model type='virtio'/>
      <rom enabled='no'/>
    </interface>
  </devices>
</domain>
"""


def _pid(path: str) -> Optional[int]:
    try:
        with open(path) as f:
            return int(f.read().strip())
    except (OSError, ValueError):
        return None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False


def stop_pid(pid: Optional[int], timeout: float = 10) -> None:
    if pid is None or not _alive(pid):
        return
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and _alive(pid):
        time.sleep(0.05)
    if _alive(pid):
        os.kill(pid, signal.SIGKILL)


class LibvirtLab:
    def __init__(self, base: str) -> None:
        if any(_pid(p) and _alive(_pid(p) or 0) for p in PIDFILES):
            raise RuntimeError("a libvirtd or virtlogd is already running on this machine;"
                               " the libvirt tests need it stopped")
        for path in HOOK_FILES:
            if os.path.exists(path):
                raise RuntimeError(f"{path} exists; the libvirt tests install their own hook")
        tag = f"pfv{os.getpid() % 100000}"
        self.lab, self.client = f"{tag}l", f"{tag}c"
        self.standins: List[str] = []
        self.base = base
        self.config = os.path.join(base, "etc", "forward.toml")
        self.run_dir = os.path.join(base, "run")
        self.domains: List[str] = []
        self.created: List[str] = []
        self.files_before = {d: set(os.listdir(d)) if os.path.isdir(d) else set()
                             for d in LIBVIRT_STATE_DIRS}
        try:
            self._build()
        except BaseException:
            self.close()
            raise

    # -- setup ----------------------------------------------------------------
    def ns(self, ns: str, *cmd: str, check: bool = True,
           input: Optional[bytes] = None) -> subprocess.CompletedProcess[bytes]:
        return run("ip", "netns", "exec", ns, *cmd, check=check, input=input)

    def virsh(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[bytes]:
        return run("virsh", "-q", "-c", URI, *args, check=check)

    def _build(self) -> None:
        for ns in (self.lab, self.client):
            run("ip", "netns", "add", ns)
            self.ns(ns, "sysctl", "-qw", "net.ipv6.conf.all.accept_dad=0",
                    "net.ipv6.conf.default.accept_dad=0")
            self.ns(ns, "ip", "link", "set", "lo", "up")
        self.ns(self.lab, "ip", "link", "add", "uplink", "type", "veth", "peer", "name", "eth0",
                "netns", self.client)
        self.ns(self.lab, "ip", "addr", "add", f"{HOST4}/24", "dev", "uplink")
        self.ns(self.lab, "ip", "addr", "add", f"{HOST6}/64", "dev", "uplink")
        self.ns(self.lab, "ip", "link", "set", "uplink", "up")
        self.ns(self.client, "ip", "addr", "add", f"{CLIENT4}/24", "dev", "eth0")
        self.ns(self.client, "ip", "addr", "add", f"{CLIENT6}/64", "dev", "eth0")
        self.ns(self.client, "ip", "link", "set", "eth0", "up")
        self.ns(self.client, "ip", "route", "add", "default", "via", HOST4)
        self.ns(self.client, "ip", "-6", "route", "add", "default", "via", HOST6)
        # portfwd installed the way users install it, with the test's config and state paths
        os.makedirs(os.path.dirname(self.config), mode=0o755)
        with open(self.config, "w") as f:
            f.write("")
        os.chmod(self.config, 0o644)
        for path in HOOK_FILES:
            if not os.path.isdir(os.path.dirname(path)):
                self.created.append(os.path.dirname(path))
        r = run(sys.executable, "-m", "portfwd.cli", "install", "--root", os.path.join(self.base, "r"),
                "--config", self.config, "--run-dir", self.run_dir)
        for path in HOOK_FILES:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            shutil.copy2(os.path.join(self.base, "r", path.lstrip("/")), path)
        del r
        self.start_daemons()

    def start_daemons(self) -> None:
        """virtlogd and libvirtd inside the lab namespace; hooks are read at libvirtd start."""
        if not (_pid("/run/virtlogd.pid") and _alive(_pid("/run/virtlogd.pid") or 0)):
            self.ns(self.lab, "virtlogd", "-d")
        self._start_libvirtd()

    def restart_libvirtd(self) -> None:
        stop_pid(_pid("/run/libvirtd.pid"))
        self._start_libvirtd()

    def _start_libvirtd(self) -> None:
        self.ns(self.lab, "libvirtd", "-d")
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if self.virsh("version", check=False).returncode == 0:
                return
            time.sleep(0.1)
        raise RuntimeError("libvirtd did not answer within 30 s")

    def write_config(self, text: str) -> None:
        tmp = self.config + ".tmp"
        with open(tmp, "w") as f:
            f.write(text)
        os.chmod(tmp, 0o644)
        os.replace(tmp, self.config)

    def ensure_network(self, name: str, xml: Optional[str] = None) -> None:
        if xml is not None and self.virsh("net-info", name, check=False).returncode != 0:
            path = os.path.join(self.base, f"{name}.xml")
            with open(path, "w") as f:
                f.write(xml)
            self.virsh("net-define", path)
        if b"yes" not in self.virsh("net-info", name).stdout.split(b"Active:")[1][:20]:
            self.virsh("net-start", name)

    def standin(self, bridge: str, addr4: Optional[str], gw4: Optional[str],
                addr6: Optional[str] = None, gw6: Optional[str] = None,
                mac: Optional[str] = None) -> str:
        """A namespace holding a guest's addresses (``addr4`` None: none yet, for DHCP),
        on ``bridge`` by a veth whose guest end has ``mac``."""
        ns = f"{self.lab[:-1]}g{len(self.standins)}"
        run("ip", "netns", "add", ns)
        self.standins.append(ns)
        self.ns(ns, "sysctl", "-qw", "net.ipv6.conf.all.accept_dad=0",
                "net.ipv6.conf.default.accept_dad=0")
        self.ns(ns, "ip", "link", "set", "lo", "up")
        peer = f"pfs{len(self.standins)}"
        self.ns(self.lab, "ip", "link", "add", peer, "type", "veth", "peer", "name", "eth0",
                "netns", ns)
        if mac:
            self.ns(ns, "ip", "link", "set", "eth0", "address", mac)
        if addr4:
            self.ns(ns, "ip", "addr", "add", f"{addr4}/24", "dev", "eth0")
        self.ns(ns, "ip", "link", "set", "eth0", "up")
        self.plug(peer, bridge)
        if addr4 and gw4:
            self.ns(ns, "ip", "route", "add", "default", "via", gw4)
        if addr6 and gw6:
            self.ns(ns, "ip", "addr", "add", f"{addr6}/64", "dev", "eth0")
            self.ns(ns, "ip", "-6", "route", "add", "default", "via", gw6)
        return ns

    def plug(self, peer: str, bridge: str) -> None:
        """Attach a stand-in's veth to a bridge and wait until the port forwards
        (libvirt's bridges run STP: a new port listens and learns for a few seconds)."""
        self.ns(self.lab, "ip", "link", "set", peer, "master", bridge, "up")
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            shown = self.ns(self.lab, "bridge", "link", "show", "dev", peer).stdout.decode()
            if " state forwarding " in shown:
                return
            time.sleep(0.1)
        raise RuntimeError(f"bridge port {peer} on {bridge} did not reach forwarding: {shown}")

    def start(self, name: str, network: str, mac: str) -> None:
        """Define the domain (once) and start it."""
        if name not in self.domains:
            path = os.path.join(self.base, f"{name}.xml")
            with open(path, "w") as f:
                f.write(domain_xml(name, network, mac))
            self.virsh("define", path)
            self.domains.append(name)
        self.virsh("start", name)

    # -- teardown ---------------------------------------------------------------
    def close(self) -> None:
        if _pid("/run/libvirtd.pid") and _alive(_pid("/run/libvirtd.pid") or 0):
            for name in self.domains:
                self.virsh("destroy", name, check=False)
                self.virsh("undefine", name, check=False)
            for net in self.virsh("net-list", "--name", check=False).stdout.decode().split():
                self.virsh("net-destroy", net, check=False)
            if self.virsh("net-info", "pfv6", check=False).returncode == 0:
                self.virsh("net-undefine", "pfv6", check=False)
        for pidfile in ["/run/libvirt/qemu/" + d + ".pid" for d in self.domains] + \
                       ["/run/libvirt/network/default.pid", "/run/libvirt/network/pfv6.pid"]:
            stop_pid(_pid(pidfile))
        for pidfile in PIDFILES:
            stop_pid(_pid(pidfile))
        for path in HOOK_FILES:
            if os.path.exists(path):
                os.unlink(path)
        for folder, before in self.files_before.items():
            if not os.path.isdir(folder):
                continue
            for name in set(os.listdir(folder)) - before:
                path = os.path.join(folder, name)
                if os.path.isdir(path) and not os.path.islink(path):
                    shutil.rmtree(path, ignore_errors=True)
                else:
                    os.unlink(path)
        for path in reversed(self.created):
            try:
                os.rmdir(path)
            except OSError:
                pass
        for ns in self.standins + [self.client, self.lab]:
            run("ip", "netns", "del", ns, check=False)

    def pids(self) -> Dict[str, List[int]]:
        """Processes of the kinds these tests start, still alive (for the leak check)."""
        out: Dict[str, List[int]] = {}
        for name in ("libvirtd", "virtlogd", "dnsmasq", "qemu-system-x86"):
            r = run("pgrep", "-x", name, check=False)
            alive = [int(p) for p in r.stdout.split() if _alive(int(p))]
            if alive:
                out[name] = alive
        return out
