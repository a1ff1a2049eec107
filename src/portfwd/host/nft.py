"""The only module that imports ``nftables``: run one JSON batch, read back."""

from __future__ import annotations

from portfwd.errors import HostError

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any, Dict, List, Optional, Protocol, Sequence

    Command = Dict[str, Any]

    class NftLike(Protocol):
        """What the engine, ``compat``, ``status`` and ``doctorfacts`` ask of
        nftables: ``Nft`` answers from the kernel, tests/fakenft.py from memory.
        Defined for the type checker alone (``typing`` stays off the hook's path)."""

        def apply(self, commands: Sequence[Command], dry_run: bool = False) -> None: ...

        def concat_values(self) -> bool: ...

        def set_comment(self, table: str, name: str) -> Optional[str]: ...

        def table_comment(self, table: str) -> Optional[str]: ...

        def create_table(self, table: str, comment: str, marker: str,
                         replace: bool = False) -> None: ...

        def mark_table(self, table: str, comment: str, marker: str) -> None: ...

        def list_table(self, table: str) -> Optional[List[Dict[str, Any]]]: ...

        def list(self, what: Dict[str, Any]) -> Optional[List[Dict[str, Any]]]: ...


class Nft:
    """A libnftables context speaking JSON."""

    def __init__(self) -> None:
        try:
            import nftables
        except ImportError:
            raise HostError("the nftables Python bindings are missing:"
                            " apt-get install python3-nftables") from None
        self._nft = nftables.Nftables()
        self._nft.set_json_output(True)
        self._nft.set_handle_output(False)
        self._concat: Optional[bool] = None

    def apply(self, commands: Sequence[Command], dry_run: bool = False) -> None:
        """Run ``commands`` as one atomic transaction; HostError if refused."""
        if not commands:
            return
        self._nft.set_dry_run(dry_run)
        try:
            rc, _, err = self._nft.json_cmd({"nftables": list(commands)})
        finally:
            self._nft.set_dry_run(False)
        if rc != 0:
            raise HostError(f"nftables refused the change: {_first_lines(err)}")

    def concat_values(self) -> bool:
        """Whether nftables declares a map with a concatenated value through JSON
        (1.1 does; 1.0.6 makes a plain set of it, and a DNAT rule through such a
        map crashes it). Asked by behaviour, not version (stable releases backport
        JSON fixes): a dry-run batch that creates nothing, and fails cleanly where
        it is unsupported ("set is not a map"). Probed once per process."""
        if self._concat is None:
            table = {"family": "inet", "table": "portfwd_probe"}
            batch = [{"add": {"table": {"family": "inet", "name": "portfwd_probe"}}},
                     {"add": {"map": dict(table, name="m", type=["inet_proto", "inet_service"],
                                          map=["ipv4_addr", "inet_service"])}},
                     {"add": {"element": dict(table, name="m", elem=[
                         [{"concat": ["tcp", 1]}, {"concat": ["192.0.2.1", 2]}]])}}]
            self._nft.set_dry_run(True)
            try:
                rc, _, _ = self._nft.json_cmd({"nftables": batch})
            finally:
                self._nft.set_dry_run(False)
            self._concat = rc == 0
        return self._concat

    def set_comment(self, table: str, name: str) -> Optional[str]:
        """The comment of set ``NAME`` in ``inet TABLE`` ("" when it has none), None
        when there is no such set (or no such table: nft does not tell which).

        Cheap whatever the table's maps hold: nft fetches the elements of that
        set alone (10 ms beside 10,000 forwards, where a table listing takes 250)."""
        _check_name(table)
        _check_name(name)
        rc, out, _ = self._nft.json_cmd({"nftables": [{"list": {"set": {
            "family": "inet", "table": table, "name": name}}}]})
        if rc != 0:
            return None
        for obj in out.get("nftables", []):
            if "set" in obj:
                return str(obj["set"].get("comment", ""))
        return None

    def table_comment(self, table: str) -> Optional[str]:
        """The comment of table ``inet TABLE`` ("" when it has none), None when absent.

        Read from nft's terse text listing: nftables 1.0.6 neither prints nor
        takes a table comment in JSON. Costly beside many forwards (nft fetches
        every map element even for a terse listing): ``set_comment`` on the
        marker set first. ``table`` must be a valid table name (config.TABLE_NAME).
        """
        _check_name(table)
        self._nft.set_json_output(False)
        self._nft.set_terse_output(True)
        try:
            rc, out, err = self._nft.cmd(f"list table inet {table}")
        finally:
            self._nft.set_terse_output(False)
            self._nft.set_json_output(True)
        if rc != 0:
            if "No such file or directory" in err:
                return None
            raise HostError(f"cannot list table inet {table}: {_first_lines(err)}")
        for line in out.splitlines()[1:]:
            words = line.strip()
            if words.startswith('comment "') and words.endswith('"'):
                return str(words[9:-1])
            if words:  # the comment comes first, before any chain, set or map
                break
        return ""

    def create_table(self, table: str, comment: str, marker: str, replace: bool = False) -> None:
        """Create ``inet TABLE`` carrying ``comment``, and in it the empty set ``marker``
        carrying it too (``replace``: delete the table first, in the same
        transaction). A text command, because nftables 1.0.6's JSON ignores the
        comment of a table or a set; no value comes from outside unchecked."""
        text = f"delete table inet {table}\n" if replace else ""
        text += f'add table inet {table} {{ comment "{_checked(comment)}"; }}\n'
        self._mark(table, comment, marker, text)

    def mark_table(self, table: str, comment: str, marker: str) -> None:
        """Add the set ``marker`` carrying ``comment`` to the existing ``inet TABLE``
        (a table made before the marker set existed)."""
        self._mark(table, comment, marker, "")

    def _mark(self, table: str, comment: str, marker: str, text: str) -> None:
        _check_name(table)
        _check_name(marker)
        text += (f"add set inet {table} {marker} {{ type inet_service;"
                 f' comment "{_checked(comment)}"; }}')
        self._nft.set_json_output(False)
        try:
            rc, _, err = self._nft.cmd(text)
        finally:
            self._nft.set_json_output(True)
        if rc != 0:
            raise HostError(f"nftables refused to create table inet {table} or its set {marker}:"
                            f" {_first_lines(err)}")

    def list_table(self, table: str) -> Optional[List[Dict[str, Any]]]:
        """Our inet table's objects as JSON, or None when it does not exist."""
        return self.list({"table": {"family": "inet", "name": table}})

    def list(self, what: Dict[str, Any]) -> Optional[List[Dict[str, Any]]]:
        """Objects of one ``list`` command (e.g. ``{"chains": {}}``), None if absent."""
        rc, out, err = self._nft.json_cmd({"nftables": [{"list": what}]})
        if rc != 0:
            if "No such file or directory" in err:
                return None
            raise HostError(f"cannot list {_listed(what)}: {_first_lines(err)}")
        return [o for o in out.get("nftables", []) if "metainfo" not in o]


def _checked(comment: str) -> str:
    if '"' in comment or "\n" in comment:
        raise ValueError(f"unsafe comment {comment!r}")
    return comment


def _check_name(table: str) -> None:
    if not table or not table[0].isalpha() or not all(
            c.isascii() and (c.isalnum() or c == "_") for c in table) or len(table) > 64:
        raise ValueError(f"unsafe table name {table!r}")


def _first_lines(text: str, limit: int = 200) -> str:
    """nft's first error line, without the echoed JSON batch that follows it."""
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    first = lines[0] if lines else "(no message)"
    return first if len(first) <= limit else first[:limit] + "..."


def _listed(what: Dict[str, Any]) -> str:
    """``chains``, ``chain inet portfwd prerouting``: a ``list`` command as nft words."""
    kind, spec = next(iter(what.items()), ("ruleset", {}))
    words = [str(spec[k]) for k in ("family", "table", "name") if isinstance(spec, dict) and k in spec]
    return " ".join([kind] + words)
