"""Who could have written the configuration portfwd acts on as root (issue "Safe to
leave running on a production host"): the real file, every directory on the way to
it, symlinks, ACLs, and files that are not regular files."""

from __future__ import annotations

import os
import struct
import subprocess
import sys
from typing import List, Tuple

import pytest

from portfwd import config
from portfwd.rundir import state
from portfwd.errors import ConfigError

pytestmark = pytest.mark.kernel  # needs root: chown, ACLs for other users

VALID = '[[forward]]\nguest = "a"\nipv4 = "10.0.0.1"\nports = [80]\n'
MOVE = "fix: keep the configuration in a directory only root can write, such as /etc/portfwd"
REGULAR = ("fix: make the configuration a regular file in a directory only root can write, such as"
           " /etc/portfwd/forward.toml (the default path)")


def write(path: str, text: str = VALID, mode: int = 0o644) -> str:
    with open(path, "w") as f:
        f.write(text)
    os.chmod(path, mode)
    return path


def directory(path: str, mode: int, owner: int = 0) -> str:
    os.mkdir(path)
    os.chmod(path, mode)  # past the umask
    os.chown(path, owner, owner)
    return path


def refused(path: str) -> List[str]:
    with pytest.raises(ConfigError) as e:
        config.load(path)
    return e.value.lines


def never_chmod(lines: List[str], *shared: str) -> None:
    """No hint tells the admin to chown/chmod a shared directory or a device."""
    for line in lines:
        fix = line.split("fix:", 1)[-1]
        for path in shared:
            assert f"chmod go-w {path}" not in fix and f"chown root:root {path}" not in fix, line


# -- symlinks and the directories on the way ---------------------------------

def test_symlink_into_a_world_writable_directory_is_refused(etc: str, tmp_path: str) -> None:
    shared = directory(os.path.join(str(tmp_path), "shared"), 0o777)
    real = write(os.path.join(shared, "forward.toml"))
    link = os.path.join(etc, "forward.toml")
    os.symlink(real, link)
    lines = refused(link)
    assert lines == [
        f"{shared}:1:1: refused: this directory is writable by group gid 0 and everyone"
        f" (mode 0777), who could replace {real} and so forward ports as root; {MOVE}"
        " (the default path is /etc/portfwd/forward.toml)"]
    never_chmod(lines, shared)


def test_file_directly_in_a_sticky_shared_directory_is_refused(etc: str, tmp_path: str) -> None:
    tmp = directory(os.path.join(str(tmp_path), "tmp"), 0o1777)
    real = write(os.path.join(tmp, "forward.toml"))
    link = os.path.join(etc, "forward.toml")
    os.symlink(real, link)
    for path in (link, real):
        lines = refused(path)
        assert len(lines) == 1
        assert lines[0].startswith(f"{tmp}:1:1: refused: this directory is writable by group gid 0"
                                   " and everyone (mode 1777, shared) and holds the configuration"
                                   " file itself")
        assert MOVE in lines[0]
        never_chmod(lines, tmp)


def test_sticky_shared_directory_on_the_way_needs_root_owned_entries(
        etc: str, tmp_path: str) -> None:
    tmp = directory(os.path.join(str(tmp_path), "tmp"), 0o1777)
    write(os.path.join(etc, "forward.toml"))
    link = os.path.join(tmp, "portfwd.config.toml")
    os.symlink(os.path.join(etc, "forward.toml"), link)
    assert config.load(link).forwards[0].guest == "a"  # the sticky bit guards root's link
    os.lchown(link, 1000, 1000)  # ... but not a user's
    lines = refused(link)
    assert lines == [
        f"{link}:1:1: refused: this symbolic link belongs to uid 1000 and lies in {tmp}, which"
        " group gid 0 and everyone may write (mode 1777), so uid 1000 could replace it;"
        f" {MOVE} (the default path is /etc/portfwd/forward.toml)"]
    # a root-owned directory inside the sticky one is as good as the link
    os.unlink(link)
    inner = directory(os.path.join(tmp, "portfwd"), 0o755)
    write(os.path.join(inner, "forward.toml"))
    assert config.load(os.path.join(inner, "forward.toml")).forwards
    os.chown(inner, 1000, 1000)
    lines = refused(os.path.join(inner, "forward.toml"))
    assert len(lines) == 1  # one message per directory
    assert lines[0].startswith(f"{inner}:1:1: refused: this directory belongs to uid 1000")
    os.chown(inner, 0, 0)
    os.chmod(inner, 0o775)  # portfwd's own directory: the hint may say chmod
    lines = refused(os.path.join(inner, "forward.toml"))
    assert lines == [f"{inner}:1:1: refused: this directory is writable by group gid 0"
                     f" (mode 0775), who could replace {inner}/forward.toml and so forward ports"
                     f" as root; fix: chown root:root {inner} && chmod go-w {inner}"]


@pytest.mark.parametrize("mode, owner, who", [
    (0o777, 0, "group gid 0 and everyone (mode 0777)"),
    (0o775, 0, "group gid 0 (mode 0775)"),
    (0o755, 1000, "its owner, uid 1000 (mode 0755)"),
])
def test_every_ancestor_counts_not_only_the_parent(etc: str, mode: int, owner: int,
                                                   who: str) -> None:
    sub = directory(os.path.join(etc, "portfwd"), 0o755)
    real = write(os.path.join(sub, "forward.toml"))
    assert config.load(real).forwards
    os.chmod(etc, mode)
    os.chown(etc, owner, 0)
    lines = refused(real)
    assert lines == [f"{etc}:1:1: refused: this directory is writable by {who}, who could replace"
                     f" {sub} and so forward ports as root; {MOVE}"
                     " (the default path is /etc/portfwd/forward.toml)"]


def test_directories_holding_the_symlinks_count(etc: str, tmp_path: str) -> None:
    real = write(os.path.join(etc, "forward.toml"))
    links = directory(os.path.join(str(tmp_path), "links"), 0o755)
    os.symlink(real, os.path.join(links, "a"))
    os.symlink("a", os.path.join(links, "b"))  # relative, a chain of two
    assert config.load(os.path.join(links, "b")).forwards
    os.chmod(links, 0o757)
    lines = refused(os.path.join(links, "b"))
    assert [line.split(", who")[0] for line in lines] == [
        f"{links}:1:1: refused: this directory is writable by everyone (mode 0757)"]


def test_relative_paths_loops_and_dangling_links(etc: str, monkeypatch: pytest.MonkeyPatch) -> None:
    write(os.path.join(etc, "forward.toml"))
    monkeypatch.chdir(etc)
    assert config.load("forward.toml").forwards
    assert config.load("../etc/./forward.toml").forwards
    os.symlink("loop2", os.path.join(etc, "loop1"))
    os.symlink("loop1", os.path.join(etc, "loop2"))
    assert refused("loop1") == ["loop1: cannot open loop1: Too many levels of symbolic links"]
    os.symlink("missing.toml", os.path.join(etc, "dangling"))
    assert refused("dangling")[0].startswith("dangling: no such file; create it")
    assert refused("forward.toml/x")[0].endswith("Not a directory")


# -- what the file is ---------------------------------------------------------

def check(path: str) -> "subprocess.CompletedProcess[str]":
    env = dict(os.environ)
    env.pop(state.ENV_CONFIG, None)
    return subprocess.run([sys.executable, "-m", "portfwd.cli", "check", "--config", path],
                          env=env, capture_output=True, text=True, timeout=30)


def test_fifo_is_refused_without_hanging(etc: str) -> None:
    fifo = os.path.join(etc, "forward.toml")
    os.mkfifo(fifo, 0o644)
    r = check(fifo)  # the code before this test blocked in open() forever
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert r.stderr == f"{fifo}:1:1: refused: this is a FIFO, not a regular file; {REGULAR}\n"


@pytest.mark.parametrize("path, kind", [("/dev/null", "character device"), ("/", "directory")])
def test_devices_and_directories_get_no_chmod_hint(path: str, kind: str) -> None:
    r = check(path)
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert r.stderr == f"{path}:1:1: refused: this is a {kind}, not a regular file; {REGULAR}\n"
    never_chmod(r.stderr.splitlines(), path)


def test_symlink_to_a_device_is_refused(etc: str) -> None:
    link = os.path.join(etc, "forward.toml")
    os.symlink("/dev/zero", link)
    r = check(link)
    assert r.returncode == 1
    assert r.stderr.startswith(f"/dev/zero:1:1: refused: this is a character device (reached"
                               f" through {link}), not a regular file")


# -- POSIX ACLs ---------------------------------------------------------------

ACL_USER_OBJ, ACL_USER, ACL_GROUP_OBJ, ACL_GROUP, ACL_MASK, ACL_OTHER = 1, 2, 4, 8, 0x10, 0x20


def set_acl(path: str, entries: List[Tuple[int, int, int]]) -> None:
    """Write an access ACL as the kernel stores it (no tool needed)."""
    raw = struct.pack("<I", 2) + b"".join(struct.pack("<HHI", tag, perm, ident)
                                          for tag, perm, ident in sorted(entries))
    os.setxattr(path, "system.posix_acl_access", raw)


def base(owner: int = 6, group: int = 4, other: int = 4) -> List[Tuple[int, int, int]]:
    return [(ACL_USER_OBJ, owner, 0xFFFFFFFF), (ACL_GROUP_OBJ, group, 0xFFFFFFFF),
            (ACL_OTHER, other, 0xFFFFFFFF)]


def test_acl_granting_a_user_write_is_refused_setfacl(etc: str) -> None:
    real = write(os.path.join(etc, "forward.toml"))
    subprocess.run(["setfacl", "-m", "u:1000:rw", real], check=True)
    lines = refused(real)  # the mode says rw-rw-r-- with group root: allowed before
    assert lines == [f"{real}:1:1: refused: this file is writable by user uid 1000 (ACL)"
                     f" (mode 0664), who could then forward ports as root;"
                     f" fix: chown root:root {real} && chmod go-w {real} && setfacl -b {real}"]
    subprocess.run(["setfacl", "-b", real], check=True)
    assert config.load(real).forwards


@pytest.mark.parametrize("extra, who", [
    ([(ACL_USER, 6, 1000), (ACL_MASK, 6, 0xFFFFFFFF)], "user uid 1000 (ACL)"),
    ([(ACL_GROUP, 7, 0), (ACL_MASK, 7, 0xFFFFFFFF)], "group gid 0 (ACL)"),
    ([(ACL_USER, 2, 0), (ACL_GROUP, 2, 50), (ACL_MASK, 2, 0xFFFFFFFF)], "group gid 50 (ACL)"),
])
def test_acl_entries_that_grant_write_are_refused(etc: str, extra: List[Tuple[int, int, int]],
                                                  who: str) -> None:
    real = write(os.path.join(etc, "forward.toml"))
    set_acl(real, base() + extra)
    lines = refused(real)
    assert len(lines) == 1 and f"this file is writable by {who} (mode" in lines[0], lines
    assert lines[0].endswith(f"&& setfacl -b {real}")


def test_acl_write_the_mask_takes_away_is_no_write(etc: str) -> None:
    real = write(os.path.join(etc, "forward.toml"))
    set_acl(real, base() + [(ACL_USER, 6, 1000), (ACL_GROUP, 6, 50), (ACL_USER, 7, 0),
                            (ACL_MASK, 4, 0xFFFFFFFF)])
    assert config.load(real).forwards


def test_acl_on_an_ancestor_directory_is_refused(etc: str) -> None:
    sub = directory(os.path.join(etc, "sub"), 0o755)
    real = write(os.path.join(sub, "forward.toml"))
    set_acl(etc, base(7, 5, 5) + [(ACL_USER, 7, 1000), (ACL_MASK, 7, 0xFFFFFFFF)])
    lines = refused(real)
    assert lines == [f"{etc}:1:1: refused: this directory is writable by user uid 1000 (ACL)"
                     f" (mode 0775), who could replace {sub} and so forward ports as root; {MOVE}"
                     " (the default path is /etc/portfwd/forward.toml)"]


# -- strict, as the hook reads it from a file that fails validation ----------

def test_strict_setting_never_blocks_and_trusts_only_a_trusted_file(etc: str) -> None:
    path = os.path.join(etc, "forward.toml")
    assert config.strict_setting(path) is None  # missing
    write(path, "[options]\nstrict = true\n[[forward]]\nguest = 1\n")
    assert config.strict_setting(path) is True  # invalid, but says strict
    os.chmod(path, 0o666)
    assert config.strict_setting(path) is None  # anyone could have written it
    write(path, "[options]\nstrict = true\nx = " + "[" * 100000)
    assert config.strict_setting(path) is None
    os.unlink(path)
    os.mkfifo(path, 0o644)
    r = subprocess.run([sys.executable, "-c", "import sys; from portfwd import config;"
                        " print(config.strict_setting(sys.argv[1]))", path],
                       capture_output=True, text=True, timeout=30)
    assert r.stdout == "None\n", r.stderr
