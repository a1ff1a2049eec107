"""A real libvirtd, with its networks, dnsmasq and QEMU guests, inside a throwaway namespace.

    client ns ── uplink ── lab ns (libvirtd, virbr0 / pfv6br, libvirt's firewall rules) ── stand-in ns

libvirtd runs inside the ``lab`` namespace, so its bridges, dnsmasq and
firewall rules live there. Guests are real QEMU (TCG) domains without a disk:
libvirt fires every hook for them exactly as for a real guest. Because such a
guest runs no operating system, a namespace holding the guest's address,
attached to the guest's bridge by a veth, stands in for its network stack.

libvirt's files live in a private mount namespace: a holder process keeps it,
with a copy of /etc/libvirt (its hooks replaced by portfwd's, installed from
this checkout) bound over /etc/libvirt and tmpfs over /run/libvirt,
/var/lib/libvirt, /var/log/libvirt and /var/cache/libvirt. libvirtd, virsh and
portfwd all run in it (``argv``): a libvirtd of the host, its hooks (portfwd's
own, if installed), its domains and its files are neither seen nor touched.

Two or more labs can share one ``Lan`` (a namespace with a bridge, the client on
it) instead of a client each: hosts of a fleet, whose libvirtds listen on TCP so
that a guest migrates between them (``migrate``). A guest started with ``boot``
files runs a kernel of its own (tests/guestimage.py), network stack included.

Everything started here is stopped by PID; the namespace, and with it every
file libvirt wrote, goes with the holder.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
import uuid
from typing import Dict, List, Optional, Tuple

from netlab import (CLIENT4, CLIENT6, HOST4, HOST6, default_route, plug_and_wait, run,
                    standin_namespace, take_tap)

# inside the lab's mount namespace (so never a running libvirtd's of the host)
LIBVIRTD_PID, VIRTLOGD_PID = "/run/libvirt/pf-libvirtd.pid", "/run/libvirt/pf-virtlogd.pid"
PIDFILES = [LIBVIRTD_PID, VIRTLOGD_PID]
PRIVATE = ["/run/libvirt", "/var/lib/libvirt", "/var/log/libvirt", "/var/cache/libvirt"]
HOOK_FILES = ["/etc/libvirt/hooks/qemu.d/portfwd", "/etc/libvirt/hooks/network.d/portfwd"]
URI = "qemu:///system"
CONSOLE_LOG = "/run/libvirt/qemu/{name}-console.log"
Boot = Tuple[str, str, str]  # kernel, initramfs, kernel command line
HOOK_LOG = "/run/libvirt/pf-hooks.log"
# qemu.d/0-record, run by libvirt before portfwd's hook: one line per call, wall-clock time first
RECORD_HOOK = f"""#!/bin/sh
cat >/dev/null
echo "$(date +%s.%N) $*" >>{HOOK_LOG}
"""
# run by the holder: the mounts above, then wait
MOUNTS = """set -e
cp -a /etc/libvirt/. "$1/"
rm -rf "$1/hooks"
mkdir -p "$1/hooks/qemu.d" "$1/hooks/network.d"
mount --bind "$1" /etc/libvirt
shift
for d in "$@"; do mount -t tmpfs -o mode=0755 tmpfs "$d"; done
echo ready
exec sleep infinity
"""

NET6_XML = """<network>
  <name>pfv6</name>
  <bridge name='pfv6br'/>
  <forward mode='nat'/>
  <ip address='192.168.151.1' netmask='255.255.255.0'/>
  <ip family='ipv6' address='fd00:151::1' prefix='64'/>
</network>
"""


def domain_xml(name: str, network: str, mac: str, boot: Optional[Boot] = None,
               metadata: str = "") -> str:
    """A diskless domain; with ``boot`` (kernel, initramfs, command line) it runs that
    kernel, its serial console written to CONSOLE_LOG (in the lab's mount namespace);
    ``metadata``: the children of its ``<metadata>``."""
    kernel, memory, console = "", 64, ""
    if boot is not None:
        kernel = (f"<kernel>{boot[0]}</kernel><initrd>{boot[1]}</initrd>"
                  f"<cmdline>{boot[2]}</cmdline>")
        memory = 128
        console = (f"<serial type='file'><source path='{CONSOLE_LOG.format(name=name)}'/>"
                   "</serial>")
    return f"""<domain type='qemu'>
  <name>{name}</name>
  <memory unit='MiB'>{memory}</memory>
  <vcpu>1</vcpu>
  <os><type arch='x86_64' machine='pc'>hvm</type>{kernel}</os>{
      f"<metadata>{metadata}</metadata>" if metadata else ""}
  <devices>{console}
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


def host_addresses(n: int) -> Tuple[str, str]:
    """The uplink addresses of host number ``n`` (1: HOST4 and HOST6; 2 is the client's)."""
    return f"203.0.113.{n}", f"2001:db8:1::{n}"


class Lan:
    """A namespace whose bridge ``lan`` joins the uplinks of several labs, with the client's
    addresses on that bridge: the LAN of a fleet, and a client on it."""

    def __init__(self) -> None:
        self.ns = f"pfv{os.getpid() % 100000}n"
        try:
            run("ip", "netns", "add", self.ns)
            self._in("sysctl", "-qw", "net.ipv6.conf.all.accept_dad=0",
                     "net.ipv6.conf.default.accept_dad=0")
            self._in("ip", "link", "set", "lo", "up")
            self._in("ip", "link", "add", "lan", "type", "bridge")
            self._in("ip", "addr", "add", f"{CLIENT4}/24", "dev", "lan")
            self._in("ip", "addr", "add", f"{CLIENT6}/64", "dev", "lan", "nodad")
            self._in("ip", "link", "set", "lan", "up")
        except BaseException:
            self.close()
            raise

    def _in(self, *cmd: str) -> None:
        run("ip", "netns", "exec", self.ns, *cmd)

    def close(self) -> None:
        run("ip", "netns", "del", self.ns, check=False)


class LibvirtLab:
    def __init__(self, base: str, lan: Optional[Lan] = None, host: int = 1,
                 record_hooks: bool = False) -> None:
        """A lab whose uplink leads to a client namespace of its own, or with ``lan`` to
        that LAN as host number ``host``: its libvirtd then also listens on TCP (auth
        none), with a host UUID of its own, so that guests migrate between such labs.
        ``record_hooks``: every qemu hook call is recorded (``hook_calls``)."""
        self.record_hooks = record_hooks
        tag = f"pfv{os.getpid() % 100000}{'' if host == 1 else host}"
        self.lab = f"{tag}l"
        self.client = lan.ns if lan else f"{tag}c"
        self.lan, self.host = lan, host
        self.host4, self.host6 = host_addresses(host)
        self.standins: List[str] = []
        self.ports: Dict[str, str] = {}  # stand-in → the name of its end in the lab
        self.net = ""  # the lab's network namespace as /proc/PID/ns/net names it
        self.base = base
        self.config = os.path.join(base, "etc", "forward.toml")
        self.run_dir = os.path.join(base, "run")
        self.domains: List[str] = []
        self.made: List[str] = []  # mount points this lab had to create on the host
        self.holder: "Optional[subprocess.Popen[bytes]]" = None
        self.before = self._processes()
        try:
            self._build()
        except BaseException:
            self.close()
            raise

    # -- the private mount namespace ------------------------------------------
    def _enter_private_files(self) -> None:
        for path in PRIVATE:
            if not os.path.isdir(path):
                os.makedirs(path)
                self.made.append(path)
        etc = os.path.join(self.base, "etc-libvirt")
        os.makedirs(etc)
        self.holder = subprocess.Popen(
            ["unshare", "--mount", "--propagation", "slave", "sh", "-c", MOUNTS, "mounts", etc,
             *PRIVATE], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        assert self.holder.stdout is not None
        if self.holder.stdout.readline().strip() != b"ready":
            assert self.holder.stderr is not None
            raise RuntimeError(f"private mounts failed: {self.holder.stderr.read().decode()}")
        self.etc = etc
        if self.lan:  # TCP for migrations; "the same host" is judged by host_uuid
            with open(os.path.join(etc, "libvirtd.conf"), "a") as f:
                f.write(f'\nlisten_tls = 0\nlisten_tcp = 1\nauth_tcp = "none"\n'
                        f'host_uuid = "{uuid.uuid4()}"\n')

    def path(self, path: str) -> str:
        """``path`` as the lab's libvirtd sees it, from outside its mount namespace."""
        assert self.holder is not None
        return f"/proc/{self.holder.pid}/root{path}"

    def argv(self, ns: Optional[str], *cmd: str) -> List[str]:
        """A command line that runs ``cmd`` in the lab's mount namespace and network
        namespace ``ns`` (None: the root network namespace), as libvirtd sees things."""
        assert self.holder is not None
        enter = ["nsenter", f"--mount=/proc/{self.holder.pid}/ns/mnt", "--"]
        return enter + (["ip", "netns", "exec", ns] if ns else []) + list(cmd)

    # -- setup ----------------------------------------------------------------
    def ns(self, ns: str, *cmd: str, check: bool = True,
           input: Optional[bytes] = None) -> subprocess.CompletedProcess[bytes]:
        return run(*self.argv(ns, *cmd), check=check, input=input)

    def virsh(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[bytes]:
        return run(*self.argv(None, "virsh", "-q", "-c", URI, *args), check=check)

    def _build(self) -> None:
        self._enter_private_files()
        for ns in (self.lab,) if self.lan else (self.lab, self.client):
            run("ip", "netns", "add", ns)
            if ns == self.lab:  # what the leak check looks at (``pids``)
                self.net = f"net:[{os.stat(os.path.join('/run/netns', ns)).st_ino}]"
            self.ns(ns, "sysctl", "-qw", "net.ipv6.conf.all.accept_dad=0",
                    "net.ipv6.conf.default.accept_dad=0")
            self.ns(ns, "ip", "link", "set", "lo", "up")
        far = f"up{self.host}" if self.lan else "eth0"
        self.ns(self.lab, "ip", "link", "add", "uplink", "type", "veth", "peer", "name", far,
                "netns", self.client)
        self.ns(self.lab, "ip", "addr", "add", f"{self.host4}/24", "dev", "uplink")
        self.ns(self.lab, "ip", "addr", "add", f"{self.host6}/64", "dev", "uplink")
        self.ns(self.lab, "ip", "link", "set", "uplink", "up")
        if self.lan:
            self.ns(self.client, "ip", "link", "set", far, "master", "lan", "up")
        else:
            self.ns(self.client, "ip", "addr", "add", f"{CLIENT4}/24", "dev", "eth0")
            self.ns(self.client, "ip", "addr", "add", f"{CLIENT6}/64", "dev", "eth0")
            self.ns(self.client, "ip", "link", "set", "eth0", "up")
            default_route(self.ns, self.client, "-4", HOST4)
            default_route(self.ns, self.client, "-6", HOST6)
        # portfwd installed the way users install it, with the test's config and state paths
        os.makedirs(os.path.dirname(self.config), mode=0o755)
        with open(self.config, "w") as f:
            f.write("")
        os.chmod(self.config, 0o644)
        run(sys.executable, "-m", "portfwd.cli", "install", "--root", os.path.join(self.base, "r"),
            "--config", self.config, "--run-dir", self.run_dir)
        for path in HOOK_FILES:  # into the lab's private copy of /etc/libvirt
            shutil.copy2(os.path.join(self.base, "r", path.lstrip("/")),
                         os.path.join(self.etc, path[len("/etc/libvirt/"):]))
        if self.record_hooks:
            recorder = os.path.join(self.etc, "hooks", "qemu.d", "0-record")
            with open(recorder, "w") as f:
                f.write(RECORD_HOOK)
            os.chmod(recorder, 0o755)
        self.start_daemons()

    def start_daemons(self) -> None:
        """virtlogd and libvirtd inside the lab namespace; hooks are read at libvirtd start."""
        if not _alive(_pid(self.path(VIRTLOGD_PID)) or 0):
            self.ns(self.lab, "virtlogd", "-d", "-p", VIRTLOGD_PID)
        self._start_libvirtd()

    def restart_libvirtd(self) -> None:
        stop_pid(_pid(self.path(LIBVIRTD_PID)))
        self._start_libvirtd()

    def _start_libvirtd(self) -> None:
        listen = ["--listen"] if self.lan else []
        self.ns(self.lab, "libvirtd", "-d", *listen, "-p", LIBVIRTD_PID)
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
                mac: Optional[str] = None, plug: bool = True) -> str:
        """A namespace holding a guest's addresses (``addr4`` None: none yet, for DHCP),
        on ``bridge`` by a veth whose guest end has ``mac`` (``plug`` False: not yet;
        ``as_tap`` plugs it in the place of a guest's tap)."""
        ns = f"{self.lab[:-1]}g{len(self.standins)}"
        self.standins.append(ns)
        peer = f"pfs{len(self.standins)}"
        standin_namespace(self.ns, self.lab, ns, peer, mac, addr4, addr6)
        self.ports[ns] = peer
        if plug:
            self.plug(peer, bridge)
        if addr4 and gw4:
            default_route(self.ns, ns, "-4", gw4)
        if addr6 and gw6:
            default_route(self.ns, ns, "-6", gw6)
        return ns

    def plug(self, peer: str, bridge: str) -> None:
        plug_and_wait(self.ns, self.lab, peer, bridge)

    def as_tap(self, ns: str, name: str) -> None:
        """Make stand-in ``ns`` the network stack behind running domain ``name``'s tap
        (``netlab.take_tap``): after every start, as libvirt gives each start a new tap."""
        self.ports[ns] = take_tap(self.ns, self.lab, self.ports[ns],
                                  self.virsh("dumpxml", name).stdout)

    def start(self, name: str, network: str, mac: str, boot: Optional[Boot] = None,
              metadata: str = "") -> None:
        """Define the domain (once) and start it."""
        if name not in self.domains:
            path = os.path.join(self.base, f"{name}.xml")
            with open(path, "w") as f:
                f.write(domain_xml(name, network, mac, boot, metadata))
            self.virsh("define", path)
            self.domains.append(name)
        self.virsh("start", name)

    def hook_calls(self) -> List[Tuple[float, str]]:
        """(wall-clock time, "GUEST OP SUBOP EXTRA") of every qemu hook call so far."""
        try:
            with open(self.path(HOOK_LOG)) as f:
                lines = f.read().splitlines()
        except FileNotFoundError:
            return []
        return [(float(t), args) for t, args in (line.split(" ", 1) for line in lines)]

    def migrate(self, name: str, to: "LibvirtLab") -> subprocess.CompletedProcess[bytes]:
        """``virsh migrate --live`` of running domain ``name`` to lab ``to`` (both on one
        Lan), libvirt's connection and QEMU's stream over the LAN."""
        r = run(*self.argv(self.lab, "virsh", "-q", "-c", URI, "migrate", "--live", name,
                           f"qemu+tcp://{to.host4}/system", f"tcp://{to.host4}"), check=False)
        if r.returncode == 0:
            to.domains.append(name)  # for close(): it runs there now
        return r

    # -- teardown ---------------------------------------------------------------
    def close(self) -> None:
        if self.holder is not None and _alive(_pid(self.path(LIBVIRTD_PID)) or 0):
            for name in self.domains:
                self.virsh("destroy", name, check=False)
                self.virsh("undefine", name, check=False)
            for net in self.virsh("net-list", "--name", check=False).stdout.decode().split():
                self.virsh("net-destroy", net, check=False)
        if self.holder is not None:
            for pidfile in ["/run/libvirt/qemu/" + d + ".pid" for d in self.domains] + \
                           ["/run/libvirt/network/default.pid", "/run/libvirt/network/pfv6.pid"] \
                           + PIDFILES:
                stop_pid(_pid(self.path(pidfile)))
            self.holder.kill()  # its mount namespace, and every file libvirt wrote, go with it
            self.holder.wait()
        for path in reversed(self.made):
            try:
                os.rmdir(path)
            except OSError:
                pass
        for ns in self.standins + ([] if self.lan else [self.client]) + [self.lab]:
            run("ip", "netns", "del", ns, check=False)

    @staticmethod
    def _processes() -> Dict[str, List[int]]:
        out: Dict[str, List[int]] = {}
        for name in ("libvirtd", "virtlogd", "dnsmasq", "qemu-system-x86"):
            r = run("pgrep", "-x", name, check=False)
            alive = [int(p) for p in r.stdout.split() if _alive(int(p))]
            if alive:
                out[name] = alive
        return out

    def pids(self) -> Dict[str, List[int]]:
        """Processes of the kinds these tests start that were not running before the
        lab (a libvirtd of the host may run beside it), still alive in this lab's
        network namespace (other labs may run beside it): the leak check."""
        out = {}
        for name, pids in self._processes().items():
            left = [p for p in pids if p not in self.before.get(name, []) and self._ours(p)]
            if left:
                out[name] = left
        return out

    def _ours(self, pid: int) -> bool:
        """Whether process ``pid`` runs in this lab's network namespace (True when that
        cannot be told: the check then errs on the side of a leak)."""
        if not self.net:
            return True
        try:
            return os.readlink(f"/proc/{pid}/ns/net") == self.net
        except FileNotFoundError:
            return False  # ended meanwhile
        except OSError:
            return True
