"""portfwd add / remove as text edits (configedit): every byte not edited stays,
remove undoes add exactly, the result is validated as check validates it, and a
form too complex to edit safely is refused rather than corrupted."""

from __future__ import annotations

import glob
import os
from typing import List

import pytest

from portfwd.config import parse
from portfwd.config.configedit import Request, add, remove
from portfwd.errors import ConfigError
from portfwd.config.portspec import FORMS
from portfwd.config.toml import tomllib

HERE = os.path.dirname(os.path.abspath(__file__))
EXAMPLE = os.path.join(HERE, "..", "config", "forward.toml")
FILES = sorted(glob.glob(os.path.join(HERE, "data", "valid", "*.toml"))) + [EXAMPLE]
PATH = "/etc/portfwd/forward.toml"


def text_of(path: str) -> str:
    with open(path, encoding="utf-8") as f:
        return f.read()


def errors(call: "object") -> List[str]:
    with pytest.raises(ConfigError) as e:
        call()  # type: ignore[operator]
    return e.value.lines


@pytest.mark.parametrize("path", FILES, ids=os.path.basename)
def test_remove_gives_back_exactly_what_add_was_given(path: str) -> None:
    before = text_of(path)
    added = add(before, PATH, Request("newguest", ["18080:80", "15353/udp"],
                                      ipv4="192.168.122.77", sources=["198.51.100.0/24"]))
    assert added.text.startswith(before + "\n[[forward]]\n")
    assert remove(added.text, PATH, "newguest", None, []).text == before


def test_add_appends_one_table_after_one_blank_line() -> None:
    before = '[options]\ntable = "pf"   # mine\n'
    done = add(before, PATH, Request("web 1", ["8080:80", "53"], ipv6="::10",
                                     listen=["eth0"], protos=["tcp", "udp"]))
    assert done.text == before + ('\n[[forward]]\nguest = "web 1"\nipv6 = "::10"\n'
                                  'listen = ["eth0"]\nports = ["8080:80", "8080:80/udp", "53",'
                                  ' "53/udp"]\n')
    assert done.first_line == 4
    assert done.changes == [f"{PATH}:4: added [[forward]] for guest web 1:"
                            " 8080:80 8080:80/udp 53 53/udp"]
    assert parse(done.text).forwards[0].guest == "web 1"


def test_add_to_an_empty_file_and_to_one_without_a_last_newline() -> None:
    assert add("", PATH, Request("a", ["80"])).text == '[[forward]]\nguest = "a"\nports = ["80"]\n'
    assert add("# x", PATH, Request("a", ["80"])).text.startswith("# x\n\n[[forward]]\n")


def test_add_by_uuid_writes_uuid_instead_of_guest() -> None:
    uuid = "1b4e28ba-2fa1-11d2-883f-0016d3cca427"
    done = add("", PATH, Request("web1", ["80"], uuid=uuid))
    assert tomllib.loads(done.text) == {"forward": [{"uuid": uuid, "ports": ["80"]}]}
    assert remove(done.text, PATH, "web1", uuid, []).text == ""
    assert remove(done.text, PATH, uuid, None, []).text == ""


def test_a_name_toml_would_misread_is_escaped() -> None:
    done = add("", PATH, Request('we"b\\1', ["80"]))
    assert tomllib.loads(done.text)["forward"][0]["guest"] == 'we"b\\1'


def test_a_refused_add_says_where_and_what_as_check_does() -> None:
    before = text_of(EXAMPLE)
    n = before.count("\n")
    lines = errors(lambda: add(before, PATH, Request("web2", ["8080:80"])))
    assert lines == [
        f"{PATH}:{n + 4}:10: forward[1].ports[0]: host port 8080/tcp on every IPv4 address is"
        f" claimed twice: here for web2 and at {PATH}:57:3 (forward[0].ports[0]) for web1;"
        " use another host port or listen address",
        f"{PATH}: not changed: lines {n + 2}-{n + 4} would hold the new [[forward]]"]
    lines = errors(lambda: add(before, PATH, Request("web2", ["8081:80", "70000"], ipv4="::1")))
    assert lines == [
        f"{PATH}:{n + 4}:8: forward[1].ipv4: ::1 is an IPv6 address; put it in ipv6",
        f"{PATH}:{n + 5}:21: forward[1].ports[1]: '70000': port 70000 not in 1..65535",
        f"{PATH}: not changed: lines {n + 2}-{n + 5} would hold the new [[forward]]"]


def test_add_refuses_a_file_check_refuses() -> None:
    assert errors(lambda: add("[options\n", PATH, Request("a", ["80"])))[0].startswith(
        f"{PATH}:1:9: TOML syntax:")
    # forwards written as an inline array: a [[forward]] header would redefine them
    lines = errors(lambda: add('forward = [{guest = "a", ports = ["80"]}]\n', PATH,
                               Request("b", ["81"])))
    assert lines[0].startswith(f"{PATH}:3:10: TOML syntax:")


LIST = '''# head
[[forward]]
guest = "web1"    # the web server
ports = [
  "8080:80",      # http
  "2222:22",
  { host = 8443, guest = 443 },
]

[[forward]]
guest = "db"
ports = ["5432", "6432:5432", 9000]   # inline
'''


@pytest.mark.parametrize("spec, gone", [
    ("2222:22", '  "2222:22",\n'),
    ("8080", '  "8080:80",      # http\n'),         # the host side names it
    ("8443:443/tcp", "  { host = 8443, guest = 443 },\n"),
])
def test_removing_one_port_of_a_list_takes_its_line(spec: str, gone: str) -> None:
    done = remove(LIST, PATH, "web1", None, [spec])
    assert done.text == LIST.replace(gone, "", 1)
    assert done.changes[0].startswith(f"{PATH}:2: removed from the ports of guest web1: ")


@pytest.mark.parametrize("specs, ports", [
    (["5432"], '["6432:5432", 9000]'),
    (["6432:5432"], '["5432", 9000]'),
    (["9000"], '["5432", "6432:5432"]'),
    (["6432:5432", "9000"], '["5432"]'),
    (["5432", "9000"], '["6432:5432"]'),
])
def test_removing_ports_of_a_one_line_list_edits_just_that_list(specs: List[str],
                                                                 ports: str) -> None:
    done = remove(LIST, PATH, "db", None, specs)
    assert done.text == LIST.replace('["5432", "6432:5432", 9000]', ports)


def test_removing_every_port_removes_the_table_and_the_blank_line_before_it() -> None:
    assert remove(LIST, PATH, "db", None, ["5432", "6432:5432", "9000"]).text == \
        LIST[:LIST.index("\n[[forward]]\nguest = \"db\"")]
    done = remove(LIST, PATH, "web1", None, [])
    assert done.text == "# head\n" + LIST[LIST.index("\n[[forward]]\nguest = \"db\""):]
    assert done.changes == [f"{PATH}:2: removed [[forward]] for guest web1"]


def test_remove_says_what_the_guest_forwards_when_a_port_is_not_there() -> None:
    assert errors(lambda: remove(LIST, PATH, "web1", None, ["8081"])) == [
        f"{PATH}: guest web1 forwards no port 8081; it forwards 8080:80, 2222:22,"
        " 8443:443/tcp; nothing changed"]
    assert errors(lambda: remove(LIST, PATH, "nobody", None, [])) == [
        f"{PATH}: no [[forward]] names guest nobody; nothing changed (portfwd check lists"
        " the file's forwards)"]
    assert errors(lambda: remove(LIST, PATH, "web1", None, ["80x"])) == [
        f"{PATH}: '80x': '80x' is not a port number; {FORMS}; nothing changed"]


def test_a_form_too_complex_is_refused_and_never_corrupted() -> None:
    # a comment between the two elements: neither goes with a comma next to it alone
    before = '[[forward]]\nguest = "a"\nports = ["80", # c\n "81"]\n'
    for spec, at in (("80", "3:10"), ("81", "4:2")):
        assert errors(lambda: remove(before, PATH, "a", None, [spec])) == [
            f"{PATH}:{at}: forward[0].ports[{int(spec) - 80}] is written in a form portfwd"
            " does not edit safely; nothing changed: edit the file by hand, then run portfwd check"]


@pytest.mark.parametrize("spec, left", [("80", "81"), ("81", "80")])
def test_an_element_goes_with_the_comma_and_line_break_next_to_it(spec: str, left: str) -> None:
    before = '[[forward]]\nguest = "a"\nports = ["80",\n  "81"]\n'
    done = remove(before, PATH, "a", None, [spec])
    assert done.text == f'[[forward]]\nguest = "a"\nports = ["{left}"]\n'


def test_forwards_written_inline_are_refused_not_cut() -> None:
    before = 'forward = [{guest = "a", ports = ["80"]}]\n'
    lines = errors(lambda: remove(before, PATH, "a", None, []))
    assert lines == [f"{PATH}:1:12: forward[0] is written in a form portfwd does not edit"
                     " safely; nothing changed: edit the file by hand, then run portfwd check"]
