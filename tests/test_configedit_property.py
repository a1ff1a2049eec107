"""Property: whatever layout a ports list has, removing some of its ports either gives
exactly the data asked for, with every other line as it was, or (only where a comment
stands among the elements) is refused as too complex; it never raises anything else
and never writes something else."""

from __future__ import annotations

from typing import List, Tuple

from hypothesis import given, settings
from hypothesis import strategies as st

from portfwd.config.configedit import remove
from portfwd.errors import ConfigError
from portfwd.config.toml import tomllib

PATH = "/etc/portfwd/forward.toml"
HEAD = '# mine\n[options]\nstrict = false   # kept\n\n[[forward]]\nguest = "web1"\n'
TAIL = '\n[[forward]]\nguest = "db"\nports = ["5432"]   # kept too\n'


@st.composite
def lists(draw: st.DrawFn) -> Tuple[str, List[str]]:
    """A ports = [...] in some layout, and the specs it lists."""
    count = draw(st.integers(min_value=2, max_value=6))
    specs = [f"{10000 + i}:80" for i in range(count)]
    forms = [draw(st.sampled_from([f'"{s}"', f"{{ host = {10000 + i}, guest = 80 }}"]))
             for i, s in enumerate(specs)]
    text = "ports = ["
    for i, form in enumerate(forms):
        last = i == count - 1
        if draw(st.booleans()):  # on a line of its own
            text += "\n" + draw(st.sampled_from(["", "  ", "\t"])) + form
        else:
            text += draw(st.sampled_from(["", " ", "  "])) + form
        if not last or draw(st.booleans()):
            text += ","
        if draw(st.integers(min_value=0, max_value=4)) == 0:
            text += "   # note"
            text += "\n"
        elif draw(st.integers(min_value=0, max_value=4)) == 0:
            text += "\n  # a line of comment\n"
    text += draw(st.sampled_from(["]", "\n]", " ]"])) + "\n"
    return text, specs


@settings(max_examples=300, deadline=None)
@given(lists(), st.data())
def test_removing_ports_is_exact_or_refused(layout: Tuple[str, List[str]],
                                            data: st.DataObject) -> None:
    ports, specs = layout
    before = HEAD + ports + TAIL
    expected = tomllib.loads(before)
    gone = data.draw(st.lists(st.sampled_from(specs), min_size=1, max_size=len(specs) - 1,
                              unique=True))
    try:
        done = remove(before, PATH, "web1", None, gone)
    except ConfigError as e:  # only where a comment stands among the elements
        assert "does not edit safely" in e.lines[-1] and "#" in ports, (e.lines, ports)
        return
    kept = [p for p, s in zip(expected["forward"][0]["ports"], specs) if s not in gone]
    expected["forward"][0]["ports"] = kept
    assert tomllib.loads(done.text) == expected
    assert done.text.startswith(HEAD) and done.text.endswith(TAIL)


@settings(max_examples=100, deadline=None)
@given(lists())
def test_removing_the_guest_gives_back_what_surrounds_it(layout: Tuple[str, List[str]]) -> None:
    ports, _ = layout
    done = remove(HEAD + ports + TAIL, PATH, "web1", None, [])
    assert done.text == HEAD[:HEAD.index("\n[[forward]]")] + TAIL
