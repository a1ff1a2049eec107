"""Issue "Safe to leave running on a production host": a broken install, a held lock or
an unusual domain name never fails a guest, never writes to libvirt's stdout."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from typing import Dict, List

import pytest

from pfhost import (HOOK, NETWORK_HOOK, ROOT, LockHolder, PortfwdHost, domain_xml,
                    installed, run_reading_all, web1_config)
from portfwd import hook
from portfwd.rundir import state

QEMU_OPS = [("reconnect", "begin"), ("started", "begin"), ("stopped", "end"),
            ("prepare", "begin"), ("migrate", "begin"), ("restore", "begin")]
NETWORK_XML = b"<hookData><network><name>default</name></network></hookData>\n"


def libvirt_env(tmp: str) -> Dict[str, str]:
    """libvirt's hook environment, pointed at files of this test only."""
    return {"LC_ALL": "C", "HOME": "/root",
            "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
            "PORTFWD_CONFIG": os.path.join(tmp, "forward.toml"),
            "PORTFWD_RUNDIR": os.path.join(tmp, "run")}


def run(argv: List[str], tmp: str, xml: bytes = b"<domain/>\n") -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(argv, input=xml, env=libvirt_env(tmp), capture_output=True, timeout=60)


def feed_all(argv: List[str], tmp: str) -> subprocess.CompletedProcess[bytes]:
    """Run with 2 MB on stdin, failing if the hook exits without reading it (EPIPE)."""
    return run_reading_all(argv, libvirt_env(tmp), "web1")


def one_line(r: subprocess.CompletedProcess[bytes]) -> str:
    """The run succeeded, wrote nothing to stdout and exactly one line to stderr."""
    assert (r.returncode, r.stdout) == (0, b""), r.stderr
    lines = r.stderr.decode().splitlines()
    assert len(lines) == 1, lines
    return lines[0]


def host_ports(pf: PortfwdHost) -> List[int]:
    """The host ports in the IPv4 map for forwards on every address."""
    keys = [k["elem"]["val"] if "elem" in k else k for k, _ in pf.elements().get("any4_ip", [])]
    return sorted(int(k["concat"][1]) for k in keys)


def fake_python(path: str, body: str) -> str:
    """An "interpreter" that reads stdin and then does ``body`` (sh)."""
    with open(path, "w", encoding="utf-8") as f:
        f.write(f"#!/bin/sh\ncat >/dev/null\n{body}\n")
    os.chmod(path, 0o755)
    return path


# -- 1. a broken install never fails a guest ------------------------------------

def venv_without_portfwd(path: str) -> str:
    """The python of a new venv at ``path`` that sees no site-packages but its own: like
    a venv left behind by 3.11 → 3.13, it has no portfwd (even with portfwd's Debian
    package in /usr/lib/python3/dist-packages)."""
    subprocess.run(["/usr/bin/python3", "-m", "venv", "--without-pip", path], check=True)
    python = os.path.join(path, "bin", "python")
    r = subprocess.run([python, "-I", "-c", "import portfwd"], capture_output=True)
    assert r.returncode != 0 and b"No module named 'portfwd'" in r.stderr, r.stderr
    return python


@pytest.fixture(scope="module")
def bare_python(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A Python that cannot import portfwd (else these runs would be real)."""
    return venv_without_portfwd(str(tmp_path_factory.mktemp("bare") / "venv"))


def hook_naming(kind: str, python: str, tmp: str, via_sh: bool) -> List[str]:
    """The hook's command line: through its sh lines (installed naming ``python``), or
    ``python`` run on the repo's hook file."""
    if via_sh:
        return [installed(kind, python, os.path.join(tmp, f"{kind}-hook"))]
    return [python, "-I", os.path.join(ROOT, "hook", kind)]


@pytest.mark.parametrize("via_sh", [False, True], ids=["python-file", "sh-lines"])
@pytest.mark.parametrize("op, sub", QEMU_OPS)
def test_qemu_hook_without_portfwd(bare_python: str, tmp_path: "os.PathLike[str]", op: str,
                                   sub: str, via_sh: bool) -> None:
    """A Python that cannot import portfwd (venv left behind by 3.11 → 3.13): exit 0."""
    tmp = str(tmp_path)
    argv = hook_naming("qemu", bare_python, tmp, via_sh) + ["web1", op, sub, "-"]
    line = one_line(run(argv, tmp, domain_xml("web1")))
    assert line.startswith(f"portfwd: error: guest web1 {op}: {bare_python} cannot import portfwd")
    assert not os.path.exists(os.path.join(tmp, "run"))


@pytest.mark.parametrize("via_sh", [False, True], ids=["python-file", "sh-lines"])
@pytest.mark.parametrize("op", ["port-created", "started", "start", "updated"])
def test_network_hook_without_portfwd(bare_python: str, tmp_path: "os.PathLike[str]", op: str,
                                      via_sh: bool) -> None:
    argv = hook_naming("network", bare_python, str(tmp_path), via_sh) + [
        "default", op, "begin", "-"]
    if via_sh:  # the sh lines hand nothing to Python while no guest has forwards
        r = run(argv, str(tmp_path), NETWORK_XML)
        assert (r.returncode, r.stdout, r.stderr) == (0, b"", b"")
        with_state(str(tmp_path))
    r = run(argv, str(tmp_path), NETWORK_XML)
    if via_sh and op == "start":  # not a call that renews anything
        assert (r.returncode, r.stdout, r.stderr) == (0, b"", b"")
        return
    assert f"network default {op}: {bare_python} cannot import portfwd" in one_line(r)


def with_state(tmp: str) -> None:
    """A guest with forwards, as far as the network hook's sh lines can tell."""
    guests = os.path.join(tmp, "run", "guests")
    os.makedirs(guests, mode=0o700)
    open(os.path.join(guests, "web1.json"), "w").close()


@pytest.mark.parametrize("hook_file", [HOOK, NETWORK_HOOK])
def test_hook_without_portfwd_reads_all_of_stdin(bare_python: str, tmp_path: "os.PathLike[str]",
                                                 hook_file: str) -> None:
    one_line(feed_all([bare_python, "-I", hook_file, "web1", "reconnect", "begin", "-"],
                      str(tmp_path)))


@pytest.mark.skipif(os.geteuid() != 0, reason="portfwd install refuses a Python or package"
                                              " that a user other than root owns")
def test_installed_hook_whose_interpreter_is_gone(tmp_path: "os.PathLike[str]") -> None:
    """`portfwd install` run from a venv whose python symlink later dangles."""
    tmp = str(tmp_path)
    venv_python = venv_without_portfwd(os.path.join(tmp, "venv"))
    root = os.path.join(tmp, "root")
    r = subprocess.run([venv_python, "-m", "portfwd.cli", "install", "--root", root],
                       env=dict(libvirt_env(tmp), PYTHONPATH=os.path.join(ROOT, "src")),
                       capture_output=True, timeout=60)
    assert r.returncode == 0, r.stderr
    qemu = os.path.join(root, "etc/libvirt/hooks/qemu.d/portfwd")
    network = os.path.join(root, "etc/libvirt/hooks/network.d/portfwd")
    for path in (qemu, network):
        with open(path, encoding="utf-8") as f:
            text = f.read()
        assert text.startswith("#!/bin/sh\n") and f"\npy={venv_python}\n" in text
        assert os.stat(path).st_mode & 0o777 == 0o755
    # the interpreter runs but has no portfwd (its site-packages left behind)
    line = one_line(run([qemu, "web1", "reconnect", "begin", "-"], tmp, domain_xml("web1")))
    assert "cannot import portfwd" in line
    # the venv's python symlink dangles: the kernel could not even start the interpreter
    os.unlink(venv_python)
    os.symlink(os.path.join(tmp, "gone", "python3.11"), venv_python)
    for op, sub in QEMU_OPS:
        line = one_line(run([qemu, "web1", op, sub, "-"], tmp, domain_xml("web1")))
        assert line == (f"portfwd: error: guest web1 {op}: {venv_python} not found; forwards"
                        " unchanged (reinstall portfwd, then run portfwd sync)")
    with_state(tmp)
    line = one_line(run([network, "default", "port-created", "begin", "-"], tmp, NETWORK_XML))
    assert line.startswith(f"portfwd: error: network default port-created: {venv_python} not found")
    one_line(feed_all([qemu, "web1", "reconnect", "begin", "-"], tmp))


@pytest.mark.parametrize("status, code_for", [
    (f"exit {hook.STRICT_FAILURE}", {"prepare": 1, "start": 1, "started": 1}),  # strict = true
    ("exit 1", {}),  # what an interpreter that dies at start-up exits with
    ("exit 2", {}),
    ("kill -SEGV $$", {}),
])
def test_installed_hook_fails_only_start_phases_and_only_with_strict_failure(
        tmp_path: "os.PathLike[str]", status: str, code_for: Dict[str, int]) -> None:
    """Whatever the interpreter does (crash, signal, stdout), reconnect and friends exit 0;
    only hook.STRICT_FAILURE fails a start phase, and libvirt then sees 1."""
    tmp = str(tmp_path)
    py = fake_python(os.path.join(tmp, "python"), f"echo 'not XML' ; {status}")
    qemu = installed("qemu", py, os.path.join(tmp, "qemu"))
    for op, sub in QEMU_OPS + [("start", "begin"), ("release", "end")]:
        r = run([qemu, "web1", op, sub, "-"], tmp)
        assert r.returncode == code_for.get(op, 0), (op, r.stderr)
        assert r.stdout == b""  # the interpreter's stdout went to stderr
        assert b"not XML" in r.stderr
        if r.returncode == 0:
            assert f"{py} exited with status ".encode() in r.stderr
    network = installed("network", py, os.path.join(tmp, "network"))
    for op in ("start", "started", "port-created"):
        r = run([network, "default", op, "begin", "-"], tmp, NETWORK_XML)
        assert (r.returncode, r.stdout) == (0, b""), r.stderr


def test_python_dying_at_start_up_with_1_does_not_stop_the_guest(
        tmp_path: "os.PathLike[str]") -> None:
    """A real Python that cannot start (a fatal error in its initialisation: status 1)
    fails no phase of a guest: logged, exit 0, however strict the configuration is."""
    tmp = str(tmp_path)
    with open(os.path.join(tmp, "forward.toml"), "w") as f:
        f.write("[options]\nstrict = true\n")
    py = os.path.join(tmp, "python")
    with open(py, "w", encoding="utf-8") as f:
        f.write('#!/bin/sh\nexec /usr/bin/python3 -X frozen_modules=broken "$@"\n')
    os.chmod(py, 0o755)
    died = subprocess.run([py, "-I", "-c", "pass"], capture_output=True)
    assert died.returncode == 1 and b"Fatal Python error" in died.stderr, died.stderr
    qemu = installed("qemu", py, os.path.join(tmp, "qemu"))
    for op, sub in QEMU_OPS + [("start", "begin"), ("release", "end")]:
        r = run([qemu, "web1", op, sub, "-"], tmp, domain_xml("web1"))
        assert (r.returncode, r.stdout) == (0, b""), (op, r.stderr)
        assert f"guest web1 {op}: {py} exited with status 1 (ignored)".encode() in r.stderr
    assert not os.path.exists(os.path.join(tmp, "run"))


def test_installed_hook_passes_success_and_arguments(tmp_path: "os.PathLike[str]") -> None:
    tmp = str(tmp_path)
    py = fake_python(os.path.join(tmp, "python"), 'printf "%s|" "$@" >&2')
    qemu = installed("qemu", py, os.path.join(tmp, "qemu"))
    r = run([qemu, "a 'b' \"c\"", "started", "begin", "-"], tmp)
    assert (r.returncode, r.stdout) == (0, b"")
    assert r.stderr.decode() == f"-I|{qemu}|a 'b' \"c\"|started|begin|-|"


def test_unexpected_exception_is_one_line_and_zero(monkeypatch: pytest.MonkeyPatch,
                                                   capfd: pytest.CaptureFixture[str],
                                                   tmp_path: "os.PathLike[str]") -> None:
    monkeypatch.setenv(state.ENV_RUN_DIR, os.path.join(str(tmp_path), "run"))
    monkeypatch.setenv(state.ENV_CONFIG, os.path.join(str(tmp_path), "forward.toml"))

    def boom(*args: object, **kwargs: object) -> bool:
        raise RuntimeError("surprise\nsecond line")

    monkeypatch.setattr(state, "has_guest_state", boom)
    monkeypatch.setattr(state, "has_forwards", boom)
    saved = os.dup(1)
    try:
        for kind, args in (("qemu", ["web1", "reconnect", "begin", "-"]),
                           ("qemu", ["web1", "started", "begin", "-"]),
                           ("network", ["default", "port-created", "begin", "-"])):
            assert hook.main(kind, args) == 0
            out, err = capfd.readouterr()
            assert out == ""
            assert err.splitlines() == [
                f"portfwd: error: {'network default' if kind == 'network' else 'guest web1'}"
                f" {args[1]}: internal error RuntimeError: surprise second line"]
        # strict = true may fail a start phase, and only that
        with open(os.path.join(str(tmp_path), "forward.toml"), "w") as f:
            f.write("[options]\nstrict = true\n")
        assert hook.main("qemu", ["web1", "started", "begin", "-"]) == hook.STRICT_FAILURE
        assert hook.main("qemu", ["web1", "reconnect", "begin", "-"]) == 0
        capfd.readouterr()
    finally:
        os.dup2(saved, 1)  # main() points stdout at stderr
        os.close(saved)


# -- 2. hooks never wait forever for the lock -----------------------------------

def test_locked_times_out_naming_the_holder(tmp_path: "os.PathLike[str]") -> None:
    run_dir = os.path.join(str(tmp_path), "run")
    with LockHolder(run_dir) as holder:
        with pytest.raises(state.LockTimeout) as caught:
            with state.locked(run_dir, timeout=0.3):
                pass
        assert caught.value.holder == str(holder.pid)
        assert f"pid {holder.pid}" in str(caught.value)
        holder.release()
        with state.locked(run_dir, timeout=0.3):
            pass


def test_locked_keeps_waiting_while_others_take_turns(tmp_path: "os.PathLike[str]",
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """Parallel reconnects: the bound is per holder, not for the whole queue."""
    run_dir = os.path.join(str(tmp_path), "run")
    holders = iter(["100", "200"])  # the lock changed hands while we waited
    monkeypatch.setattr(state, "lock_holder", lambda fd: next(holders, "200"))
    with LockHolder(run_dir) as holder:
        threading.Timer(3.0, holder.release).start()
        started = time.monotonic()
        with state.locked(run_dir, timeout=2.0):
            waited = time.monotonic() - started
    assert waited > 2.0  # longer than the timeout: the holder changed meanwhile


def test_commands_wait_hooks_give_up() -> None:
    assert state.locked().timeout is None
    assert hook.LOCK_WAIT == 5.0


@pytest.mark.kernel
def test_hooks_give_up_on_a_held_lock_and_work_after(pf: PortfwdHost) -> None:
    pf.write_config(web1_config("8080:80") + '\n[[forward]]\nguest = "web2"\n'
                    'ipv4 = "192.168.150.11"\nports = ["9090:90"]\n')
    assert pf.hook("web1", "started").returncode == 0
    before = pf.table()
    with LockHolder(pf.run_dir) as holder:
        runs = [(HOOK, "guest web2 started", ["web2", "started", "begin"], domain_xml("web2")),
                (HOOK, "guest web1 reconnect", ["web1", "reconnect", "begin"], domain_xml("web1")),
                (HOOK, "guest web1 stopped", ["web1", "stopped", "end"], domain_xml("web1")),
                (NETWORK_HOOK, "network default port-created",
                 ["default", "port-created", "begin"], NETWORK_XML)]
        procs = [(what, xml, subprocess.Popen(
            ["ip", "netns", "exec", pf.lab.host, sys.executable, "-I", path, *args, "-"],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=pf.env))
            for path, what, args, xml in runs]
        for what, xml, p in procs:  # all at once: about LOCK_WAIT in all
            out, err = p.communicate(xml, timeout=120)
            assert (p.returncode, out) == (0, b""), err
            assert err.decode().splitlines() == [
                f"portfwd: warning: {what}: lock held by another portfwd run (pid {holder.pid})"
                f" for {hook.LOCK_WAIT:g} s; the daemon or the next `portfwd sync` will apply it"]
        assert pf.table() == before
    assert pf.hook("web2", "started").returncode == 0
    assert pf.hook("web1", "stopped", "end").returncode == 0
    assert host_ports(pf) == [9090]


# -- 3. any libvirt domain name works -------------------------------------------

LONG = "gäst-" + "ü" * 60 + "1"  # 66 characters, 127 bytes; percent-encoded 371
NAMES = [
    LONG,
    LONG[:-1] + "2",  # same long prefix, another guest
    'q"\'; flush ruleset;',
    " spaced  name ",
    ".",
    "..",
    "A",
    "%41",  # percent-encodes to what "A" is not
    "日本語" * 100,  # 900 bytes
]


def test_file_names_fit_and_stay_apart() -> None:
    assert state.file_name("web1") == "web1"
    assert state.file_name("web.1") == "web%2E1"  # as before: state of running guests is found
    assert state.file_name("") == "%"
    names = NAMES + ["x" * 200, "x" * 201, "x" * 5000, "\udcff", "a/b", "%", "~", "-",
                     "tab\there", "cr\rhere", "nbsp\u00a0", "zwsp\u200b",  # libvirt allows these
                     "\ud800"]
    files = [state.file_name(n) for n in names]
    assert len(set(files)) == len(names)
    for name, f in zip(names, files):
        assert len(f.encode()) <= state.FILE_NAME_MAX and "/" not in f and not f.startswith(".")
        assert f.isascii() and f.isprintable()
    assert state.file_name("x" * 200) == "x" * 200
    long = state.file_name("x" * 201)
    assert long.startswith("x" * 64 + "~") and len(long) == 64 + 1 + 32
    assert state.file_name(LONG).startswith("g%C3%A4st-%C3%BC")
    assert state.file_name(LONG) == state.file_name(LONG)


@pytest.mark.kernel
@pytest.mark.parametrize("pf", ["python", "sh"], indirect=True)
def test_any_domain_name(pf: PortfwdHost) -> None:
    from netlab import GUEST4

    pf.write_config("".join(f'[[forward]]\nguest = {json.dumps(name)}\nipv4 = "{GUEST4}"\n'
                            f'ports = ["{7000 + i}:22"]\n' for i, name in enumerate(NAMES)))
    for name in NAMES:
        r = pf.hook(name, "started")
        assert (r.returncode, r.stdout) == (0, b""), (name, r.stderr)
        assert b"error" not in r.stderr, r.stderr
    assert len(pf.elements()["any4_ip"]) == len(NAMES)
    for entry in os.listdir(os.path.join(pf.run_dir, "guests")):
        assert len(entry.encode()) <= 255
    r = pf.cli("status", "--json")
    assert r.returncode == 0, r.stderr
    rows = {(row["guest"], row["listen"], row["state"]) for row in json.loads(r.stdout)["forwards"]}
    assert rows == {(name, f"*:{7000 + i}", "active") for i, name in enumerate(NAMES)}
    # stopping one long name leaves the other with the same prefix alone
    assert pf.hook(LONG, "stopped", "end").returncode == 0
    assert host_ports(pf) == [7000 + i for i in range(1, len(NAMES))]
    for name in NAMES[1:]:
        r = pf.hook(name, "release", "end", "shutdown")
        assert (r.returncode, r.stdout) == (0, b""), (name, r.stderr)
    assert pf.elements() == {}
    assert os.listdir(os.path.join(pf.run_dir, "guests")) == []

