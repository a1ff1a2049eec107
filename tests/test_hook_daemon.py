"""A hook call handed to ``portfwd daemon`` (hooksocket): the same result, exit
status and stderr as the hook's own run, and the hook's own run whenever the
daemon is gone, dies mid-call or its socket is not root's alone."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
from typing import Iterator, List, Set

import pytest

from pfhost import (HOOK, NETWORK_HOOK, LockHolder, PortfwdHost, RunningDaemon, domain_xml,
                    driver_uri, web1_config)
from portfwd import hook, hooksocket
from test_hook_safety import host_ports

pytestmark = pytest.mark.kernel

WEB1 = web1_config("8080:80")
BROKEN = ('[options]\nstrict = true\n' + WEB1
          + '[[forward]]\nguest = "web2"\nipv4 = "192.168.150.11"\nports = ["99999"]\n')


def sock(pf: PortfwdHost) -> str:
    return hooksocket.socket_path(pf.run_dir)


@pytest.fixture
def daemon(pf: PortfwdHost, tmp_path: "os.PathLike[str]") -> Iterator[RunningDaemon]:
    """``portfwd daemon`` in the lab, libvirt's test driver saying web1 runs."""
    pf.write_config(WEB1)
    uri = driver_uri(os.path.join(str(tmp_path), "node.xml"), ["web1"])
    with RunningDaemon(pf, uri) as d:
        d.until(lambda: os.path.exists(sock(pf)) and host_ports(pf) == [8080],
                "the daemon listening and synced")
        yield d


def test_the_daemon_answers_starts_and_stops(pf: PortfwdHost, daemon: RunningDaemon) -> None:
    r = pf.hook("web1", "stopped", "end")
    assert (r.returncode, r.stdout) == (0, b""), r.stderr
    assert host_ports(pf) == []
    assert r.stderr.decode().splitlines() == ["portfwd: guest web1 stopped: removed 2 forward(s)"]
    r = pf.hook("web1", "started")
    assert (r.returncode, r.stdout) == (0, b""), r.stderr
    assert host_ports(pf) == [8080]
    log = daemon.text()  # it was the daemon's work: its log says so too
    assert "guest web1 stopped: removed 2 forward(s)" in log
    assert "guest web1 started: 2 forward(s) in table inet portfwd" in log


def test_strict_answers_as_the_hook_itself(pf: PortfwdHost, daemon: RunningDaemon) -> None:
    """The exit status and the stderr lines are those of the hook's own run."""
    pf.write_config(BROKEN)
    through = [pf.hook("web2", op) for op in ("started", "reconnect")]
    assert "guest web2 started: strict = true: failing the start" in daemon.stop()
    assert not os.path.exists(sock(pf))  # gone with the daemon
    itself = [pf.hook("web2", op) for op in ("started", "reconnect")]
    for a, b in zip(through, itself):
        assert (a.returncode, a.stdout, a.stderr) == (b.returncode, b.stdout, b.stderr)
    assert through[0].returncode == hook.STRICT_FAILURE and through[1].returncode == 0
    assert f"{pf.config}:12:10: forward[1].ports[0]" in through[0].stderr.decode()


def _connected(pf: PortfwdHost) -> bool:
    """Whether a hook is connected to the daemon's socket (ss, in the lab)."""
    r = pf.lab.ns(pf.lab.host, "ss", "-xH", "state", "connected", check=False)
    return r.stdout.decode().count(sock(pf)) > 0


def test_a_daemon_killed_mid_call_leaves_the_work_to_the_hook(
        pf: PortfwdHost, daemon: RunningDaemon) -> None:
    assert pf.hook("web1", "stopped", "end").returncode == 0
    with LockHolder(pf.run_dir) as holder:  # the daemon's answer waits for the lock
        p = subprocess.Popen(["ip", "netns", "exec", pf.lab.host, sys.executable, "-I", HOOK,
                              "web1", "started", "begin", "-"], stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=pf.env)
        assert p.stdin is not None
        p.stdin.write(domain_xml("web1"))
        p.stdin.close()
        daemon.until(lambda: _connected(pf), "the hook's call in the daemon")
        os.killpg(daemon.proc.pid, signal.SIGKILL)
        daemon.proc.wait()
        holder.release()
        assert p.stdout is not None and p.stderr is not None
        out, err = p.stdout.read(), p.stderr.read()
        p.wait(60)
        p.stdout.close()
        p.stderr.close()
    assert (p.returncode, out) == (0, b""), err
    assert host_ports(pf) == [8080]


class FakeDaemon:
    """Something listening on hook.sock that answers every call "done, status 0"
    without doing anything."""

    def __init__(self, path: str) -> None:
        self.server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.server.bind(path)
        os.chmod(path, 0o600)
        self.server.listen(8)
        self.calls: List[bytes] = []
        self.thread = threading.Thread(target=self.serve, daemon=True)
        self.thread.start()

    def serve(self) -> None:
        while True:
            try:
                conn, _ = self.server.accept()
            except OSError:
                return
            with conn:
                request = hooksocket.read_request(conn)
                self.calls.append(request or b"")
                conn.sendall(hooksocket.answer(0, ""))

    def close(self) -> None:
        self.server.shutdown(socket.SHUT_RDWR)
        self.server.close()
        self.thread.join(10)


@pytest.mark.parametrize("flaw", ["socket not root's", "socket 0666", "run directory 0755"])
def test_a_socket_not_roots_alone_is_refused(pf: PortfwdHost, flaw: str) -> None:
    pf.write_config(WEB1)
    assert pf.hook("web1", "stopped", "end").returncode == 0  # makes the run directory
    fake = FakeDaemon(sock(pf))
    try:
        r = pf.hook("web1", "started")  # trusted: it "did" it (the test can fail)
        assert (r.returncode, r.stdout, r.stderr) == (0, b"", b"")
        assert len(fake.calls) == 1 and host_ports(pf) == []
        if flaw == "socket not root's":
            os.chown(sock(pf), 65534, 65534)
        elif flaw == "socket 0666":
            os.chmod(sock(pf), 0o666)
        else:
            os.chmod(pf.run_dir, 0o755)
        r = pf.hook("web1", "started")
        assert (r.returncode, r.stdout) == (0, b""), r.stderr
        assert len(fake.calls) == 1  # not even asked
        assert host_ports(pf) == [8080]
    finally:
        fake.close()
        os.chmod(pf.run_dir, 0o700)


def test_any_name_reaches_the_daemon_as_the_hook_has_it(pf: PortfwdHost) -> None:
    pf.write_config(WEB1)
    assert pf.hook("web1", "stopped", "end").returncode == 0  # makes the run directory
    fake = FakeDaemon(sock(pf))
    names = ['q"\'; flush ruleset;', " spaced  name ", "日本語" * 30, "-n", "a\tb"]
    try:
        for name in names:
            assert pf.hook(name, "reconnect").returncode == 0
        calls = [hooksocket.parse(c) for c in fake.calls]
    finally:
        fake.close()
    assert [(c[1], c[2][:2]) if c else None for c in calls] == [
        ("qemu", [name, "reconnect"]) for name in names]
    assert all(c is not None and c[0] == pf.config and c[3] == domain_xml(n)
               for c, n in zip(calls, names))


# what a hook imports of portfwd before it hands a call over (and, answered, at all)
HAND_OVER = {"portfwd", "portfwd.hookcall", "portfwd.hooksocket", "portfwd.runpaths"}


def imported(run: "subprocess.CompletedProcess[bytes]") -> Set[str]:
    """portfwd's modules a run under ``python -X importtime`` imported (its stderr)."""
    names = {line.rpartition("|")[2].strip() for line in run.stderr.decode().splitlines()
             if line.startswith("import time:")}
    return {n for n in names if n == "portfwd" or n.startswith("portfwd.")}


def test_a_call_the_daemon_answers_imports_only_the_hand_over(pf: PortfwdHost) -> None:
    """A call the daemon answers imports only the client's modules (not hook, state,
    the engine); the same call without an answer imports them (the measurement works)."""
    pf.write_config(WEB1)
    assert pf.hook("web1", "stopped", "end").returncode == 0  # makes the run directory
    network_xml = b"<hookData><network><name>default</name></network></hookData>"

    def network() -> "subprocess.CompletedProcess[bytes]":
        return pf.lab.ns(pf.lab.host, sys.executable, "-I", "-X", "importtime", NETWORK_HOOK,
                         "default", "port-created", "begin", "-", input=network_xml, env=pf.env,
                         check=False)

    fake = FakeDaemon(sock(pf))
    try:
        answered = [pf.hook("web1", "started", python_flags=["-X", "importtime"]), network()]
    finally:
        fake.close()
    assert len(fake.calls) == 2 and host_ports(pf) == []
    for r in answered:
        assert (r.returncode, r.stdout) == (0, b""), r.stderr
        assert imported(r) == HAND_OVER
    itself = pf.hook("web1", "started", python_flags=["-X", "importtime"])  # no answer now
    assert (itself.returncode, itself.stdout) == (0, b""), itself.stderr
    assert host_ports(pf) == [8080]
    assert HAND_OVER | {"portfwd.hook", "portfwd.rundir.state"} <= imported(itself)
