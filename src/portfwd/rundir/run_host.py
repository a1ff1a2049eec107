"""host.json under the run directory (``state``): what portfwd keeps host-wide,
one file written once per run (``commit``), its sections read and changed in
memory until then. The layout of the whole run directory is at the top of
``state``; this is its host-wide record:

    guests     guest → ``values.Bridges.to_json()``: where its forwards lead
    hairpin    table → the bridges portfwd last wrote into its hairpin set
    localnet   bridges where portfwd turned route_localnet on
    ports      guest → tap → [ifindex, hairpin mode found]: the bridge ports
               portfwd keeps in hairpin mode (``bridgeport``)
    accepts    family → the bridges whose accepts in libvirt's chains the last
               look at them (``compat``) found or put in place

bridges.json, hairpin.json, localnet.json and ports.json of earlier versions are
read once, folded in, and removed by the first ``commit``.

Cheap to import (only os): ``state.Store`` is built on it.
"""

from __future__ import annotations

import os

from portfwd.rundir import atomicfile

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any, Dict, List, Optional, Tuple

    from portfwd.host.bridgeport import Records
    from portfwd.values import Bridges

HOST = "host.json"
# the files host.json replaces: read once, folded into it, removed when it is written
LEGACY_HOST_FILES = {"guests": "bridges.json", "hairpin": "hairpin.json",
                     "localnet": "localnet.json", "ports": "ports.json"}


def ensure_dir(path: str) -> None:
    """``path`` as a folder only root reads (0700), made when missing."""
    if not os.path.isdir(path):  # a stat, where makedirs would try mkdir every time
        os.makedirs(path, mode=0o700, exist_ok=True)


def _stat_key(st: os.stat_result) -> Tuple[int, int, int]:
    """Tells one version of a file from another (write_atomic renames a new inode in)."""
    return st.st_ino, st.st_mtime_ns, st.st_size


class HostRecord:
    """host.json of the run directory ``root``, read once per version of the file
    (a long-running caller sees others' commits) and written by ``commit``."""

    def __init__(self, root: str) -> None:
        self.root = root
        # host.json as last read (keyed by its stat; None: not on disk) or changed
        self._record: Optional[Tuple[Optional[Tuple[int, int, int]], Dict[str, Any]]] = None
        self._dirty = False  # changed since read: ``commit`` writes it
        self._legacy = False  # read from the files of an earlier version

    def _path(self, name: str) -> str:
        return os.path.join(self.root, name)

    def _host(self) -> Dict[str, Any]:
        """The host record as this Store last read or changed it; read once per stat
        of host.json (a long-running caller sees others' commits). Without host.json,
        the files of earlier versions are folded in (written by the next ``commit``)."""
        import json

        from portfwd import log

        path = self._path(HOST)
        try:
            with open(path, encoding="utf-8") as f:
                key = _stat_key(os.fstat(f.fileno()))
                if self._record is not None and (self._dirty or self._record[0] == key):
                    return self._record[1]
                data = json.load(f)
            if not isinstance(data, dict):
                raise ValueError("not a JSON object")
            self._record, self._dirty = (key, data), False
            return data
        except FileNotFoundError:
            if self._record is not None and (self._dirty or self._record[0] is None):
                return self._record[1]
        except (OSError, ValueError) as e:
            if self._record is not None and self._dirty:
                return self._record[1]
            log.warning(f"rebuilding unreadable {path}: {e}")
        data = {section: self._read_json(legacy, None)
                for section, legacy in LEGACY_HOST_FILES.items()}
        data = {k: v for k, v in data.items() if v is not None}
        self._record = (None, data)
        self._dirty = self._legacy = bool(data)
        return data

    def _section(self, name: str, default: Any) -> Any:
        value = self._host().get(name, default)
        return value if isinstance(value, type(default)) else default

    def _set(self, name: str, value: Any) -> None:
        """Change one section of the host record (in memory, until ``commit``)."""
        data = self._host()
        if data.get(name) != value:
            data[name] = value
            self._dirty = True

    def commit(self) -> bool:
        """Write the host record if this run changed it (one atomic write); the files
        it replaced go then. Returns whether it wrote."""
        import json

        if not self._dirty or self._record is None:
            return False
        data = self._record[1]
        path = self._path(HOST)
        ensure_dir(self.root)
        atomicfile.write_atomic(path, json.dumps(data, sort_keys=True, separators=(",", ":")).encode())
        try:
            self._record = (_stat_key(os.stat(path)), data)
        except OSError:
            self._record = None
        self._dirty = False
        if self._legacy:  # folded in: the files of earlier versions go
            self._legacy = False
            for legacy in LEGACY_HOST_FILES.values():
                try:
                    os.unlink(self._path(legacy))
                except FileNotFoundError:
                    pass
        return True

    def summary(self) -> Optional[Dict[str, Bridges]]:
        """Guest → the bridges its forwards lead to; kept here, so that knowing
        which bridges need an accept does not read every guest's state. None when
        missing or unreadable (``state.Store.read_summary`` rebuilds it)."""
        from portfwd.constants import DEFAULT_TABLE
        from portfwd.values import Bridges

        data = self._host().get("guests")
        if isinstance(data, dict):
            try:
                return {str(k): Bridges.from_json(v, DEFAULT_TABLE) for k, v in data.items()}
            except (AttributeError, TypeError) as e:
                from portfwd import log

                log.warning(f"rebuilding the guests' bridges of {self._path(HOST)}: {e}")
        return None

    def write_summary(self, summary: Dict[str, Bridges]) -> None:
        self._set("guests", {guest: bridges.to_json() for guest, bridges in sorted(summary.items())})

    def _read_json(self, name: str, default: Any) -> Any:
        import json

        try:
            with open(self._path(name), encoding="utf-8") as f:
                return json.load(f)
        except (OSError, ValueError):
            return default

    def _write_json(self, name: str, value: Any) -> None:
        import json

        atomicfile.write_atomic(self._path(name), json.dumps(value).encode())

    def hairpin(self) -> Dict[str, List[str]]:
        """Table → the bridges portfwd last wrote into its hairpin set."""
        data = self._section("hairpin", {})
        return {str(k): [str(b) for b in v] for k, v in data.items() if isinstance(v, list)}

    def write_hairpin(self, written: Dict[str, List[str]]) -> None:
        self._set("hairpin", {table: list(bridges) for table, bridges in written.items()})

    def forget_hairpin(self, table: str) -> None:
        """The table was (re)created: its hairpin set is empty, whatever was written."""
        written = self.hairpin()
        if written.pop(table, None) is not None:
            self.write_hairpin(written)

    def localnet(self) -> List[str]:
        """The bridges where portfwd turned ``route_localnet`` on."""
        return [str(b) for b in self._section("localnet", [])]

    def write_localnet(self, bridges: List[str]) -> None:
        self._set("localnet", sorted(bridges))

    def hairpin_ports(self) -> Records:
        """Guest → tap → (ifindex, hairpin mode before portfwd turned it on)."""
        data = self._section("ports", {})
        out: Records = {}
        try:
            for guest, taps in data.items():
                out[str(guest)] = {str(tap): (int(v[0]), str(v[1])) for tap, v in taps.items()}
        except (AttributeError, TypeError, ValueError, IndexError):
            return {}
        return out

    def write_hairpin_ports(self, records: Records) -> None:
        self._set("ports", {guest: {tap: list(v) for tap, v in taps.items()}
                            for guest, taps in sorted(records.items()) if taps})

    def accepts(self) -> Dict[int, List[str]]:
        """Family → the bridges whose accepts the last look at libvirt's chains found
        in place or put there (empty: not looked, or none wanted)."""
        data = self._section("accepts", {})
        try:
            return {int(k): sorted(str(b) for b in v) for k, v in data.items()}
        except (TypeError, ValueError):
            return {}

    def write_accepts(self, wanted: Optional[Dict[int, List[str]]]) -> None:
        """What a look at libvirt's chains left in place (None: unknown, look next time)."""
        self._set("accepts", {} if wanted is None else
                  {str(f): sorted(b) for f, b in sorted(wanted.items()) if b})
