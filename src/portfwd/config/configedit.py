"""``portfwd add`` / ``portfwd remove`` as text edits of forward.toml: pure functions
from the old text to the new one.

The edit splices text at the offsets the project's own position scanner
(``tomlpos``) finds, so every other byte of the file (comments, blank lines, key
order, alignment) stays as it was: ``add`` appends one ``[[forward]]`` table after
one blank line; ``remove`` takes out whole ``[[forward]]`` tables (with the one
blank line before each) or single elements of a ``ports`` list. Before anything is
returned, the new text is parsed again and must hold exactly the old data plus or
minus what was asked (else the edit is refused as too complex to make safely), and
the whole file must pass ``config.parse``, the validation ``portfwd check`` runs.
"""

from __future__ import annotations

import copy
import re
from typing import Any, Dict, List, Optional, Sequence, Tuple

from portfwd.config import portspec
from portfwd.config import parse
from portfwd.errors import ConfigError
from portfwd.config.model import Config, PortRange
from portfwd.config.toml import tomllib
from portfwd.config.tomlpos import Path, _Scanner

PROTOS = ("tcp", "udp", "sctp")
_SEPARATOR = re.compile(r"\s*,\s*\Z")  # between two elements: a comma, no comment
_LINE_TAIL = re.compile(r"[ \t]*,?[ \t]*(#[^\n]*)?(\n|\Z)")
_TABLE_TAIL = re.compile(r"[ \t]*(#[^\n]*)?(\n|\Z)")


class Request:
    """What ``portfwd add`` was asked to declare."""

    __slots__ = ("guest", "uuid", "ipv4", "ipv6", "ports", "sources", "listen", "protos")

    def __init__(self, guest: str, ports: Sequence[str], uuid: Optional[str] = None,
                 ipv4: Optional[str] = None, ipv6: Optional[str] = None,
                 sources: Sequence[str] = (), listen: Sequence[str] = (),
                 protos: Sequence[str] = ()) -> None:
        self.guest = guest
        self.uuid = uuid
        self.ipv4 = ipv4
        self.ipv6 = ipv6
        self.ports = list(ports)
        self.sources = list(sources)
        self.listen = list(listen)
        self.protos = list(protos)

    def port_specs(self) -> List[str]:
        """The specs as the ``ports`` key will hold them (``--proto``: ``with_protos``)."""
        return portspec.with_protos(self.ports, self.protos)

    def table(self) -> Dict[str, Any]:
        """The new ``[[forward]]`` as data, keys in the order they are written."""
        out: Dict[str, Any] = {}
        if self.uuid is not None:
            out["uuid"] = self.uuid
        else:
            out["guest"] = self.guest
        for key, value in (("ipv4", self.ipv4), ("ipv6", self.ipv6)):
            if value is not None:
                out[key] = value
        if self.sources:
            out["from"] = self.sources
        if self.listen:
            out["listen"] = self.listen
        out["ports"] = self.port_specs()
        return out


class Edit:
    """An edit's result: the new text and one line per change it makes."""

    __slots__ = ("text", "changes", "first_line")

    def __init__(self, text: str, changes: List[str], first_line: int = 0) -> None:
        self.text = text
        self.changes = changes
        self.first_line = first_line  # add: the line of the new [[forward]] header


def add(text: str, path: str, request: Request) -> Edit:
    """``text`` with a ``[[forward]]`` for ``request`` appended; ConfigError (located
    in the new text, with where the new table would stand) if the result is invalid."""
    table = request.table()
    block = "[[forward]]\n" + "".join(f"{key} = {_value(v)}\n" for key, v in table.items())
    head = text if not text or text.endswith("\n") else text + "\n"
    head += "\n" if head else ""
    new = head + block
    first = head.count("\n") + 1
    old = _data(text, path)
    expected = copy.deepcopy(old)
    expected.setdefault("forward", [])
    if isinstance(expected["forward"], list):
        expected["forward"].append(table)
    _validate(new, path, expected,
              f"{path}: not changed: lines {first}-{new.count(chr(10))} would hold the new"
              " [[forward]]")
    what = " ".join(table["ports"])
    return Edit(new, [f"{path}:{first}: added [[forward]] for guest {request.guest}: {what}"],
                first)


def remove(text: str, path: str, guest: str, uuid: Optional[str],
           specs: Sequence[str]) -> Edit:
    """``text`` without the guest's ``[[forward]]`` tables (no ``specs``), or without
    the ``ports`` elements that match ``specs`` (a table left with none goes as a
    whole); ConfigError when nothing matches or the form is too complex to edit."""
    data = _data(text, path)
    forwards = data.get("forward", [])
    mine = [k for k, f in enumerate(forwards if isinstance(forwards, list) else [])
            if isinstance(f, dict) and _is_guest(f, guest, uuid)]
    if not mine:
        raise ConfigError([f"{path}: no [[forward]] names guest {guest}; nothing changed"
                           " (portfwd check lists the file's forwards)"])
    # which elements of which table go: table index → element indexes
    drop: Dict[int, List[int]] = {}
    if not specs:
        drop = {k: list(range(len(_ports(forwards[k])))) for k in mine}
    for spec in specs:
        wanted = parse_spec(spec, path)
        hits = [(k, j) for k in mine for j, item in enumerate(_ports(forwards[k]))
                if matches(item, wanted, ":" in spec.partition("/")[0])]
        if not hits:
            have = ", ".join(_spec_text(p) for k in mine for p in _ports(forwards[k]))
            raise ConfigError([f"{path}: guest {guest} forwards no port {spec}; it forwards"
                               f" {have or 'nothing'}; nothing changed"])
        for k, j in hits:
            drop.setdefault(k, []).append(j)
    expected = copy.deepcopy(data)
    new = text
    changes: List[str] = []
    positions = _scan(text)
    for k in sorted(drop, reverse=True):
        ports = _ports(forwards[k])
        line = positions.out.of(("forward", k))[0]
        gone = sorted(set(drop[k]), reverse=True)
        if len(gone) == len(ports):
            new = _cut_table(new, path, k)
            del expected["forward"][k]
            changes.append(f"{path}:{line}: removed [[forward]] for guest {guest}")
            continue
        for j in gone:
            new = _cut_element(new, path, ("forward", k, "ports", j))
            del expected["forward"][k]["ports"][j]
        changes.append(f"{path}:{line}: removed from the ports of guest {guest}: "
                       + ", ".join(_spec_text(ports[j]) for j in sorted(gone)))
    if not expected.get("forward") and "forward" in expected and "forward" not in _data(new, path):
        del expected["forward"]  # the last [[forward]] went: no key left
    _validate(new, path, expected, f"{path}: not changed")
    return Edit(new, list(reversed(changes)))


# -- text --------------------------------------------------------------------------

def _value(value: Any) -> str:
    """A TOML value of the kinds ``Request.table`` holds."""
    if isinstance(value, list):
        return "[" + ", ".join(_value(v) for v in value) + "]"
    return _string(str(value))


def _string(text: str) -> str:
    """A TOML basic string."""
    out = []
    for ch in text:
        if ch in '"\\':
            out.append("\\" + ch)
        elif ch.isprintable() and ch != "\x7f":
            out.append(ch)
        else:
            out.append(f"\\u{ord(ch):04x}" if ord(ch) < 0x10000 else f"\\U{ord(ch):08x}")
    return '"' + "".join(out) + '"'


class _Spans(_Scanner):
    """The position scanner, also keeping each value's offsets (start, end)."""

    def __init__(self, text: str) -> None:
        super().__init__(text)
        self.spans: Dict[Path, Tuple[int, int]] = {}

    def value(self, path: Path) -> None:
        self.skip_ws()
        start = self.i
        super().value(path)
        end = self.i
        while end > start and self.s[end - 1] in " \t":  # a bare value ends at ",]}\n#"
            end -= 1
        self.spans[path] = (start, end)

    def offset(self, path: Path) -> int:
        line, col = self.out.keys[path]
        return self.line_starts[line - 1] + col - 1

    def line(self, path: Path) -> int:
        return self.out.keys[path][0]

    def table_span(self, path: Path) -> Tuple[int, int]:
        """From the start of the ``[[…]]`` header's line to the end of the line
        holding its last value."""
        end = max((e for p, (_, e) in self.spans.items() if p[:len(path)] == path),
                  default=self.offset(path))
        tail = _TABLE_TAIL.match(self.s, end)
        if tail is None:
            raise IndexError(end)
        return self.line_starts[self.line(path) - 1], tail.end()


def _scan(text: str) -> _Spans:
    scanner = _Spans(text)
    scanner.document()
    return scanner


def _too_complex(path: str, scanner: _Spans, where: Path, what: str) -> ConfigError:
    line, col = scanner.out.values.get(where, scanner.out.keys.get(where, (1, 1)))
    return ConfigError([f"{path}:{line}:{col}: {what} is written in a form portfwd does not"
                        " edit safely; nothing changed: edit the file by hand, then run"
                        " portfwd check"])


def _cut_table(text: str, path: str, k: int) -> str:
    """``text`` without ``[[forward]]`` number ``k`` and the blank line before it."""
    scanner = _scan(text)
    where: Path = ("forward", k)
    if where not in scanner.out.keys:  # written inline: forward = [{ … }]
        raise _too_complex(path, scanner, where, f"forward[{k}]")
    start = scanner.offset(where)
    line_start = scanner.line_starts[scanner.line(where) - 1]
    if not text[line_start:start].lstrip(" \t").startswith("[["):
        raise _too_complex(path, scanner, where, f"forward[{k}]")
    try:
        first, last = scanner.table_span(where)
    except IndexError:
        raise _too_complex(path, scanner, where, f"forward[{k}]") from None
    if text[max(0, first - 2):first] == "\n\n":
        first -= 1
    return text[:first] + text[last:]


def _cut_element(text: str, path: str, where: Path) -> str:
    """``text`` without one element of an array: its line(s) when it stands alone
    on them, else the element and one comma next to it."""
    scanner = _scan(text)
    start, end = scanner.spans[where]
    line_start = text.rfind("\n", 0, start) + 1
    tail = _LINE_TAIL.match(text, end)
    if not text[line_start:start].strip(" \t") and tail is not None:
        return text[:line_start] + text[tail.end():]
    index = where[-1]
    assert isinstance(index, int)
    after = scanner.spans.get(where[:-1] + (index + 1,))
    if after is not None and _SEPARATOR.match(text[end:after[0]]):
        return text[:start] + text[after[0]:]
    before = scanner.spans.get(where[:-1] + (index - 1,)) if index else None
    if before is not None and _SEPARATOR.match(text[before[1]:start]):
        return text[:before[1]] + text[end:]
    raise _too_complex(path, scanner, where, _dotted(where))


def _dotted(where: Path) -> str:
    return "".join(f"[{p}]" if isinstance(p, int) else ("." if i else "") + p
                   for i, p in enumerate(where))


# -- data --------------------------------------------------------------------------

def _data(text: str, path: str) -> Dict[str, Any]:
    """The parsed document; a file that does not parse is refused as check refuses it."""
    try:
        return tomllib.loads(text)
    except (ValueError, RecursionError):
        parse(text, path)  # raises the located error check prints
        raise


def _validate(new: str, path: str, expected: Dict[str, Any], note: str) -> Config:
    """The new text parses to ``expected`` and passes check's validation."""
    try:
        config = parse(new, path)
    except ConfigError as e:
        raise ConfigError(e.lines + [note]) from None
    if tomllib.loads(new) != expected:
        raise ConfigError([f"{path}: the file is written in a form portfwd does not edit"
                           " safely; nothing changed: edit it by hand, then run portfwd check"])
    return config


def _is_guest(table: Dict[str, Any], guest: str, uuid: Optional[str]) -> bool:
    if table.get("guest") == guest:
        return True
    theirs = table.get("uuid")
    return isinstance(theirs, str) and theirs.lower() in {(uuid or "").lower(), guest.lower()}


def _ports(table: Dict[str, Any]) -> List[Any]:
    ports = table.get("ports")
    return ports if isinstance(ports, list) else []


def parse_spec(spec: str, path: str) -> PortRange:
    try:
        return portspec.parse(spec)
    except portspec.PortSpecError as e:
        raise ConfigError([f"{path}: {e}; nothing changed"]) from None


def _range_of(item: Any) -> Optional[PortRange]:
    """The port range a ``ports`` element stands for (None if it is invalid)."""
    try:
        if isinstance(item, str):
            return portspec.parse(item)
        if isinstance(item, int) and not isinstance(item, bool):
            return portspec.parse(str(item))
        if isinstance(item, dict) and "guest" in item:
            guest, host = str(item["guest"]), str(item.get("host", item["guest"]))
            proto = item.get("proto", "tcp")
            return portspec.make_range(str(proto), portspec.parse_span(host, host),
                                       portspec.parse_span(guest, guest), guest)
    except (portspec.PortSpecError, ValueError):
        return None
    return None


def _spec_text(item: Any) -> str:
    """A ``ports`` element as a port spec (a table as the range it stands for)."""
    if isinstance(item, (str, int)):
        return str(item)
    found = _range_of(item)
    return str(found) if found is not None else "(an invalid port)"


def matches(item: Any, wanted: PortRange, exact: bool) -> bool:
    """Whether a ``ports`` element is the one asked for: the same range; a spec
    without ``HOST:`` names the host side alone (``8080`` matches ``8080:80``)."""
    have = _range_of(item)
    if have is None:
        return False
    if exact or have == wanted:
        return have == wanted
    return (have.proto, have.host_first, have.host_last) == (
        wanted.proto, wanted.host_first, wanted.host_last)
