"""Paths inside a root directory: ``at`` names one as seen from here, ``walk``
resolves one as the kernel does (symlinks, ``..``) and lists each name it looked
up on the way. The one path walker of portfwd: the configuration's trust check
judges each lookup, the AppArmor check follows what a hook executes.
"""

from __future__ import annotations

import errno
import os
import stat
from typing import List, Tuple

MAX_SYMLINKS = 40  # the kernel's limit on links followed in one lookup (ELOOP)

# a directory, a name looked up in it, and the lstat of what that name is
PathEntry = Tuple[str, str, os.stat_result]


def at(root: str, path: str) -> str:
    """``path`` inside ``root`` as seen from here (a relative path counts from
    ``root`` too)."""
    return os.path.join(root, path.lstrip("/"))


def walk(path: str, root: str = "/") -> Tuple[str, List[PathEntry]]:
    """``path`` with its symlinks resolved as the kernel resolves them when ``root``
    is ``/`` (an absolute target starts again at ``root``; a relative ``path``
    starts at the working directory): the real path inside ``root``, and each name
    looked up on the way. OSError (ENOENT, ENOTDIR, ELOOP) as opening it would."""
    absolute = path if path.startswith("/") else os.path.join(os.getcwd(), path)
    todo = [p for p in absolute.split("/") if p][::-1]
    current = "/"
    entries: List[PathEntry] = []
    links = 0
    while todo:
        name = todo.pop()
        if name == ".":
            continue
        if name == "..":
            current = os.path.dirname(current)
            continue
        entry = os.path.join(current, name)
        st = os.lstat(at(root, entry))
        entries.append((current, name, st))
        if stat.S_ISLNK(st.st_mode):
            links += 1
            if links > MAX_SYMLINKS:
                raise OSError(errno.ELOOP, os.strerror(errno.ELOOP), path)
            target = os.readlink(at(root, entry))
            if target.startswith("/"):
                current = "/"
            todo.extend([p for p in target.split("/") if p][::-1])
        elif todo and not stat.S_ISDIR(st.st_mode):
            raise OSError(errno.ENOTDIR, os.strerror(errno.ENOTDIR), entry)
        else:
            current = entry
    return current, entries


def resolve(root: str, path: str) -> str:
    """The real path inside ``root`` of absolute ``path`` (``walk``)."""
    return walk(path, root)[0]
