"""Rewriting forward.toml for ``portfwd add`` / ``remove``: one edit at a time, from a
file portfwd trusts, replaced atomically with the same owner, mode and ACL.

- Lock: ``flock`` on the directory that really holds the file (no lock file is
  left behind). Only ``add`` and ``remove`` take it, before reading and until the
  rename, so two of them running at once each see the other's result. It is
  released before the edit is applied: the apply step takes the run directory's
  lock, and nothing holds both.
- Read: ``configtrust.read``, the trust rule ``portfwd check`` applies (the file and
  every directory on its path writable by root alone; symlinks followed).
- Write: a new file beside the real file (``atomicfile.temp_file``), given the old one's
  owner, group, mode and POSIX access ACL, flushed to disk, renamed over the real
  file (a symlink to it stays a symlink), then the directory is flushed. A file
  changed by someone else since it was read is left alone (the edit is refused).
"""

from __future__ import annotations

import fcntl
import os
from typing import Callable, TypeVar

from portfwd.rundir import atomicfile, state
from portfwd.config.configtrust import ACL_ACCESS, read
from portfwd.errors import ConfigError, HostError
from portfwd.host.pathwalk import walk

T = TypeVar("T")


def edit(path: str, change: Callable[[str], T], text_of: Callable[[T], str]) -> T:
    """Read ``path``, compute ``change(text)`` and write ``text_of`` of the result,
    all under the directory's lock; ConfigError from ``change`` leaves the file alone."""
    real = _real(path)
    folder = os.open(os.path.dirname(real), os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        fcntl.flock(folder, fcntl.LOCK_EX)
        text = read(path)
        result = change(text)
        new = text_of(result)
        if new != text:
            if read(path) != text:
                raise ConfigError([f"{path}: changed while portfwd edited it; nothing"
                                   " written: run the command again"])
            _replace(real, new.encode("utf-8"))
        return result
    finally:
        os.close(folder)  # releases the lock


def _real(path: str) -> str:
    """The file ``path`` names, its symlinks resolved (ConfigError as ``read`` says)."""
    try:
        return walk(path)[0]
    except OSError:
        read(path)  # raises the message check prints
        raise


def _replace(real: str, data: bytes) -> None:
    st = os.lstat(real)
    try:
        acl = os.getxattr(real, ACL_ACCESS, follow_symlinks=False)
    except OSError:
        acl = b""  # none (ENODATA), or none possible here
    fd, tmp = atomicfile.temp_file(real, 0o600)
    try:
        os.fchown(fd, st.st_uid, st.st_gid)
        os.fchmod(fd, st.st_mode & 0o7777)
        _set_acl(fd, acl)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, real)
    except BaseException as e:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        if isinstance(e, OSError):
            raise HostError(f"{real}: cannot write: {e.strerror or e}; nothing changed") from None
        raise
    folder = os.open(os.path.dirname(real), os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(folder)
    finally:
        os.close(folder)


def _set_acl(fd: int, acl: bytes) -> None:
    """Give the new file the old one's access ACL, or none (a default ACL of the
    directory may have given it one)."""
    if acl:
        os.setxattr(fd, ACL_ACCESS, acl)
        return
    try:
        os.removexattr(fd, ACL_ACCESS)
    except OSError:
        pass  # none there (ENODATA) or none possible (ENOTSUP)
