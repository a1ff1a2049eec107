"""Who could change what portfwd reads: forward.toml is read only if root alone
could have written it (the file, every directory its path passes, their POSIX
ACLs); the same rule judges the code the hooks run (``codetrust``)."""

from __future__ import annotations

import os
import stat
import struct
from typing import List, Optional, Tuple

from portfwd.commands import installpaths
from portfwd.errors import ConfigError
from portfwd.host.pathwalk import walk

ACL_ACCESS = "system.posix_acl_access"
ACL_USER, ACL_GROUP_OBJ, ACL_GROUP, ACL_MASK = 0x02, 0x04, 0x08, 0x10
ACL_UNREADABLE = 0  # stands for an ACL portfwd cannot parse
ACL_WRITE = 0x02
MOVE_HINT = ("fix: keep the configuration in a directory only root can write, such as"
             " /etc/portfwd (the default path is /etc/portfwd/forward.toml)")
REGULAR_HINT = ("fix: make the configuration a regular file in a directory only root can write,"
                " such as /etc/portfwd/forward.toml (the default path)")
_KINDS = ((stat.S_ISDIR, "directory"), (stat.S_ISFIFO, "FIFO"), (stat.S_ISCHR, "character device"),
          (stat.S_ISBLK, "block device"), (stat.S_ISSOCK, "socket"),
          (stat.S_ISLNK, "symbolic link"))


def read(path: str) -> str:
    """The text of the configuration at ``path``, read only if root alone could have
    written it; ConfigError otherwise.

    The rule: ``path`` is resolved one component at a time (as the kernel does,
    following every symlink), and every directory in which a name is looked up
    (each ancestor of the real file and each directory holding a symlink of the
    chain) must be owned by root and writable by root alone (mode bits and POSIX
    ACL). One exception: a root-owned directory with the sticky bit (such as /tmp)
    may be writable by others when the entry portfwd passes through in it is owned
    by root (which the sticky bit protects) and is not the file itself. The file
    must be a regular file owned by root, writable by root alone, whatever its
    group. It is opened without following symlinks and without blocking, judged
    by ``fstat`` of that descriptor, and read from that same descriptor.
    """
    fd, problems = _open_trusted(path)
    if fd is None:
        raise ConfigError(problems)
    try:
        if problems:
            raise ConfigError(problems)
        chunks = []
        while True:
            chunk = os.read(fd, 1 << 16)
            if not chunk:
                break
            chunks.append(chunk)
    except OSError as e:
        raise ConfigError([f"{path}: cannot read: {e.strerror}"]) from None
    finally:
        os.close(fd)
    data = b"".join(chunks)
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data[:e.start].count(b"\n") + 1
        col = e.start - (data.rfind(b"\n", 0, e.start) + 1) + 1
        raise ConfigError([f"{path}:{line}:{col}: not UTF-8 text"]) from None


def example_config() -> str:
    """Where a missing configuration's error sends the admin: the commented example the
    Debian package ships, else the one beside portfwd's code, else the manual page."""
    here = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "data",
                        "forward.toml")  # portfwd/data/
    for example in (installpaths.DEB_EXAMPLE, here):
        if os.path.isfile(example):
            return example
    return "forward.toml(5)"


def _open_trusted(path: str) -> Tuple[Optional[int], List[str]]:
    """A descriptor of the real file (None if it could not be opened) and every
    reason not to trust it."""
    try:
        real, lookups = walk(path)
        final = os.lstat(real)
    except FileNotFoundError:
        return None, [f"{path}: no such file; create it (see {example_config()})"
                      " or point --config / $PORTFWD_CONFIG at it"]
    except OSError as e:
        return None, [f"{e.filename or path}: cannot open {path}: {e.strerror}"]
    via = f" (reached through {path})" if os.path.abspath(path) != real else ""
    problems: List[str] = []
    for i, (directory, name, entry) in enumerate(lookups):
        is_parent = i == len(lookups) - 1 and not stat.S_ISLNK(entry.st_mode)
        if not any(p.startswith(f"{directory}:1:1:") for p in problems):  # once per directory
            problems += _judge_directory(directory, os.path.join(directory, name), entry, is_parent)
    if not stat.S_ISREG(final.st_mode):
        return None, list(dict.fromkeys(problems)) + [_not_regular(real, final, via)]
    try:
        fd = os.open(real, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC)
    except OSError as e:
        return None, list(dict.fromkeys(problems)) + [
            f"{real}: cannot open{via}: {e.strerror}; it changed while portfwd looked at it?"]
    st = os.fstat(fd)
    if (st.st_dev, st.st_ino) != (final.st_dev, final.st_ino):
        problems.append(f"{real}:1:1: refused: the file was replaced while portfwd checked it{via};"
                        " run the command again")
    elif not stat.S_ISREG(st.st_mode):
        problems.append(_not_regular(real, st, via))
    else:
        writers, acl = writers_of(st, access_acl(fd))
        if writers:
            fix = f"chown root:root {real} && chmod go-w {real}" + (
                f" && setfacl -b {real}" if acl else "")
            mode = stat.S_IMODE(st.st_mode)
            problems.append(
                f"{real}:1:1: refused: this file is writable by {' and '.join(writers)}"
                f" (mode {mode:04o}){via}, who could then forward ports as root; fix: {fix}")
    return fd, list(dict.fromkeys(problems))


def _judge_directory(directory: str, entry_path: str, entry: os.stat_result,
                     is_parent: bool) -> List[str]:
    """Why a lookup of ``entry_path`` in ``directory`` cannot be trusted (see ``read``)."""
    st = os.lstat(directory)
    writers, acl = writers_of(st, access_acl(directory))
    if not writers:
        return []
    mode = stat.S_IMODE(st.st_mode)
    shared = bool(mode & stat.S_ISVTX) and st.st_uid == 0
    if shared and not is_parent:
        if entry.st_uid == 0:
            return []
        return [f"{entry_path}:1:1: refused: this {_kind(entry)} belongs to uid {entry.st_uid} and"
                f" lies in {directory}, which {' and '.join(writers)} may write (mode {mode:04o}),"
                f" so uid {entry.st_uid} could replace it; {MOVE_HINT}"]
    if shared:
        return [f"{directory}:1:1: refused: this directory is writable by {' and '.join(writers)}"
                f" (mode {mode:04o}, shared) and holds the configuration file itself, which"
                f" cleaners may delete and anyone may then recreate; {MOVE_HINT}"]
    if "portfwd" in os.path.basename(directory) and not mode & stat.S_ISVTX:
        fix = f"fix: chown root:root {directory} && chmod go-w {directory}" + (
            f" && setfacl -b {directory}" if acl else "")
    elif directory in ("/", "/etc"):
        fix = f"fix: {directory} must be writable by root alone (Debian installs it root:root 0755)"
    else:
        fix = MOVE_HINT
    return [f"{directory}:1:1: refused: this directory is writable by {' and '.join(writers)}"
            f" (mode {mode:04o}), who could replace {entry_path} and so forward ports as root;"
            f" {fix}"]


AclEntry = Tuple[int, int, int]  # tag, perm, id


def writers_of(st: os.stat_result, acl: Optional[List[AclEntry]]) -> Tuple[List[str], bool]:
    """Who besides root may write a file or directory, and whether an ACL grants it.

    ``acl``: the (tag, perm, id) entries of its access ACL, or None (mode bits only);
    a named user or group, and the owning group, get write through the ACL only
    when the mask grants it too.
    """
    out = []
    if st.st_uid != 0:
        out.append(f"its owner, uid {st.st_uid}")
    by_acl = False
    if acl is None:
        if st.st_mode & stat.S_IWGRP:
            out.append(f"group gid {st.st_gid}")
    else:
        masks = [perm for tag, perm, _ in acl if tag == ACL_MASK]
        mask = masks[0] if masks else 0x07
        for tag, perm, ident in acl:
            if not perm & mask & ACL_WRITE:
                continue
            if tag == ACL_GROUP_OBJ:
                out.append(f"group gid {st.st_gid}")
            elif tag == ACL_USER and ident != 0:
                out.append(f"user uid {ident} (ACL)")
                by_acl = True
            elif tag == ACL_GROUP:
                out.append(f"group gid {ident} (ACL)")
                by_acl = True
            elif tag == ACL_UNREADABLE:
                out.append("whoever its unreadable ACL names")
                by_acl = True
    if st.st_mode & stat.S_IWOTH:
        out.append("everyone")
    return out, by_acl


def access_acl(target: "int | str") -> Optional[List[AclEntry]]:
    """The entries (tag, perm, id) of the POSIX access ACL of a descriptor or real
    path; None without one. An ACL portfwd cannot parse counts as granting write."""
    try:
        if isinstance(target, int):
            raw = os.getxattr(target, ACL_ACCESS)
        else:
            raw = os.getxattr(target, ACL_ACCESS, follow_symlinks=False)
    except OSError:  # ENODATA: no ACL; ENOTSUP: none possible
        return None
    if len(raw) < 4 or (len(raw) - 4) % 8 or struct.unpack_from("<I", raw)[0] != 2:
        return [(ACL_UNREADABLE, ACL_WRITE, 0)]
    out: List[AclEntry] = []
    for offset in range(4, len(raw), 8):
        tag, perm, ident = struct.unpack_from("<HHI", raw, offset)
        out.append((tag, perm, ident))
    return out


def _kind(st: os.stat_result) -> str:
    for test, name in _KINDS:
        if test(st.st_mode):
            return name
    return "file"


def _not_regular(real: str, st: os.stat_result, via: str) -> str:
    return f"{real}:1:1: refused: this is a {_kind(st)}{via}, not a regular file; {REGULAR_HINT}"
