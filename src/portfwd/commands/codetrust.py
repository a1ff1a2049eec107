"""Whom ``portfwd install`` would hand root: the hooks it writes run a Python interpreter
and portfwd's package as root in every guest start, so everything on their paths must
be writable by root alone, by the rule ``configtrust.read`` applies to forward.toml.

Checked, each along its whole path (every directory a name is looked up in, symlinks
followed): the interpreter the hooks will name (a regular file), its venv's
``pyvenv.cfg``, the site-packages directories of that interpreter (anyone who may add
a ``.pth`` file there runs code in it), and portfwd's package with everything in it
(``__pycache__`` too). A root-owned sticky directory such as /tmp may lie on the way
when what portfwd passes through in it belongs to root.
"""

from __future__ import annotations

import os
import stat
from typing import List, Sequence

from portfwd.config.configtrust import access_acl, writers_of
from portfwd.host.pathwalk import walk

FIX = ("install portfwd where only root can write, e.g. a venv that root makes in /opt"
       " (/usr/bin/python3 -m venv --system-site-packages /opt/portfwd)")


def problems(python: str, package_dir: str, site_dirs: Sequence[str]) -> List[str]:
    """Every reason not to name ``python`` in a hook that imports ``package_dir``,
    each starting with the path it is about; [] when root alone can change them."""
    out = _path(python, "the Python the hooks would run", final=True)
    venv_cfg = os.path.join(os.path.dirname(os.path.dirname(python)), "pyvenv.cfg")
    if os.path.isfile(venv_cfg):
        out += _path(venv_cfg, "the venv's pyvenv.cfg, which tells that Python where its"
                               " library is", final=True)
    for folder in site_dirs:
        if os.path.isdir(folder):
            out += _path(folder, "a site-packages directory of that Python", final=True)
    out += _path(package_dir, "portfwd's package", final=True)
    for folder, dirs, files in os.walk(package_dir):
        for name in sorted(dirs + files):
            out += _entry(os.path.join(folder, name), "part of portfwd's package")
    return list(dict.fromkeys(out))


def _path(path: str, what: str, final: bool) -> List[str]:
    """The problems of every directory ``path`` is looked up through, and of itself."""
    try:
        real, lookups = walk(os.path.abspath(path))
    except OSError as e:
        return [f"{path}: cannot look at {what}: {e.strerror}"]
    out: List[str] = []
    for i, (directory, name, entry) in enumerate(lookups):
        last = i == len(lookups) - 1 and not stat.S_ISLNK(entry.st_mode)
        st = os.lstat(directory)
        writers = writers_of(st, access_acl(directory))[0]
        if not writers:
            continue
        mode = stat.S_IMODE(st.st_mode)
        if mode & stat.S_ISVTX and st.st_uid == 0 and not last and entry.st_uid == 0:
            continue  # a shared sticky directory: others cannot replace root's entry
        out.append(f"{directory}: refused: this directory is writable by"
                   f" {' and '.join(writers)} (mode {mode:04o}), who could replace"
                   f" {os.path.join(directory, name)}, {what}, and so run code as root in"
                   f" every guest start; fix: {FIX}")
    if final:
        out += _entry(real, what)
    return out


def _entry(path: str, what: str) -> List[str]:
    """The problem of ``path`` itself: writable by anyone but root."""
    try:
        st = os.lstat(path)
    except OSError as e:
        return [f"{path}: cannot look at {what}: {e.strerror}"]
    if stat.S_ISLNK(st.st_mode):
        return []  # a symlink's own mode means nothing; where it leads is walked
    writers, acl = writers_of(st, access_acl(path))
    if not writers:
        return []
    kind = "directory" if stat.S_ISDIR(st.st_mode) else "file"
    fix = f"chown root:root {path} && chmod go-w {path}" + (f" && setfacl -b {path}" if acl
                                                            else "")
    return [f"{path}: refused: this {kind} ({what}) is writable by {' and '.join(writers)}"
            f" (mode {stat.S_IMODE(st.st_mode):04o}), who could run code as root in every"
            f" guest start; fix: {fix}, or {FIX}"]
