"""hooks.json read as the old hook read it: JSON with ``//`` and ``/* */`` comments,
every value's offset recorded by its path (``pointer`` names a path in messages),
numbers no port can be kept as their text (``Number``). Pure."""

from __future__ import annotations

import json
import math
import re
from typing import Any, Dict, List, Tuple, Union

MAX_DEPTH = 20
MAX_DIGITS = 18  # a longer integer is no port or count: kept as text (Number)
SHOWN_MAX = 60  # characters of a value quoted in a message
NUMBER = re.compile(r"-?(?:0|[1-9][0-9]*)(\.[0-9]+)?([eE][+-]?[0-9]+)?")
STRING = re.compile(r'"(?:[^"\\\x00-\x1f]|\\.)*"')
BARE = re.compile(r"[A-Za-z0-9_-]+\Z")

Path = Tuple[Union[str, int], ...]


def strip_comments(text: str) -> str:
    """``text`` with ``//`` and ``/* */`` comments outside strings blanked out
    (newlines kept), so offsets still point into the original. ConfigError
    (message without file) on an unterminated comment."""
    out = list(text)
    i, n = 0, len(text)
    while i < n:
        c = text[i]
        if c == '"':
            i += 1
            while i < n and text[i] != '"':
                i += 2 if text[i] == "\\" else 1
            i += 1
        elif text.startswith("//", i):
            while i < n and text[i] not in "\r\n":
                out[i] = " "
                i += 1
        elif text.startswith("/*", i):
            end = text.find("*/", i + 2)
            if end < 0:
                raise JSONSyntaxError(i, "comment /* is never closed with */")
            for j in range(i, end + 2):
                if out[j] not in "\r\n":
                    out[j] = " "
            i = end + 2
        else:
            i += 1
    return "".join(out)


class Number:
    """A JSON number beyond what a port or a count can be and beyond what Python
    holds as given (more than MAX_DIGITS digits; a float that overflows): its text."""

    __slots__ = ("text", "integer")

    def __init__(self, text: str, integer: bool) -> None:
        self.text = text
        self.integer = integer

    def __repr__(self) -> str:
        digits = sum(c.isdigit() for c in self.text)
        if len(self.text) <= 24:
            return self.text
        return f"{self.text[:12]}...{self.text[-4:]} ({digits} digits)"

    @property
    def negative(self) -> bool:
        return self.text.startswith("-")


def shown(value: Any) -> str:
    """A JSON value as a message quotes it: JSON text, a Number as its shortened
    text, at most SHOWN_MAX characters."""
    if isinstance(value, Number):
        text = repr(value)
    elif isinstance(value, list):
        text = "[" + ", ".join(shown(v) for v in value[:SHOWN_MAX]) + "]"
    elif isinstance(value, dict):
        text = "{" + ", ".join(f"{shown(k)}: {shown(v)}"
                               for k, v in list(value.items())[:SHOWN_MAX]) + "}"
    elif isinstance(value, str):
        text = json.dumps(value[:SHOWN_MAX + 1])
    else:
        text = json.dumps(value)
    return text if len(text) <= SHOWN_MAX else text[:SHOWN_MAX - 3] + "..."


class JSONSyntaxError(Exception):
    def __init__(self, offset: int, message: str) -> None:
        super().__init__(message)
        self.offset = offset
        self.message = message


class Reader:
    """A JSON reader that records the offset of every value by its path."""

    def __init__(self, text: str) -> None:
        self.s = text
        self.i = 0
        self.at: Dict[Path, int] = {}

    def document(self) -> Any:
        value = self.value((), 0)
        self.space()
        if self.i < len(self.s):
            raise JSONSyntaxError(self.i, "text after the end of the JSON document")
        return value

    def space(self) -> None:
        while self.i < len(self.s) and self.s[self.i] in " \t\r\n":
            self.i += 1

    def value(self, path: Path, depth: int) -> Any:
        self.space()
        if depth > MAX_DEPTH:
            raise JSONSyntaxError(self.i, f"nested more than {MAX_DEPTH} levels deep")
        self.at[path] = self.i
        c = self.s[self.i:self.i + 1]
        if c == "{":
            return self.object(path, depth)
        if c == "[":
            return self.array(path, depth)
        if c == '"':
            return self.string()
        for word, v in (("true", True), ("false", False), ("null", None)):
            if self.s.startswith(word, self.i):
                self.i += len(word)
                return v
        m = NUMBER.match(self.s, self.i)
        if m:
            self.i = m.end()
            return number(m.group(), integer=not (m.group(1) or m.group(2)))
        if not c:
            raise JSONSyntaxError(self.i, "the document ends where a value should be")
        raise JSONSyntaxError(self.i, f"unexpected {c!r} where a value should be")

    def string(self) -> str:
        m = STRING.match(self.s, self.i)
        if not m:
            raise JSONSyntaxError(self.i, "unterminated string, or a control character in it")
        try:
            text = json.loads(m.group())
        except ValueError:
            raise JSONSyntaxError(self.i, "bad escape in string") from None
        if any("\ud800" <= c <= "\udfff" for c in text):  # "\ud800" alone: no character
            raise JSONSyntaxError(self.i, "a \\u escape of half a surrogate pair names no"
                                       " character")
        self.i = m.end()
        return str(text)

    def expect(self, chars: str, what: str) -> str:
        self.space()
        c = self.s[self.i:self.i + 1]
        if not c or c not in chars:
            raise JSONSyntaxError(self.i, f"expected {what}")
        self.i += 1
        return c

    def trailing_comma(self, closing: str) -> None:
        """A ``,`` right before ``closing``: JSON allows none there (JavaScript does)."""
        comma = self.s.rindex(",", 0, self.i)
        line = self.s.count("\n", 0, comma) + 1
        raise JSONSyntaxError(comma, f"trailing comma after line {line}: JSON allows no ',' before"
                                  f" '{closing}'; remove it")

    def object(self, path: Path, depth: int) -> Dict[str, Any]:
        self.i += 1
        out: Dict[str, Any] = {}
        self.space()
        if self.s[self.i:self.i + 1] == "}":
            self.i += 1
            return out
        while True:
            self.space()
            if self.s[self.i:self.i + 1] == "}":
                self.trailing_comma("}")
            if self.s[self.i:self.i + 1] != '"':
                raise JSONSyntaxError(self.i, "expected a key in double quotes")
            key_at = self.i
            key = self.string()
            self.expect(":", "':' after the key")
            out[key] = self.value(path + (key,), depth + 1)  # a repeated key: the last wins, as in json
            self.at[path + (key, "<key>")] = key_at
            if self.expect(",}", "',' or '}'") == "}":
                return out

    def array(self, path: Path, depth: int) -> List[Any]:
        self.i += 1
        out: List[Any] = []
        self.space()
        if self.s[self.i:self.i + 1] == "]":
            self.i += 1
            return out
        while True:
            self.space()
            if self.s[self.i:self.i + 1] == "]":
                self.trailing_comma("]")
            out.append(self.value(path + (len(out),), depth + 1))
            if self.expect(",]", "',' or ']'") == "]":
                return out


def number(text: str, integer: bool) -> Any:
    """A JSON number's value: int, float, or a Number when out of every range here."""
    if integer:
        return int(text) if len(text.lstrip("-")) <= MAX_DIGITS else Number(text, True)
    value = float(text)  # float() has no digit limit; too large a value is inf
    return value if math.isfinite(value) else Number(text, False)


def pointer(path: Path) -> str:
    """``web1[0].port_map.tcp[1]``; a name that is not a bare word is quoted."""
    out = ""
    for part in path:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            name = part if BARE.match(part) else json.dumps(part, ensure_ascii=False)
            out += f".{name}" if out else name
    return out
