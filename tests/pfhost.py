"""portfwd running inside a lab's host namespace, the way libvirt and an admin run it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, TypeVar

from netlab import Lab

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HOOK = os.path.join(ROOT, "hook", "qemu")
# DNAT rules per nat chain: 3 kinds (src, fwd, any) x (single ports, ranges) x 2 families
DNAT_RULES = 12
NETWORK_HOOK = os.path.join(ROOT, "hook", "network")


def installed(kind: str, python: str, dst: str) -> str:
    """The hook as `portfwd install` writes it, naming ``python`` as its interpreter."""
    with open(os.path.join(ROOT, "hook", kind), encoding="utf-8") as f:
        text = f.read()
    assert "\npy=/usr/bin/python3\n" in text
    with open(dst, "w", encoding="utf-8") as f:
        f.write(text.replace("\npy=/usr/bin/python3\n", f"\npy={python}\n", 1))
    os.chmod(dst, 0o755)
    return dst


def web1_config(*ports: str) -> str:
    """A forward.toml forwarding ``ports`` to the lab's guest "web1", both families."""
    from netlab import GUEST4, GUEST6

    listed = ", ".join(f'"{p}"' for p in ports)
    return (f'\n[[forward]]\nguest = "web1"\nipv4  = "{GUEST4}"\nipv6  = "{GUEST6}"\n'
            f"ports = [{listed}]\n")


def domain_xml(name: str, uuid: str = "1b4e28ba-2fa1-11d2-883f-0016d3cca427",
               mac: str = "52:54:00:12:34:56", taps: Sequence[str] = ("vnet0",)) -> bytes:
    """A live domain XML as libvirt writes it to the hook's stdin: one NIC per tap
    (the first with ``mac``, the next ones with the last octet counted up)."""
    nics = "".join(f"""
    <interface type='network'>
      <mac address='{mac[:-2]}{int(mac[-2:], 16) + i:02x}'/>
      <source network='default' portid='8a4d6b3e-2c1e-4a5f-9b0e-1f2d3c4b5a69' bridge='virbr0'/>
      <target dev='{tap}'/>
      <model type='virtio'/>
      <alias name='net{i}'/>
    </interface>""" for i, tap in enumerate(taps))
    return f"""<domain type='qemu' id='1'>
  <name>{name}</name>
  <uuid>{uuid}</uuid>
  <memory unit='KiB'>65536</memory>
  <os><type arch='x86_64' machine='pc-i440fx-7.2'>hvm</type></os>
  <devices>{nics}
  </devices>
</domain>
""".encode()


def run_reading_all(argv: List[str], env: Dict[str, str],
                    guest: str) -> subprocess.CompletedProcess[bytes]:
    """Run a hook with 2 MB of domain XML on stdin, failing if it exits without
    reading it all (libvirt writes the whole XML: it would see EPIPE)."""
    import threading

    big = domain_xml(guest) + b"<!--" + b"x" * 2_000_000 + b"-->\n"
    p = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, env=env)
    errors: List[BaseException] = []

    def feed() -> None:
        try:
            assert p.stdin is not None
            p.stdin.write(big)
            p.stdin.close()
        except BaseException as e:  # BrokenPipeError if the hook did not read it all
            errors.append(e)

    t = threading.Thread(target=feed)
    t.start()
    out, err = p.communicate(timeout=60)
    t.join()
    assert errors == [], err
    return subprocess.CompletedProcess(argv, p.returncode, out, err)


class PortfwdHost:
    """Config and run directory of one test, commands run in the lab's host namespace."""

    def __init__(self, lab: Lab, base: str) -> None:
        self.lab = lab
        self.base = base
        self.etc = os.path.join(base, "etc")
        os.makedirs(self.etc, mode=0o755, exist_ok=True)
        self.config = os.path.join(self.etc, "forward.toml")
        self.run_dir = os.path.join(base, "run")
        self.env = {"LC_ALL": "C", "HOME": "/root",
                    "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
                    "PORTFWD_CONFIG": self.config, "PORTFWD_RUNDIR": self.run_dir,
                    # these guests are not libvirt's: never judge them by its status files
                    "PORTFWD_QEMU_STATUS_DIR": os.path.join(base, "no-libvirt")}
        self.via_sh = False  # hook() runs the hook's sh lines (/bin/sh HOOK), else Python

    def write_config(self, text: str) -> None:
        tmp = self.config + ".tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
        os.chmod(tmp, 0o644)
        os.replace(tmp, self.config)
        if self.via_sh:
            self.age_config()

    def age_config(self, seconds: float = 10.0) -> None:
        """The configuration as if written ``seconds`` ago and the hook index gone, as
        after an edit: the next Python run writes an index the sh lines trust at once
        (a configuration edited less than hookindex.MARGIN_NS ago gets one that they
        do not trust yet)."""
        from portfwd import hookindex

        past = time.time_ns() - int(seconds * 1e9)
        for path in (self.config, self.etc):
            os.utime(path, ns=(past, past))
        hookindex.remove(self.run_dir)

    def hook(self, guest: str, op: str, sub: str = "begin", extra: str = "-",
             xml: Optional[bytes] = None, python_flags: List[str] = []) -> subprocess.CompletedProcess[bytes]:
        """Run the hook exactly as libvirt does: argv, XML on stdin, minimal environment;
        with ``via_sh``, through its sh lines (whose exit status 1, what they make of
        hook.STRICT_FAILURE, is reported as STRICT_FAILURE: one code to compare)."""
        if not self.via_sh:
            return self.lab.ns(self.lab.host, sys.executable, "-I", *python_flags, HOOK, guest,
                               op, sub, extra, input=domain_xml(guest) if xml is None else xml,
                               env=self.env, check=False)
        assert not python_flags
        r = self.sh_hook(HOOK, guest, op, sub, extra, xml=domain_xml(guest) if xml is None else xml)
        if r.returncode == 1:
            from portfwd.hook import STRICT_FAILURE

            r.returncode = STRICT_FAILURE
        return r

    def sh_hook(self, path: str, *args: str, xml: bytes) -> subprocess.CompletedProcess[bytes]:
        """The hook file ``path`` run by /bin/sh, as libvirt's hook in /etc runs it."""
        return self.lab.ns(self.lab.host, "/bin/sh", self.hook_file(path), *args, input=xml,
                           env=self.env, check=False)

    def hook_file(self, path: str) -> str:
        """For this checkout's HOOK or NETWORK_HOOK, the same hook naming this interpreter
        (as `portfwd install` writes it), not the system python3, which would import
        whatever portfwd the system has installed; any other path as it is."""
        if path not in (HOOK, NETWORK_HOOK):
            return path
        kind = os.path.basename(path)
        copy = os.path.join(self.base, f"{kind}-hook")
        if not os.path.exists(copy):
            installed(kind, sys.executable, copy)
        return copy

    def network_hook(self, network: str, op: str) -> "Callable[[], subprocess.CompletedProcess[bytes]]":
        """A deferred run of the network hook as libvirt runs it."""
        xml = (f"<hookData><network><name>{network}</name><bridge name='br0'/></network>"
               "</hookData>").encode()
        if self.via_sh:
            return lambda: self.sh_hook(NETWORK_HOOK, network, op, "begin", "-", xml=xml)
        return lambda: self.lab.ns(self.lab.host, sys.executable, "-I", NETWORK_HOOK, network, op,
                                   "begin", "-", input=xml, env=self.env, check=False)

    def cli(self, *args: str) -> subprocess.CompletedProcess[bytes]:
        return self.lab.ns(self.lab.host, sys.executable, "-m", "portfwd.cli", *args,
                           env=self.env, check=False)

    def table(self, name: str = "portfwd") -> Optional[List[Dict[str, Any]]]:
        r = self.lab.ns(self.lab.host, "nft", "-j", "list", "table", "inet", name, check=False)
        if r.returncode != 0:
            return None
        objects = [o for o in json.loads(r.stdout)["nftables"] if "metainfo" not in o]
        for obj in objects:  # handles change when rules are replaced; content is what counts
            for body in obj.values():
                body.pop("handle", None)
        return objects

    def elements(self, name: str = "portfwd") -> Dict[str, List[Any]]:
        """Map name → its elements (maps without elements left out)."""
        out: Dict[str, List[Any]] = {}
        for obj in self.table(name) or []:
            if "map" in obj and obj["map"].get("elem"):
                out[obj["map"]["name"]] = obj["map"]["elem"]
        return out

    def targets(self, name: str = "portfwd") -> Dict[str, List[Tuple[Any, Any]]]:
        """Map name of guest addresses (``KIND F_ip`` of the split variant, ``KIND F_to``
        of the concat one) → [(key, guest address)]: the single ports of either variant."""
        out: Dict[str, List[Tuple[Any, Any]]] = {}
        for map_name, elems in self.elements(name).items():
            if map_name.endswith("_ip") or map_name.endswith("_to"):
                out[map_name] = [(key["elem"]["val"] if "elem" in key else key,
                                  value["concat"][0] if isinstance(value, dict) else value)
                                 for key, value in elems]
        return out

    def rules(self, name: str = "portfwd", chain: str = "prerouting") -> List[Dict[str, Any]]:
        return [o["rule"] for o in self.table(name) or []
                if "rule" in o and o["rule"]["chain"] == chain]


class LockHolder:
    """Another process holding portfwd's lock (``flock`` on RUN_DIR/lock; ``path``:
    another file's) until ``release``."""

    def __init__(self, run_dir: str, path: Optional[str] = None) -> None:
        os.makedirs(run_dir, mode=0o700, exist_ok=True)
        code = ("import fcntl, os, sys\n"
                "fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT, 0o600)\n"
                "fcntl.flock(fd, fcntl.LOCK_EX)\n"
                "print('locked', flush=True)\n"
                "sys.stdin.read()\n")  # holds until stdin closes
        self.proc = subprocess.Popen(
            [sys.executable, "-I", "-c", code, path or os.path.join(run_dir, "lock")],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        assert self.proc.stdout is not None and self.proc.stdout.readline() == "locked\n"
        self.pid = self.proc.pid

    def release(self) -> None:
        if self.proc.poll() is None:
            self.proc.communicate(timeout=30)

    def __enter__(self) -> "LockHolder":
        return self

    def __exit__(self, *exc: object) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        for pipe in (self.proc.stdin, self.proc.stdout):
            if pipe is not None:
                pipe.close()


def driver_uri(path: str, guests: Sequence[str]) -> str:
    """A node file for libvirt's test driver (``test:///PATH``, no libvirtd) in which
    ``guests`` run, without NICs; its URI."""
    with open(path, "w", encoding="utf-8") as f:
        f.write("<node>" + "".join(f"<domain type='test'><name>{g}</name><memory>65536</memory>"
                                   "<os><type>hvm</type></os></domain>" for g in guests)
                + "</node>\n")
    return f"test://{path}"


D = TypeVar("D", bound="RunningDaemon")


class RunningDaemon:
    """``portfwd daemon`` in the lab's host namespace, its output in ``log`` (``argv``:
    another command to run there, default ``python -m portfwd.cli daemon …``)."""

    def __init__(self, pf: PortfwdHost, uri: str, interval: float = 0.2,
                 argv: Optional[List[str]] = None) -> None:
        self.log = os.path.join(os.path.dirname(pf.etc), f"daemon{id(self)}.log")
        with open(self.log, "wb") as out:
            self.proc = subprocess.Popen(
                ["ip", "netns", "exec", pf.lab.host]
                + (argv or [sys.executable, "-m", "portfwd.cli", "daemon", "--connect", uri,
                            "--interval", str(interval)]),
                stdout=out, stderr=out, env=pf.env, start_new_session=True)

    def text(self) -> str:
        with open(self.log, encoding="utf-8", errors="replace") as f:
            return f.read()

    def until(self, ready: Callable[[], object], what: str, seconds: float = 30.0) -> float:
        """Poll ``ready`` until it is true; the seconds that took. Fails with the
        daemon's log after ``seconds``, or when the daemon ended."""
        import time

        start = time.monotonic()
        while not ready():
            assert self.proc.poll() is None, f"the daemon ended:\n{self.text()[-3000:]}"
            assert time.monotonic() - start < seconds, \
                f"{what}: not within {seconds:g} s; daemon log:\n{self.text()[-3000:]}"
            time.sleep(0.05)
        return time.monotonic() - start

    def stop(self) -> str:
        """SIGTERM, wait (SIGKILL after 30 s); the whole log."""
        import signal

        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        return self.text()

    def __enter__(self: D) -> D:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
