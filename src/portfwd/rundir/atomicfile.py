"""Replacing a file so that readers see the old or the new content, never a mix:
a new file beside it (made with O_EXCL, never following a link planted at its
name), renamed over it. The run directory (``state``) writes every file this
way, and ``portfwd install`` the files it puts in place.

Cheap to import (only os): the hook's records are written with it.
"""

from __future__ import annotations

import os

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Optional, Tuple

# in the name of a temporary file of write_atomic: what a killed run may leave
# (``state.sweep`` removes them)
TMP_MARK = ".tmp."


def write_atomic(path: str, data: bytes, mode: Optional[int] = None, replace: bool = True,
                 durable: bool = False) -> None:
    """Replace ``path`` with ``data`` so readers see the old or the new file.

    The data goes to a new file beside ``path`` (``temp_file``), renamed over
    ``path``; with ``replace=False`` linked to ``path`` instead, FileExistsError
    when something (a symlink too) is there. ``mode``: the file's mode whatever the
    umask (None: 0666 less the umask). ``durable``: on disk (fsync of the file and
    of its folder) before this returns. The temporary file never outlives an error."""
    fd, tmp = temp_file(path, mode)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            if durable:
                f.flush()
                os.fsync(f.fileno())
        if replace:
            os.replace(tmp, path)
        else:
            os.link(tmp, path)
            os.unlink(tmp)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    if durable:
        folder = os.open(os.path.dirname(os.path.abspath(path)), os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(folder)
        finally:
            os.close(folder)


def temp_file(path: str, mode: Optional[int] = None) -> Tuple[int, str]:
    """(descriptor, name) of a new empty file ``PATH.tmp.PID.RANDOM`` beside ``path``:
    made with O_EXCL (so never an existing file, nor a symlink someone planted at
    that name), written through the descriptor only, with ``mode`` set on it."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
    while True:
        tmp = f"{path}{TMP_MARK}{os.getpid()}.{os.urandom(4).hex()}"
        try:
            fd = os.open(tmp, flags, 0o600 if mode is not None else 0o666)
        except FileExistsError:
            continue  # taken (2^-32): another name
        if mode is not None:
            try:
                os.fchmod(fd, mode)
            except BaseException:
                os.close(fd)
                os.unlink(tmp)
                raise
        return fd, tmp
