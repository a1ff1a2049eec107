"""Where each key and value of a TOML document stands (line, column).

tomllib parses but forgets positions; this scanner walks the same text
(already known to be valid TOML) and records them by key path, e.g.
``("forward", 1, "ports", 2)`` for the third element of ``ports`` in the
second ``[[forward]]`` table. Positions are 1-based.
"""

from __future__ import annotations

import bisect
from typing import Dict, List, Tuple, Union

PathPart = Union[str, int]
Path = Tuple[PathPart, ...]
Pos = Tuple[int, int]

_BARE = set("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_-")


class Positions:
    """Key and value positions found in one document."""

    def __init__(self) -> None:
        self.keys: Dict[Path, Pos] = {}
        self.values: Dict[Path, Pos] = {}

    def of(self, path: Path) -> Pos:
        """Position of a value (or its key, or its nearest parent)."""
        while path:
            if path in self.values:
                return self.values[path]
            if path in self.keys:
                return self.keys[path]
            path = path[:-1]
        return (1, 1)

    def of_key(self, path: Path) -> Pos:
        """Position of a key (falls back to its value, then its parent)."""
        if path in self.keys:
            return self.keys[path]
        return self.of(path)


class _Scanner:
    def __init__(self, text: str) -> None:
        self.s = text
        self.i = 0
        self.line_starts = [0]
        for n, ch in enumerate(text):
            if ch == "\n":
                self.line_starts.append(n + 1)
        self.out = Positions()
        self.table_counts: Dict[Path, int] = {}

    def pos(self, i: int) -> Pos:
        line = bisect.bisect_right(self.line_starts, i)
        return (line, i - self.line_starts[line - 1] + 1)

    def peek(self, k: int = 0) -> str:
        j = self.i + k
        return self.s[j] if j < len(self.s) else ""

    def skip_ws(self, newlines: bool = False) -> None:
        while self.i < len(self.s):
            ch = self.s[self.i]
            if ch in " \t\r" or (newlines and ch == "\n"):
                self.i += 1
            elif ch == "#":
                while self.i < len(self.s) and self.s[self.i] != "\n":
                    self.i += 1
            else:
                return

    def string(self) -> str:
        s = self.s
        q = s[self.i]
        if s.startswith(q * 3, self.i):
            end = self.i + 3
            while True:
                if end >= len(s):  # unterminated (not TOML)
                    raise IndexError(end)
                if q == '"' and s[end] == "\\":
                    end += 2
                    continue
                if s.startswith(q * 3, end):
                    while s.startswith(q, end + 3):  # up to two quotes may end it
                        end += 1
                    raw = s[self.i + 3:end]
                    self.i = end + 3
                    return raw
                end += 1
        end = self.i + 1
        while s[end] != q:
            end += 2 if (q == '"' and s[end] == "\\") else 1
        raw = s[self.i + 1:end]
        self.i = end + 1
        return raw

    def key(self) -> List[Tuple[str, int]]:
        """A dotted key: list of (part, offset)."""
        parts: List[Tuple[str, int]] = []
        while True:
            self.skip_ws()
            start = self.i
            if self.peek() in "\"'":
                parts.append((self._key_string(), start))
            else:
                while self.i < len(self.s) and self.s[self.i] in _BARE:
                    self.i += 1
                parts.append((self.s[start:self.i], start))
            self.skip_ws()
            if self.peek() == ".":
                self.i += 1
                continue
            return parts

    def _key_string(self) -> str:
        q = self.s[self.i]
        end = self.i + 1
        chars: List[str] = []
        while self.s[end] != q:
            if q == '"' and self.s[end] == "\\":
                width = {"u": 6, "U": 10}.get(self.s[end + 1], 2)  # \uXXXX, \UXXXXXXXX
                chars.append(_unescape(self.s[end:end + width]))
                end += width
                continue
            chars.append(self.s[end])
            end += 1
        self.i = end + 1
        return "".join(chars)

    def resolve(self, parts: List[str], base: Path = ()) -> Path:
        """Append the current array-of-tables index after each such prefix."""
        path: Path = base
        for part in parts:
            path = path + (part,)
            if path in self.table_counts:
                path = path + (self.table_counts[path],)
        return path

    def value(self, path: Path) -> None:
        self.skip_ws()
        self.out.values[path] = self.pos(self.i)
        ch = self.peek()
        if ch in "\"'":
            self.string()
        elif ch == "[":
            self.i += 1
            index = 0
            while True:
                self.skip_ws(newlines=True)
                if self.peek() == "]":
                    self.i += 1
                    return
                start = self.i
                self.value(path + (index,))
                index += 1
                self.skip_ws(newlines=True)
                if self.peek() == ",":
                    self.i += 1
                elif self.i == start:  # not TOML: give up rather than loop
                    raise IndexError(start)
        elif ch == "{":
            self.i += 1
            while True:
                self.skip_ws(newlines=True)
                if self.peek() == "}":
                    self.i += 1
                    return
                start = self.i
                self.keyval(path)
                self.skip_ws(newlines=True)
                if self.peek() == ",":
                    self.i += 1
                elif self.i == start:
                    raise IndexError(start)
        else:
            while self.i < len(self.s) and self.s[self.i] not in ",]}\n#":
                self.i += 1

    def keyval(self, base: Path) -> None:
        parts = self.key()
        path = base
        for name, offset in parts:
            path = path + (name,)
            self.out.keys.setdefault(path, self.pos(offset))
        self.skip_ws()
        if self.peek() == "=":
            self.i += 1
        self.value(path)

    def document(self) -> Positions:
        current: Path = ()
        while True:
            self.skip_ws(newlines=True)
            if self.i >= len(self.s):
                return self.out
            if self.peek() == "[":
                double = self.peek(1) == "["
                self.i += 2 if double else 1
                header_start = self.i
                parts = self.key()
                names = [p for p, _ in parts]
                if double:
                    parent = self.resolve(names[:-1])
                    full = parent + (names[-1],)
                    count = self.table_counts.get(full, -1) + 1
                    self.table_counts[full] = count
                    current = full + (count,)
                    self.out.keys.setdefault(full, self.pos(header_start))
                else:
                    current = self.resolve(names)
                self.out.keys.setdefault(current, self.pos(header_start))
                self.out.values.setdefault(current, self.pos(header_start))
                while self.i < len(self.s) and self.s[self.i] != "\n":
                    self.i += 1
            else:
                start = self.i
                self.keyval(current)
                if self.i == start:
                    raise IndexError(start)


def _unescape(seq: str) -> str:
    simple = {"\\n": "\n", "\\t": "\t", '\\"': '"', "\\\\": "\\", "\\r": "\r", "\\b": "\b", "\\f": "\f"}
    if seq[1:2] in ("u", "U"):
        try:
            return chr(int(seq[2:], 16))
        except ValueError:
            return seq[1:]
    return simple.get(seq, seq[1:])


def locate(text: str) -> Positions:
    """Positions of every key and value in valid TOML ``text`` (any other text
    gives what was found, or nothing; never an exception)."""
    scanner = _Scanner(text)
    try:
        return scanner.document()
    except IndexError:  # the scanner ran off the end: keep what it found
        return Positions()
    except RecursionError:  # nested deeper than Python recurses: what was found so far
        return scanner.out


def deepest(text: str, limit: int) -> Pos:
    """Where the first array or inline table nested ``limit`` + 1 levels deep opens,
    else the first one of the greatest depth (else 1:1); for locating a document
    too deep to parse, so any text is accepted. Iterative: no depth is too deep."""
    depth, best, at = 0, 0, 0
    i, n = 0, len(text)
    line_start = True  # nothing but blanks since the last newline
    while i < n and best <= limit:
        ch = text[i]
        if ch in "\"'":
            i = _string_end(text, i)
        elif ch == "#":
            end = text.find("\n", i)
            i = n if end < 0 else end
            continue
        elif ch == "[" and depth == 0 and line_start:  # a table header
            end = text.find("\n", i)
            i = n if end < 0 else end
            continue
        elif ch in "[{":
            depth += 1
            if depth > best:
                best, at = depth, i
        elif ch in "]}":
            depth = max(0, depth - 1)
        if ch not in " \t\r":
            line_start = ch == "\n"
        i += 1
    if best == 0:
        return (1, 1)
    return (text.count("\n", 0, at) + 1, at - (text.rfind("\n", 0, at) + 1) + 1)


def _string_end(text: str, i: int) -> int:
    """Index of the last quote of the string opening at ``i`` (or the end of ``text``)."""
    q = text[i]
    width = 3 if text.startswith(q * 3, i) else 1
    j = i + width
    while j < len(text):
        if q == '"' and text[j] == "\\":
            j += 2
        elif text.startswith(q * width, j):
            while width == 3 and text.startswith(q, j + 3):  # up to two more quotes end it
                j += 1
            return j + width - 1
        elif width == 1 and text[j] == "\n":
            return j - 1
        else:
            j += 1
    return len(text)
