"""What portfwd keeps under /run/portfwd: the lock, per-guest applied state,
and the compiled configuration the hook reads instead of parsing TOML.

Cheap to import (only os, sys, fcntl: not even typing): the hook's fast path
lives on it, and libvirt runs the hook for every guest and every phase.
"""

from __future__ import annotations

import fcntl
import os
import sys

TYPE_CHECKING = False
if TYPE_CHECKING:
    from types import TracebackType
    from typing import List, Optional, Type

DEFAULT_CONFIG = "/etc/portfwd/forward.toml"
ENV_CONFIG = "PORTFWD_CONFIG"
DEFAULT_RUN_DIR = "/run/portfwd"
ENV_RUN_DIR = "PORTFWD_RUNDIR"
CACHE_FORMAT = "3"  # 3: a range with equal ports is one template
SUMMARY = "bridges.json"  # guest → bridges its forwards lead to (see engine.py)
_SAFE = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_-")


def config_path(given: Optional[str] = None) -> str:
    """--config, else $PORTFWD_CONFIG, else /etc/portfwd/forward.toml."""
    return given or os.environ.get(ENV_CONFIG) or DEFAULT_CONFIG


def run_dir() -> str:
    return os.environ.get(ENV_RUN_DIR) or DEFAULT_RUN_DIR


def file_name(name: str) -> str:
    """A guest name as a safe file name (percent-encoding anything unusual)."""
    return "".join(ch if ch in _SAFE else "".join(f"%{b:02X}" for b in ch.encode("utf-8"))
                   for ch in name) or "%"


def ensure_dir(path: str) -> None:
    os.makedirs(path, mode=0o700, exist_ok=True)


class locked:
    """``with locked():`` holds the portfwd lock: one engine run at a time on this host."""

    def __init__(self, root: Optional[str] = None) -> None:
        self.root = root or run_dir()
        self.fd = -1

    def __enter__(self) -> None:
        ensure_dir(self.root)
        self.fd = os.open(os.path.join(self.root, "lock"), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC,
                          0o600)
        fcntl.flock(self.fd, fcntl.LOCK_EX)

    def __exit__(self, kind: Optional[Type[BaseException]], value: Optional[BaseException],
                 tb: Optional[TracebackType]) -> None:
        os.close(self.fd)


def write_atomic(path: str, data: bytes) -> None:
    """Replace ``path`` with ``data`` so readers see the old or the new file."""
    tmp = f"{path}.tmp.{os.getpid()}"
    with open(tmp, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


def guest_state_path(name: str, root: Optional[str] = None) -> str:
    return os.path.join(root or run_dir(), "guests", file_name(name) + ".json")


def has_guest_state(name: str, root: Optional[str] = None) -> bool:
    return os.path.exists(guest_state_path(name, root))


def has_forwards(root: Optional[str] = None) -> bool:
    """Whether any guest has forwards applied (the bridges summary is not empty)."""
    try:
        return os.path.getsize(os.path.join(root or run_dir(), SUMMARY)) > 2
    except OSError:
        return False


def config_signature(path: str) -> str:
    """Changes whenever the file at ``path`` (or portfwd's cache format) changes."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return f"{CACHE_FORMAT} {sys.version_info[0]}.{sys.version_info[1]} absent {path}"
    return (f"{CACHE_FORMAT} {sys.version_info[0]}.{sys.version_info[1]} {path} {st.st_dev}"
            f" {st.st_ino} {st.st_size} {st.st_mtime_ns} {st.st_ctime_ns}")


def compiled_dir(root: Optional[str] = None) -> str:
    return os.path.join(root or run_dir(), "compiled")


def cached_signature(root: Optional[str] = None) -> Optional[str]:
    try:
        with open(os.path.join(compiled_dir(root), "signature"), encoding="utf-8") as f:
            return f.read()
    except OSError:
        return None


def cached_guest_files(name: str, uuid: Optional[str], root: Optional[str] = None) -> List[str]:
    """The compiled forward files that name this guest (by name, by UUID)."""
    base = compiled_dir(root)
    found = []
    candidates = [os.path.join(base, "name", file_name(name))]
    if uuid:
        candidates.append(os.path.join(base, "uuid", file_name(uuid.lower())))
    for path in candidates:
        if os.path.exists(path):
            found.append(path)
    return found


