"""portfwd benchmark, the daemon: its resident memory idle and with 10,000 forwards,
and how long a lease change takes to become a live forward.

Run as root: ``.venv/bin/python bench/daemon.py`` (see bench/README.md).

No libvirtd: ``portfwd daemon`` connects to libvirt's test driver
(``test:///FILE``, running domains from an XML file, inside the daemon's own
process) and runs in a network namespace and a private mount namespace made for
the run, where tmpfs hides /var/lib/libvirt/dnsmasq (the lease files it watches)
and /run/libvirt (the network definition it reads). Guest ``lease1`` has one
forward whose address is discovered (``listen`` on the bridge's address, so its
map holds that element alone and can be polled cheaply); writing its lease file
(atomically, as libvirt's lease helper does) is the event, the element with the
new address appearing in the kernel is the reaction.

Two daemons, one after the other: "idle" knows only lease1 (1 domain); "10k fwd"
also 1,000 other running domains x 10 forwards. Memory is VmRSS/VmHWM of the
daemon process; the floor is a Python process that imports what the daemon uses
and opens the same test driver file (its domains live in the daemon's memory
too, which with libvirtd they would not).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from typing import Any, Dict, List, Optional

from common import (BRIDGE4, ROOT, PATH, Row, Site, forward_toml, median, other_name,
                    others_toml, part_main, sh)

LEASE_GUEST, LEASE_MAC = "lease1", "52:54:00:aa:00:01"
ADDRESSES = ("192.168.150.10", "192.168.150.11")  # a new lease moves between them
TRIALS = int(os.environ.get("PFBENCH_LEASE_TRIALS", "7"))
MEMORY_TARGET_MB = 40.0
TIMEOUT = 60.0
INTERVAL = 0.5  # the daemon's default --interval

FLOOR = """
import sys, libvirt, nftables
from portfwd import cli, daemon, engine
libvirt.registerErrorHandler(lambda *_: None, None)
conn = libvirt.open(sys.argv[1])
conn.listAllDomains(0)
nftables.Nftables()
fields = dict(l.split(":", 1) for l in open("/proc/self/status"))
print(int(fields["VmRSS"].split()[0]), int(fields["VmHWM"].split()[0]))
"""


def node_xml(others: int) -> str:
    """The test driver's file: lease1 (one NIC on network "default") and ``others``
    running domains without NICs."""
    domains = [f"""<domain type='test'><name>{LEASE_GUEST}</name>
<uuid>6b1f0c2e-0000-4000-8000-000000000001</uuid><memory>65536</memory>
<os><type>hvm</type></os><devices><interface type='network'>
<mac address='{LEASE_MAC}'/><source network='default'/></interface></devices></domain>"""]
    for g in range(others):
        domains.append(f"<domain type='test'><name>{other_name(g)}</name><memory>65536</memory>"
                       "<os><type>hvm</type></os></domain>")
    return "<node>\n" + "\n".join(domains) + "\n</node>\n"


NETWORK = f"""<networkstatus><network><name>default</name><bridge name='br0'/>
<ip address='{BRIDGE4}' netmask='255.255.255.0'><dhcp>
<range start='192.168.150.2' end='192.168.150.254'/></dhcp></ip></network></networkstatus>
"""

LEASE_FORWARD = (f'[[forward]]\nguest = "{LEASE_GUEST}"\nports = [{{ host = 8080, guest = 80,'
                 f' proto = "tcp", listen = ["{BRIDGE4}"] }}]\n\n')


# -- inside the namespaces ----------------------------------------------------------

def status(pid: int) -> Dict[str, int]:
    """VmRSS and VmHWM of a process, in kB."""
    with open(f"/proc/{pid}/status", encoding="ascii") as f:
        fields = dict(line.split(":", 1) for line in f)
    return {k: int(fields[k].split()[0]) for k in ("VmRSS", "VmHWM")}


def write_lease(address: str) -> None:
    lease = [{"ip-address": address, "mac-address": LEASE_MAC, "hostname": LEASE_GUEST,
              "expiry-time": int(time.time()) + 3600}]
    path = "/var/lib/libvirt/dnsmasq/br0.status"
    with open(path + ".new", "w", encoding="utf-8") as f:
        json.dump(lease, f)
    os.replace(path + ".new", path)


def lease_target(nft: Any) -> Optional[str]:
    """The address lease1's forward leads to in the kernel now, if any."""
    rc, out, _ = nft.json_cmd({"nftables": [{"list": {"map": {
        "family": "inet", "table": "portfwd", "name": "fwd4_ip"}}}]})
    if rc != 0:
        return None
    for obj in out["nftables"]:
        for _key, value in obj.get("map", {}).get("elem", []):
            return str(value)
    return None


def until(check: Any, what: str, log: str, pause: float = 0.005) -> None:
    deadline = time.monotonic() + TIMEOUT
    while not check():
        if time.monotonic() > deadline:
            with open(log, encoding="utf-8", errors="replace") as f:
                raise RuntimeError(f"timed out waiting for {what}; daemon log:\n{f.read()[-3000:]}")
        time.sleep(pause)


def one_daemon(base: str, name: str, others: int) -> Dict[str, Any]:
    """Start a daemon over ``others`` + lease1, measure, stop it."""
    import nftables

    site = Site(os.path.join(base, name), "")
    node = os.path.join(base, f"{name}.xml")
    with open(node, "w", encoding="utf-8") as f:
        f.write(node_xml(others))
    site.write(LEASE_FORWARD + (others_toml() if others else ""))
    uri = f"test://{node}"
    log = os.path.join(base, f"{name}.log")
    env = dict(site.env, PYTHONPATH=os.path.join(ROOT, "src"))
    for path in ("/var/lib/libvirt/dnsmasq/br0.status",):
        if os.path.exists(path):
            os.unlink(path)
    nft = nftables.Nftables()
    nft.set_json_output(True)
    with open(log, "wb") as out:
        daemon = subprocess.Popen([sys.executable, "-m", "portfwd.cli", "daemon", "--connect", uri,
                                   "--interval", str(INTERVAL)], stdout=out, stderr=out, env=env)
    try:
        synced = "synced: "
        until(lambda: synced in open(log, encoding="utf-8", errors="replace").read(),
              "the first reconcile", log)
        if others:
            until(lambda: site.elements("any4_port") == others * 10, "10,000 forwards", log, 0.3)
        memory = status(daemon.pid)
        reactions = []
        for trial in range(TRIALS):
            address = ADDRESSES[trial % 2]
            time.sleep(INTERVAL * 1.5)  # the daemon idle again, at some phase of its poll
            t0 = time.perf_counter()
            write_lease(address)
            until(lambda: lease_target(nft) == address, f"lease1 -> {address}", log)
            reactions.append((time.perf_counter() - t0) * 1e3)
        after = status(daemon.pid)
        floor = subprocess.run([sys.executable, "-c", FLOOR, uri], capture_output=True,
                               env=env, check=True, text=True).stdout.split()
        return {"memory": memory, "after": after, "reactions": reactions,
                "floor": {"VmRSS": int(floor[0]), "VmHWM": int(floor[1])},
                "forwards": site.elements("any4_port") + site.elements("fwd4_port")}
    finally:
        daemon.terminate()
        try:
            daemon.wait(timeout=20)
        except subprocess.TimeoutExpired:
            daemon.kill()
            daemon.wait()
        sh("nft", "delete", "table", "inet", "portfwd", check=False)


def inside(base: str) -> int:
    """In the private mount and network namespaces: both daemons, JSON on stdout."""
    for folder in ("/var/lib/libvirt/dnsmasq", "/run/libvirt"):
        os.makedirs(folder, exist_ok=True)
        subprocess.run(["mount", "-t", "tmpfs", "tmpfs", folder], check=True)
    os.makedirs("/run/libvirt/network")
    with open("/run/libvirt/network/default.xml", "w", encoding="utf-8") as f:
        f.write(NETWORK)
    out = {"idle": one_daemon(base, "idle", 0), "10k fwd": one_daemon(base, "loaded", 1000)}
    print(json.dumps(out))
    return 0


# -- outside ------------------------------------------------------------------------

def run(base: str) -> List[Row]:
    os.makedirs(base, mode=0o755, exist_ok=True)
    ns = f"pfdm{os.getpid()}"
    sh("ip", "netns", "add", ns)
    try:
        sh("ip", "link", "set", "lo", "up", ns=ns)
        sh("ip", "link", "add", "br0", "type", "bridge", ns=ns)
        sh("ip", "addr", "add", f"{BRIDGE4}/24", "dev", "br0", ns=ns)
        sh("ip", "link", "set", "br0", "up", ns=ns)
        p = sh("unshare", "-m", "--propagation", "private", sys.executable, os.path.abspath(__file__),
               "--inside", base, ns=ns, check=False,
               env={"PATH": PATH, **{k: v for k, v in os.environ.items() if k.startswith("PFBENCH_")}})
        if p.returncode != 0:
            raise RuntimeError(f"daemon.py --inside exited {p.returncode}: {p.stderr.decode()}")
        got = json.loads(p.stdout)
    finally:
        sh("ip", "netns", "del", ns, check=False)
    return rows(got)


def rows(got: Dict[str, Dict[str, Any]]) -> List[Row]:
    out = []
    for name, run_ in got.items():
        mem, after, floor = run_["memory"], run_["after"], run_["floor"]
        label = "idle (1 domain)" if name == "idle" else "10k fwd (1,001 domains)"
        for field in ("VmRSS", "VmHWM"):
            mb = max(mem[field], after[field]) / 1024
            target = name != "idle" and field == "VmHWM"
            out.append(Row(f"daemon {field}, {label}", mb, "MB", floor[field] / 1024,
                           mb / (floor[field] / 1024),
                           f"<={MEMORY_TARGET_MB:.0f} MB" if target else "-",
                           mb <= MEMORY_TARGET_MB if target else None))
    for name, run_ in got.items():
        reactions = run_["reactions"]
        label = "1 fwd" if name == "idle" else f"{run_['forwards']} fwd"
        out.append(Row(f"daemon lease change -> live, {label} (median of {len(reactions)})",
                       median(reactions), "ms"))
        out.append(Row(f"daemon lease change -> live, {label} (max)", max(reactions), "ms"))
    return out


NOTES = f"""\
daemon memory: the larger of the figures read after the first sync and after the lease
trials; 'vs' is the floor: python + libvirt + nftables + portfwd imported, the same test
driver file opened (its domains live in that process, as in the daemon's). Lease rows:
from the rename of the lease file to the new address in the kernel's map; the daemon
looks at lease files every --interval {INTERVAL:g} s and lets a change settle 0.1 s."""


def main() -> int:
    if len(sys.argv) == 3 and sys.argv[1] == "--inside":
        return inside(sys.argv[2])
    return part_main("daemon.py", run, NOTES)


if __name__ == "__main__":
    sys.exit(main())
