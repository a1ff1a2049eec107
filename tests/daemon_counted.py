"""``portfwd daemon`` in this process, with every call into nftables' bindings and
every reconcile written to a file, so that a test can count them.

Usage (as root, in the lab's host namespace, under ``unshare -m --propagation
private``): ``daemon_counted.py EVENTS CONFIG URI INTERVAL [--limit SECONDS]
[--leases DIR --network XML]``.

EVENTS gets one line per event: ``KIND PID MONOTONIC``, KIND one of
``reconcile-start``, ``reconcile-end``, and for each ``json_cmd``/``cmd`` of
the bindings (in the daemon and in its reconcile children): ``read`` (list
commands only), ``probe`` (the dry-run batch that asks what nftables can
declare), ``rebuild`` (a batch that flushes a map: the table rebuilt), or
``write`` (any other change). ``--limit`` sets the reconcile watchdog (and lets
the lock wait outlast it). ``--leases``/``--network``: tmpfs over
/var/lib/libvirt with DIR bound at its ``dnsmasq`` (libvirt's lease files),
and tmpfs over /etc/libvirt/qemu/networks holding XML as ``pflab.xml``; both
seen by this process alone.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import time
from typing import Any, Dict


def record(path: str, kind: str) -> None:
    line = f"{kind} {os.getpid()} {time.monotonic()}\n".encode()  # the time first
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    try:
        os.write(fd, line)
    finally:
        os.close(fd)


def kind_of(batch: Dict[str, Any]) -> str:
    commands = batch.get("nftables", [])
    verbs = [next(iter(c)) for c in commands]
    if all(v == "list" for v in verbs):
        return "read"
    if any("table" in c.get("add", {}) and c["add"]["table"].get("name") == "portfwd_probe"
           for c in commands):
        return "probe"
    if any("map" in c.get("flush", {}) for c in commands):
        return "rebuild"
    return "write"


def count_nftables(events: str) -> None:
    import nftables

    json_cmd, cmd = nftables.Nftables.json_cmd, nftables.Nftables.cmd

    def counted_json_cmd(self: Any, batch: Dict[str, Any]) -> Any:
        record(events, kind_of(batch))
        return json_cmd(self, batch)

    def counted_cmd(self: Any, text: str) -> Any:
        record(events, "read" if text.lstrip().startswith("list") else "write")
        return cmd(self, text)

    nftables.Nftables.json_cmd = counted_json_cmd
    nftables.Nftables.cmd = counted_cmd


def private_libvirt_files(leases: str, network_xml: str) -> None:
    for target in ("/var/lib/libvirt", "/etc/libvirt/qemu/networks"):
        if not os.path.isdir(target):  # libvirt-daemon-system makes both
            raise SystemExit(f"{target} missing: apt-get install libvirt-daemon-system")
        subprocess.run(["mount", "-t", "tmpfs", "tmpfs", target], check=True)
    os.mkdir("/var/lib/libvirt/dnsmasq")
    subprocess.run(["mount", "--bind", leases, "/var/lib/libvirt/dnsmasq"], check=True)
    shutil.copy(network_xml, "/etc/libvirt/qemu/networks/pflab.xml")


def main() -> int:
    p = argparse.ArgumentParser()
    for name in ("events", "config", "uri"):
        p.add_argument(name)
    p.add_argument("interval", type=float)
    p.add_argument("--limit", type=float)
    p.add_argument("--leases")
    p.add_argument("--network")
    args = p.parse_args()
    if args.leases:
        private_libvirt_files(args.leases, args.network)
    count_nftables(args.events)
    from portfwd import daemon

    if args.limit:
        daemon.RECONCILE_LIMIT = args.limit
        daemon.LOCK_WAIT = args.limit * 30
    reconcile = daemon.Daemon.reconcile

    def counted_reconcile(self: daemon.Daemon) -> None:
        record(args.events, "reconcile-start")
        try:
            reconcile(self)
        finally:
            record(args.events, "reconcile-end")

    daemon.Daemon.reconcile = counted_reconcile  # type: ignore[method-assign]
    return daemon.Daemon(args.config, args.uri, args.interval).run()


if __name__ == "__main__":
    sys.exit(main())
