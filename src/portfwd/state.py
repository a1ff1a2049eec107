"""What portfwd keeps under /run/portfwd: the lock, per-guest applied state,
and the compiled configuration the hook reads instead of parsing TOML.

Cheap to import (only os, sys, fcntl: not even typing): the hook's fast path
lives on it, and libvirt runs the hook for every guest and every phase.

Per-guest files (``guests/NAME.json``, ``compiled/name/NAME``) are named by
``file_name``, which fits any name libvirt allows into NAME_MAX and gives
distinct names distinct files. Nothing reads a guest name back from a file
name: the guest state holds it (``"guest"``).
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
CACHE_FORMAT = "3"  # 3: long guest names map to hashed file names; a range is one template
SUMMARY = "bridges.json"  # guest → bridges its forwards lead to (see engine.py)
_SAFE = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_-")
# longest per-guest file name kept as is: with ".json.tmp.PID" it stays below NAME_MAX
# (255 bytes); longer ones become a readable prefix, "~" and a hash
FILE_NAME_MAX = 200
_HASHED_PREFIX = 64


def config_path(given: Optional[str] = None) -> str:
    """--config, else $PORTFWD_CONFIG, else /etc/portfwd/forward.toml."""
    return given or os.environ.get(ENV_CONFIG) or DEFAULT_CONFIG


def run_dir() -> str:
    return os.environ.get(ENV_RUN_DIR) or DEFAULT_RUN_DIR


def file_name(name: str) -> str:
    """A guest name (or UUID) as a file name: letters, digits, ``_`` and ``-`` kept,
    anything else percent-encoded (``web.1`` → ``web%2E1``). Beyond FILE_NAME_MAX
    characters: the first ~64 of that, ``~`` and 32 hex digits of the name's SHA-256.

    Distinct names get distinct files: the encoding is reversible, ``~`` appears only
    in hashed names, and two hashed names differ in 128 bits of SHA-256. Up to
    FILE_NAME_MAX, the file names are those of earlier versions."""
    if len(name) <= FILE_NAME_MAX and _SAFE.issuperset(name):
        return name or "%"
    parts = [ch if ch in _SAFE else
             "".join(f"%{b:02X}" for b in ch.encode("utf-8", "surrogatepass"))
             for ch in name]
    encoded = "".join(parts)
    if len(encoded) <= FILE_NAME_MAX:
        return encoded
    import hashlib  # only for long names

    prefix, size = [], 0
    for part in parts:
        size += len(part)
        if size > _HASHED_PREFIX:
            break
        prefix.append(part)
    digest = hashlib.sha256(name.encode("utf-8", "surrogatepass")).hexdigest()[:32]
    return "".join(prefix) + "~" + digest


def ensure_dir(path: str) -> None:
    os.makedirs(path, mode=0o700, exist_ok=True)


class LockTimeout(Exception):
    """The lock stayed with one other process for the whole wait."""

    def __init__(self, path: str, holder: str, waited: float) -> None:
        super().__init__(f"{path}: held by {'pid ' + holder if holder else 'another process'}"
                         f" for {waited:g} s")
        self.holder = holder  # its pid as /proc/locks shows it; "" if unknown
        self.waited = waited


class locked:
    """``with locked():`` holds the portfwd lock: one engine run at a time on this host.

    ``timeout`` (seconds) bounds the wait for any one holder: while other runs take
    their turns (libvirtd reconnecting many guests at once) the wait goes on; when one
    process keeps the lock that long, LockTimeout. None waits as long as it takes.
    """

    def __init__(self, root: Optional[str] = None, timeout: Optional[float] = None) -> None:
        self.root = root or run_dir()
        self.timeout = timeout
        self.fd = -1

    def __enter__(self) -> None:
        ensure_dir(self.root)
        self.fd = os.open(os.path.join(self.root, "lock"), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC,
                          0o600)
        try:
            if self.timeout is None:
                fcntl.flock(self.fd, fcntl.LOCK_EX)
            else:
                try:
                    fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    self._wait(self.timeout)
        except BaseException:
            os.close(self.fd)
            self.fd = -1
            raise
        sweep(self.root)

    def _wait(self, timeout: float) -> None:
        """Poll for the lock; give up when the same process held it for ``timeout``."""
        import time

        holder = lock_holder(self.fd)
        deadline = time.monotonic() + timeout
        pause = 0.002
        while True:
            time.sleep(pause)
            pause = min(pause * 2, 0.05)
            try:
                fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return
            except BlockingIOError:
                pass
            now = time.monotonic()
            if now >= deadline:
                current = lock_holder(self.fd)
                if not current or current == holder:
                    raise LockTimeout(os.path.join(self.root, "lock"), current or holder, timeout)
                holder, deadline = current, now + timeout  # another run's turn: keep waiting

    def __exit__(self, kind: Optional[Type[BaseException]], value: Optional[BaseException],
                 tb: Optional[TracebackType]) -> None:
        os.close(self.fd)
        self.fd = -1


def sweep(root: str) -> None:
    """Remove what a run killed midway left (called holding the lock, so no writer is
    alive): ``*.tmp.PID`` files of write_atomic, the ``compiled.new.PID`` link and
    ``compiled.PID.N`` folders the ``compiled`` link does not point to."""
    try:
        names = os.listdir(root)
    except OSError:
        return
    try:
        current = os.readlink(os.path.join(root, "compiled"))
    except OSError:
        current = ""
    for name in names:
        path = os.path.join(root, name)
        if ".tmp." in name or name.startswith("compiled.new."):
            _remove(path)
        elif name.startswith("compiled.") and name != current and not os.path.islink(path):
            _remove(path)
        elif name == "guests":
            try:
                for entry in os.listdir(path):
                    if ".tmp." in entry:
                        _remove(os.path.join(path, entry))
            except OSError:
                pass


def _remove(path: str) -> None:
    try:
        if os.path.isdir(path) and not os.path.islink(path):
            import shutil

            shutil.rmtree(path, ignore_errors=True)
        else:
            os.unlink(path)
    except OSError:
        pass


def lock_holder(fd: int) -> str:
    """The pid holding a ``flock`` on ``fd``'s file, from /proc/locks ("" if unknown)."""
    try:
        st = os.fstat(fd)
        where = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino}"
        with open("/proc/locks", encoding="ascii", errors="replace") as f:
            for line in f:  # "1: FLOCK  ADVISORY  WRITE 1234 fe:00:5678 0 EOF"; "1: -> …" waits
                fields = line.split()
                if len(fields) > 5 and fields[1] == "FLOCK" and fields[5] == where:
                    return fields[4]
    except OSError:
        pass
    return ""


def write_atomic(path: str, data: bytes, mode: Optional[int] = None) -> None:
    """Replace ``path`` with ``data`` (and ``mode``) so readers see the old or the new file."""
    tmp = f"{path}.tmp.{os.getpid()}"
    with open(tmp, "wb") as f:
        f.write(data)
        if mode is not None:
            os.fchmod(f.fileno(), mode)
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


