"""Property: every key and value that tomllib parses from a document gets a
position from tomlpos, and a scalar's position is where its text stands."""

from __future__ import annotations

import json
from typing import Any, Dict, List, Tuple

from hypothesis import given, settings
from hypothesis import strategies as st

from portfwd.config.toml import tomllib
from portfwd.config.tomlpos import Path, locate

BARE = "abcXYZ019_-"
KEY_CHARS = BARE + " .\"'\\é#=[]"

keys = st.text(alphabet=KEY_CHARS, min_size=1, max_size=6)
scalars = st.one_of(
    st.integers(min_value=-10**6, max_value=10**6),
    st.booleans(),
    st.text(alphabet="ab \"'\\\té#[]{},=\n", max_size=8),
)
values = st.recursive(
    scalars,
    lambda inner: st.one_of(st.lists(inner, max_size=3),
                            st.dictionaries(keys, inner, max_size=3)),
    max_leaves=8,
)
tables = st.recursive(
    st.dictionaries(keys, values, max_size=3),
    lambda inner: st.dictionaries(keys, st.one_of(values, inner,
                                                  st.lists(inner, min_size=1, max_size=2)),
                                  max_size=3),
    max_leaves=6,
)


def _key(k: str, style: int) -> str:
    if style % 3 == 0 and k and set(k) <= set(BARE):
        return k
    if style % 3 == 1 and "'" not in k and "\n" not in k:
        return f"'{k}'"
    return json.dumps(k, ensure_ascii=False)


def _scalar(v: Any, style: int) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v)
    if style % 2 and not set(v) & set("'\n\t"):
        return f"'{v}'"
    return json.dumps(v, ensure_ascii=False)


class Writer:
    """TOML text for a parsed structure, in varied but valid styles; remembers the
    text each scalar was written as, by path."""

    def __init__(self, style: int) -> None:
        self.style = style
        self.lines: List[str] = []
        self.texts: Dict[Path, str] = {}

    def _next(self) -> int:
        self.style = (self.style * 7 + 3) % 101
        return self.style

    def value(self, v: Any, path: Path) -> str:
        if isinstance(v, list):
            sep = ",\n  # comment\n  " if self._next() % 4 == 0 else ", "
            items = [self.value(x, path + (i,)) for i, x in enumerate(v)]
            return "[" + sep.join(items) + ("," if items and self._next() % 3 == 0 else "") + "]"
        if isinstance(v, dict):
            items = [f"{_key(k, self._next())} = {self.value(x, path + (k,))}" for k, x in v.items()]
            return "{" + ", ".join(items) + "}"
        text = _scalar(v, self._next())
        self.texts[path] = text
        return text

    def table(self, t: Dict[str, Any], path: Path, header: Tuple[str, ...]) -> None:
        later: List[Tuple[str, Any]] = []
        for k, v in t.items():
            if isinstance(v, dict) and v and self._next() % 2 or _tables(v):
                later.append((k, v))
            else:
                self.lines.append(f"{_key(k, self._next())} = {self.value(v, path + (k,))}"
                                  + ("  # note" if self._next() % 5 == 0 else ""))
        for k, v in later:
            head = header + (_key(k, self._next()),)
            if isinstance(v, dict):
                self.lines.append(f"\n[{'.'.join(head)}]")
                self.table(v, path + (k,), head)
            else:
                for i, item in enumerate(v):
                    self.lines.append(f"\n[[{'.'.join(head)}]]")
                    self.table(item, path + (k, i), head)


def _tables(v: Any) -> bool:
    return isinstance(v, list) and bool(v) and all(isinstance(x, dict) for x in v)


def _paths(obj: Any, path: Path = ()) -> List[Path]:
    out = [path] if path else []
    if isinstance(obj, dict):
        for k, v in obj.items():
            out += _paths(v, path + (k,))
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            out += _paths(v, path + (i,))
    return out


@settings(max_examples=300, deadline=None)
@given(tables, st.integers(min_value=0, max_value=100))
def test_every_parsed_key_and_value_has_a_position(doc: Dict[str, Any], style: int) -> None:
    w = Writer(style)
    w.table(doc, (), ())
    text = "\n".join(w.lines) + "\n"
    parsed = tomllib.loads(text)
    assert parsed == doc
    pos = locate(text)
    lines = text.split("\n")
    for path in _paths(parsed):
        assert path in pos.values or path in pos.keys, (path, text)
        if path in w.texts:
            line, col = pos.values[path]
            assert lines[line - 1][col - 1:].startswith(w.texts[path].split("\n")[0]), \
                (path, text)
