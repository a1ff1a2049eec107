"""What portfwd keeps under /run/portfwd (``$PORTFWD_RUNDIR``): every file, its
format and its atomic write live here (``Store``, and the lock ``locked``) and in
the two modules it is built on: ``run_host`` (host.json) and ``run_compiled``
(the compiled configuration). Nothing else opens these paths.

    lock                  flock: one portfwd run at a time (``locked``)
    compiled -> compiled.PID.RANDOM/   the parsed configuration the hook reads
                          (``run_compiled``; marshal):
        signature         CACHE_FORMAT, Python version, stat of forward.toml
        domain_forwards   present (empty) when [options] domain_forwards = true
        options           (table, strict, [discover sources])
        name/NAME         the binding templates (``plan.Template``) of guest NAME
        uuid/UUID         … of a guest named by UUID
    guests/NAME.json      what was applied per guest (``record.GuestState.to_json``)
    host.json             what portfwd keeps host-wide, one file written once per run
                          (``run_host.HostRecord``):
        guests            guest → ``values.Bridges.to_json()``: where its forwards lead
        hairpin           table → the bridges portfwd last wrote into its hairpin set
        localnet          bridges where portfwd turned route_localnet on
        ports             guest → tap → [ifindex, hairpin mode found]: the bridge ports
                          portfwd keeps in hairpin mode (``bridgeport``)
        accepts           family → the bridges whose accepts in libvirt's chains the
                          last look at them (``compat``) found or put in place
                          (bridges.json, hairpin.json, localnet.json and ports.json of
                          earlier versions are read once and folded into it)
    awaiting.json         [guest, address, MAC, bridge, tap] of each discovered address
                          the last sync left waiting for evidence (``evidence``)
    layout.TABLE          the ``constants.LAYOUT`` TABLE was last built with, and its
                          variant (``tables.layout_id``: "7", "7+concat")
    hookindex -> hookindex.PID.RANDOM/   what the hook's sh lines read (``hookindex``
                          owns it: its format, its writer and its cleaning)
    hook.sock             where ``portfwd daemon`` answers the hooks' calls
                          (``hooksocket``: the format; the daemon makes and removes it)

Every file is replaced by a rename (``atomicfile.write_atomic``; the cache by swapping the
``compiled`` symlink), so a reader sees the old or the new content. What a run
killed midway leaves has one of three name patterns, and every run that takes
the lock removes them (``sweep``): ``NAME.tmp.PID.RANDOM`` (write_atomic's
temporary file, here and in guests/), ``compiled.new.PID.RANDOM`` (the link
before its rename) and ``compiled.PID.RANDOM`` folders ``compiled`` does not
point to.

Cheap to import (only os, sys, fcntl, ``run_host``, ``atomicfile`` and ``runpaths``,
the default paths: not even typing): a hook that does its call itself lives on it,
and libvirt runs the hook for every guest and every phase.

Per-guest files (``guests/NAME.json``, ``compiled/name/NAME``) are named by
``file_name``, which fits any name libvirt allows into NAME_MAX and gives
distinct names distinct files. Nothing reads a guest name back from a file
name: the guest state holds it (``"guest"``).
"""

from __future__ import annotations

import fcntl
import os
import sys

from portfwd.rundir import atomicfile
from portfwd.rundir.atomicfile import TMP_MARK
from portfwd.rundir.run_host import LEGACY_HOST_FILES, HostRecord, ensure_dir
from portfwd.runpaths import DEFAULT_CONFIG as DEFAULT_CONFIG
from portfwd.runpaths import DEFAULT_RUN_DIR as DEFAULT_RUN_DIR
from portfwd.runpaths import ENV_CONFIG as ENV_CONFIG
from portfwd.runpaths import ENV_RUN_DIR as ENV_RUN_DIR
from portfwd.runpaths import config_path as config_path
from portfwd.runpaths import run_dir as run_dir

TYPE_CHECKING = False
if TYPE_CHECKING:
    from types import TracebackType
    from typing import Any, Callable, Dict, Iterable, List, Optional, Tuple, Type, TypeVar

    from portfwd.host.bridgeport import Records
    from portfwd.plan import Template
    from portfwd.rundir.record import GuestState, Recorded

    T = TypeVar("T")
    from portfwd.values import Bridges

CACHE_FORMAT = "5"  # 3: long guest names map to hashed file names; a range is one template;
# 4: a template names its configuration entry; 5: a template is a dict, its host ports
# [first, last]
AWAITING = "awaiting.json"
_SAFE = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_-")
# longest per-guest file name kept as is: with ".json.tmp.PID.RANDOM" it stays below
# NAME_MAX (255 bytes); longer ones become a readable prefix, "~" and a hash
FILE_NAME_MAX = 200
_HASHED_PREFIX = 64
# the names of what a killed run may leave (``sweep``): the temporary files of
# write_atomic, the compiled link before its rename, compiled folders
COMPILED = "compiled"
DOMAIN_FORWARDS = "domain_forwards"  # in compiled/: [options] domain_forwards = true
NEW_LINK = "compiled.new."


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
    alive): write_atomic's temporary files (``TMP_MARK`` in the name, here and in
    guests/), ``compiled.new.*`` links and every ``compiled.*`` folder the
    ``compiled`` link does not point to."""
    try:
        names = os.listdir(root)
    except OSError:
        return
    current = _current_compiled(root)
    for name in names:
        path = os.path.join(root, name)
        if TMP_MARK in name or name.startswith(NEW_LINK):
            _remove(path)
        elif name.startswith(COMPILED + ".") and name != current and not os.path.islink(path):
            _remove(path)
        elif name == "guests":
            try:
                for entry in os.listdir(path):
                    if TMP_MARK in entry:
                        _remove(os.path.join(path, entry))
            except OSError:
                pass


def _current_compiled(root: str) -> str:
    """The folder name the ``compiled`` link points to ("" if none)."""
    try:
        return os.path.basename(os.path.normpath(os.readlink(os.path.join(root, COMPILED))))
    except OSError:
        return ""


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
        where = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino}".encode()
        with open("/proc/locks", "rb") as f:
            for line in f:  # "1: FLOCK  ADVISORY  WRITE 1234 fe:00:5678 0 EOF"; "1: -> …" waits
                fields = line.split()
                if len(fields) > 5 and fields[1] == b"FLOCK" and fields[5] == where:
                    return fields[4].decode("ascii", "replace")
    except OSError:
        pass
    return ""


def guest_state_path(name: str, root: Optional[str] = None) -> str:
    return os.path.join(root or run_dir(), "guests", file_name(name) + ".json")


def has_guest_state(name: str, root: Optional[str] = None) -> bool:
    return os.path.exists(guest_state_path(name, root))


def has_forwards(root: Optional[str] = None) -> bool:
    """Whether any guest has forwards applied (a guest record exists)."""
    try:
        with os.scandir(os.path.join(root or run_dir(), "guests")) as entries:
            return any(e.name.endswith(".json") for e in entries)
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


def cached_domain_forwards(root: Optional[str] = None) -> bool:
    """``[options] domain_forwards`` as last compiled: one stat, for the hook."""
    return os.path.exists(os.path.join(compiled_dir(root), DOMAIN_FORWARDS))


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




class Store(HostRecord):
    """The guests' records, host.json (``run_host.HostRecord``), awaiting.json and
    layout.TABLE: how each is named, its format, and its atomic write (the
    compiled cache: ``run_compiled``). Callers hold ``locked()``. The heavier
    imports (json, the typed records) load only when a method needs them: the
    hook's early exit never gets here."""

    def __init__(self, root: Optional[str] = None) -> None:
        super().__init__(root or run_dir())

    # -- guests/NAME.json ----------------------------------------------------------
    def read_guest(self, name: str) -> Optional[GuestState]:
        import json

        from portfwd import log
        from portfwd.rundir.record import GuestState

        try:
            with open(guest_state_path(name, self.root), encoding="utf-8") as f:
                return GuestState.from_json(json.load(f))
        except FileNotFoundError:
            return None
        except (OSError, ValueError, KeyError, TypeError) as e:
            log.warning(f"ignoring unreadable state of guest {name}: {e}")
            return None

    def all_guests(self) -> List[GuestState]:
        from portfwd.rundir.record import GuestState

        return self._each_guest(GuestState.from_json)

    def all_records(self) -> List[Recorded]:
        """Every guest's state as read, parsed only as far as a sync needs (10,000
        bindings cost as much to parse as to read)."""
        from portfwd.rundir.record import Recorded

        return self._each_guest(Recorded)

    def _each_guest(self, parse: Callable[[Dict[str, Any]], T]) -> List[T]:
        """``parse`` of every guests/NAME.json; an unreadable one is logged and skipped."""
        import json

        from portfwd import log

        out = []
        folder = self._path("guests")
        try:
            names = sorted(os.listdir(folder))
        except FileNotFoundError:
            return []
        for name in names:
            if not name.endswith(".json"):
                continue
            path = os.path.join(folder, name)
            try:
                with open(path, encoding="utf-8") as f:
                    out.append(parse(json.load(f)))
            except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
                log.warning(f"ignoring unreadable state file {path}: {e}")
        return out

    def write_guests(self, states: Iterable[GuestState],
                     bridges_of: Callable[[GuestState], Bridges]) -> None:
        """Record (or, for no bindings, forget) guests, and where their forwards lead
        (in the host record: ``commit`` writes it)."""
        import json

        summary = self.read_summary(bridges_of)
        for st in states:
            path = guest_state_path(st.guest, self.root)
            if st.empty:
                summary.pop(st.guest, None)
                try:
                    os.unlink(path)
                except FileNotFoundError:
                    pass
                continue
            summary[st.guest] = bridges_of(st)
            ensure_dir(os.path.dirname(path))
            atomicfile.write_atomic(path, json.dumps(st.to_json(), separators=(",", ":")).encode())
        self.write_summary(summary)

    def read_summary(self, bridges_of: Callable[[GuestState], Bridges]) -> Dict[str, Bridges]:
        """Guest → the bridges its forwards lead to (host.json); missing, rebuilt from
        the guests' records with ``bridges_of``."""
        summary = self.summary()
        if summary is None:
            return {st.guest: bridges_of(st) for st in self.all_guests()}
        return summary

    # -- awaiting.json -------------------------------------------------------------
    def awaiting(self) -> List[Tuple[str, str, str, str, str]]:
        """(guest, address, MAC, bridge, tap) the last sync left waiting for evidence."""
        data = self._read_json(AWAITING, [])
        try:
            return [(str(g), str(a), str(m), str(b), str(t)) for g, a, m, b, t in data]
        except (TypeError, ValueError):
            return []

    def write_awaiting(self, awaited: List[Tuple[str, str, str, str, str]]) -> None:
        """Record what waits for evidence; the file is left as it is when it says that
        already (a reconcile that changes nothing writes nothing)."""
        if list(awaited) != self.awaiting():
            self._write_json(AWAITING, [list(a) for a in awaited])

    # -- layout.TABLE --------------------------------------------------------------
    def layout(self, table: str) -> Optional[str]:
        """The layout portfwd last built ``table`` with in this boot, if any."""
        try:
            with open(self._path(f"layout.{table}"), encoding="ascii") as f:
                return f.read()
        except OSError:
            return None

    def remember_layout(self, table: str, layout: str) -> None:
        atomicfile.write_atomic(self._path(f"layout.{table}"), layout.encode())

    def forget_layout(self, table: str) -> None:
        try:
            os.unlink(self._path(f"layout.{table}"))
        except FileNotFoundError:
            pass

    # -- everything ----------------------------------------------------------------
    def clear(self) -> None:
        """Forget every guest and table (``portfwd flush``); the compiled
        configuration and the host record's localnet and ports stay (the sysctls
        and hairpin modes are put back after, and ``commit`` writes it)."""
        import shutil

        shutil.rmtree(self._path("guests"), ignore_errors=True)
        for name in os.listdir(self.root):
            if (name in (LEGACY_HOST_FILES["guests"], LEGACY_HOST_FILES["hairpin"], AWAITING)
                    or name.startswith("layout.")):
                os.unlink(self._path(name))
        for section in ("guests", "hairpin", "accepts"):
            self._set(section, {})
