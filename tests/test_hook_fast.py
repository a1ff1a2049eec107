"""The qemu hook's sh lines answer without Python only what needs no work: never a
guest the configuration names, even right after an edit, nor from an index that is
missing, damaged, another configuration's or not root's (``hookindex``)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from typing import Callable, Dict, List

import pytest

from pfhost import HOOK, PortfwdHost, domain_xml, installed, run_reading_all
from portfwd import hookindex
from test_hook_safety import fake_python, host_ports

pytestmark = pytest.mark.kernel

ROUNDS = 8  # edits per kind of edit


def guests_toml(count: int, extra: str = "") -> str:
    """Guests g0 … g(count-1), each forwarding host port 7000+i."""
    return "".join(f'[[forward]]\nguest = "g{i}"\nipv4 = "192.168.150.{20 + i}"\n'
                   f'ports = ["{7000 + i}:22"]\n' for i in range(count)) + extra


def sh_run(pf: PortfwdHost, guest: str, op: str = "started", sub: str = "begin"
           ) -> subprocess.CompletedProcess[bytes]:
    return pf.sh_hook(HOOK, guest, op, sub, "-", xml=domain_xml(guest))


def settle(pf: PortfwdHost) -> None:
    """The configuration as if edited long ago, compiled since by a hook's Python run:
    the index is current, the sh lines trust it."""
    pf.age_config()
    r = pf.hook("nobody", "started")
    assert (r.returncode, r.stdout, r.stderr) == (0, b"", b"")
    assert hookindex.trusted(pf.run_dir, pf.config)


def edit(pf: PortfwdHost, how: str, text: str) -> None:
    """Change the configuration as people do."""
    if how == "rename":  # an editor's save, configuration management
        pf.write_config(text)
    elif how == "in-place":  # same inode: only the file's mtime tells
        with open(pf.config, "w", encoding="utf-8") as f:
            f.write(text)
    elif how == "older-file":  # `mv` of a file prepared earlier: only the folder's mtime tells
        tmp = pf.config + ".prepared"
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
        os.chmod(tmp, 0o644)
        past = time.time_ns() - 60 * 10**9
        os.utime(tmp, ns=(past, past))
        os.replace(tmp, pf.config)
    else:
        raise AssertionError(how)


@pytest.mark.parametrize("how", ["rename", "in-place", "older-file"])
def test_a_guest_added_by_an_edit_gets_its_forward_at_once(pf: PortfwdHost, how: str) -> None:
    """Each round: an index the sh lines trust (checked), an edit adding guest gK,
    gK started at once through the sh lines: its forward is there, every time."""
    pf.write_config(guests_toml(1))
    for k in range(1, ROUNDS + 1):
        settle(pf)
        skipped = sh_run(pf, f"g{k}")  # the index says: nothing for gK
        assert (skipped.returncode, skipped.stdout, skipped.stderr) == (0, b"", b"")
        assert 7000 + k not in host_ports(pf)
        edit(pf, how, guests_toml(k + 1))
        r = sh_run(pf, f"g{k}")
        assert (r.returncode, r.stdout) == (0, b""), r.stderr
        assert 7000 + k in host_ports(pf), (how, k, r.stderr)


def test_an_edit_that_keeps_the_mtime_is_not_seen(pf: PortfwdHost) -> None:
    """The limit, shown so that the damage tests below can fail: an in-place write
    that puts the old mtime back (``cp -p``) leaves a current-looking index."""
    pf.write_config(guests_toml(1))
    settle(pf)
    unseen_edit(pf, guests_toml(2))
    assert sh_run(pf, "g1").returncode == 0
    assert host_ports(pf) == []


def unseen_edit(pf: PortfwdHost, text: str) -> None:
    """Rewrite the configuration in place and put its old mtime back."""
    st = os.stat(pf.config)
    with open(pf.config, "w", encoding="utf-8") as f:
        f.write(text)
    os.utime(pf.config, ns=(st.st_atime_ns, st.st_mtime_ns))


def _chown_nobody(path: str) -> None:
    os.chown(path, 65534, 65534, follow_symlinks=False)


def _replace(path: str, make: Callable[[str], None]) -> None:
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path)
    else:
        os.unlink(path)
    make(path)


DAMAGE: Dict[str, Callable[[str, str], None]] = {
    "no index": lambda i, c: os.unlink(i),
    "no format mark": lambda i, c: os.unlink(os.path.join(i, "v1")),
    "no stamp": lambda i, c: os.unlink(os.path.join(i, "stamp")),
    "no names folder": lambda i, c: shutil.rmtree(os.path.join(i, "n")),
    "names another file": lambda i, c: _replace(os.path.join(i, "config"),
                                                lambda p: os.symlink("/etc/hostname", p)),
    "index is a file": lambda i, c: _replace(i, lambda p: open(p, "w").close()),
    "stamp not newer": lambda i, c: os.utime(os.path.join(i, "stamp"),
                                             ns=(0, os.stat(c).st_mtime_ns)),
    "format mark not root's": lambda i, c: _chown_nobody(os.path.join(i, "v1")),
    "run directory not root's": lambda i, c: _chown_nobody(os.path.dirname(i)),
}


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_a_damaged_or_foreign_index_asks_python(pf: PortfwdHost, damage: str) -> None:
    pf.write_config(guests_toml(1))
    settle(pf)
    unseen_edit(pf, guests_toml(2))  # what the index cannot tell: Python can (ctime)
    DAMAGE[damage](os.path.join(pf.run_dir, hookindex.INDEX), pf.config)
    r = sh_run(pf, "g1")
    assert (r.returncode, r.stdout) == (0, b""), r.stderr
    assert host_ports(pf) == [7001]


def test_an_index_of_another_configuration_is_ignored(pf: PortfwdHost) -> None:
    pf.write_config(guests_toml(1))
    settle(pf)
    other = os.path.join(pf.etc, "other.toml")
    with open(other, "w", encoding="utf-8") as f:
        f.write(guests_toml(2))
    os.chmod(other, 0o644)
    past = time.time_ns() - 60 * 10**9
    for path in (other, pf.etc):  # older than the index: only its path differs
        os.utime(path, ns=(past, past))
    r = pf.lab.ns(pf.lab.host, "/bin/sh", pf.hook_file(HOOK), "g1", "started", "begin", "-",
                  input=domain_xml("g1"), env=dict(pf.env, PORTFWD_CONFIG=other), check=False)
    assert (r.returncode, r.stdout) == (0, b""), r.stderr
    assert host_ports(pf) == [7001]


def test_no_index_in_a_run_directory_others_may_write(pf: PortfwdHost) -> None:
    pf.write_config(guests_toml(1))
    settle(pf)
    os.chmod(pf.run_dir, 0o775)
    pf.age_config()
    assert pf.hook("nobody", "started").returncode == 0  # compiles again
    assert not os.path.lexists(os.path.join(pf.run_dir, hookindex.INDEX))
    os.chmod(pf.run_dir, 0o700)


def test_the_sh_lines_read_all_of_stdin(pf: PortfwdHost) -> None:
    pf.write_config(guests_toml(1))
    settle(pf)
    r = run_reading_all(["ip", "netns", "exec", pf.lab.host, "/bin/sh", pf.hook_file(HOOK),
                         "other", "started", "begin", "-"], pf.env, "other")
    assert (r.returncode, r.stdout, r.stderr) == (0, b"", b"")


def forward_toml(guest: str, port: int) -> str:
    return (f"[[forward]]\nguest = {json.dumps(guest)}\nipv4 = \"192.168.150.40\"\n"
            f"ports = [\"{port}:22\"]\n")


def test_which_calls_reach_python(pf: PortfwdHost, tmp_path: "os.PathLike[str]") -> None:
    """The hook installed with an "interpreter" that only notes each call: with a
    current index, only calls that may need work reach it."""
    tmp = str(tmp_path)
    by_uuid = "6f1c1e36-4a61-4d2a-9d5f-3b8c6d1e2f70"
    leaving = "old.guest"  # has state, then leaves the configuration
    pf.write_config(guests_toml(2, forward_toml(leaving, 7100)))
    for name in ("g0", leaving):
        assert pf.hook(name, "started").returncode == 0
    pf.write_config(guests_toml(2, forward_toml("web.one", 7101)))
    settle(pf)
    marker = os.path.join(tmp, "calls")
    py = fake_python(os.path.join(tmp, "python"), f'printf "%s\\n" "$4" >> {marker}')
    hook = installed("qemu", py, os.path.join(tmp, "qemu"))

    def reaches_python(guest: str, op: str, sub: str = "begin") -> bool:
        before = _lines(marker)
        r = pf.sh_hook(hook, guest, op, sub, "-", xml=domain_xml(guest))
        assert (r.returncode, r.stdout, r.stderr) == (0, b"", b""), (guest, op, r.stderr)
        return len(_lines(marker)) > len(before)

    # nothing to do: no Python
    for guest in ("nobody", "g9", "no.body", "*", "-n", ' "; x', " spaced  name ", "日本",
                  "é" * 31):
        for op, sub in (("started", "begin"), ("reconnect", "begin"), ("stopped", "end"),
                        ("release", "end"), ("prepare", "begin")):
            assert not reaches_python(guest, op, sub), (guest, op)
    for op, sub in (("prepare", "begin"), ("start", "begin"), ("shutdown", "end"),
                    ("stopped", "begin"), ("started", "end"), ("stopped", "end")):
        assert not reaches_python("g1", op, sub), op  # g1 has no state: stopped needs nothing
    # work, or doubt: Python
    for guest, op, sub in (("g0", "started", "begin"), ("g1", "reconnect", "begin"),
                           ("g0", "stopped", "end"), ("web.one", "started", "begin"),
                           (leaving, "stopped", "end"), (leaving, "release", "end"),
                           ("x" * 300, "started", "begin"), ("é" * 32, "started", "begin"),
                           (".", "started", "begin"),
                           ("", "started", "begin"), ("a/b", "started", "begin")):
        assert reaches_python(guest, op, sub), (guest, op)
    # a forward by UUID: any guest may be managed; starts reach Python
    pf.write_config(guests_toml(2) + f'[[forward]]\nuuid = "{by_uuid}"\nipv4 = "192.168.150.60"'
                    '\nports = ["7200:22"]\n')
    settle(pf)
    assert reaches_python("nobody", "started")
    assert reaches_python("no.body", "stopped", "end")
    assert not reaches_python("nobody", "stopped", "end")
    assert not reaches_python("nobody", "prepare")


def _lines(path: str) -> List[str]:
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            return f.read().splitlines()
    except FileNotFoundError:
        return []


def test_a_replaced_index_stays_a_while(pf: PortfwdHost) -> None:
    """A hook may still be looking a name up in the folder just replaced: it goes only
    hookindex.RETIRED_NS after it was replaced."""
    pf.write_config(guests_toml(1))
    settle(pf)
    first = os.path.realpath(os.path.join(pf.run_dir, hookindex.INDEX))
    settle(pf)
    second = os.path.realpath(os.path.join(pf.run_dir, hookindex.INDEX))
    assert first != second and os.path.exists(os.path.join(first, "n", "g0"))
    past = time.time_ns() - hookindex.RETIRED_NS - 10**9
    os.utime(os.path.join(first, "replaced"), ns=(past, past))
    settle(pf)
    assert not os.path.exists(first) and os.path.exists(second)
