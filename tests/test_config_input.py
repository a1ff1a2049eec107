"""Hostile or odd forward.toml text gives located errors, never a traceback (issue
"Safe to leave running on a production host")."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from typing import List

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from portfwd import config
from portfwd.rundir import state
from portfwd.errors import ConfigError
from portfwd.config.tomlpos import deepest, locate

FWD = '[[forward]]\nguest = "a"\nipv4 = "10.0.0.1"\n'
DEEP = "arrays or inline tables nested too deeply (forward.toml needs 3 levels at most)"


def errors(text: str) -> List[str]:
    with pytest.raises(ConfigError) as e:
        config.parse(text, "f.toml")
    return e.value.lines


@pytest.mark.parametrize("text, expected", [
    ("a = " + "[" * 100000, f"f.toml:1:55: TOML syntax: {DEEP}"),
    ("a = " + "[" * 100000 + "]" * 100000, f"f.toml:1:55: TOML syntax: {DEEP}"),
    ("a = " + "{b = " * 100000, f"f.toml:1:255: TOML syntax: {DEEP}"),
    (FWD + 'ports = [\n "# [[[", """\n[[[\n""",\n' + "[" * 5000,
     f"f.toml:8:50: TOML syntax: {DEEP}"),
    ("[[forward]]\nports = [" + "{a = [" * 50000, f"f.toml:2:159: TOML syntax: {DEEP}"),
])
def test_deep_nesting_is_a_located_error(text: str, expected: str) -> None:
    assert errors(text) == [expected]


def test_shallow_nesting_is_checked_as_usual() -> None:
    assert errors(FWD + "ports = [" + "[" * 40 + "]" * 40 + "]\n") == [
        "f.toml:4:10: forward[0].ports[0]: expected a port spec string, a port number or a table,"
        " got a list"]


@pytest.mark.parametrize("text, expected", [
    ("a = 1\x00\n", "f.toml:1:6: TOML syntax: Expected newline or end of document after a statement"),
    ("\x00", "f.toml:1:1: TOML syntax: Invalid statement"),
    ('"a\\u0000b" = 1\n',
     "f.toml:1:1: \"a\\u0000b\": unknown key 'a\\x00b'; known keys: options, forward"),
    ('[options]\n"\\u001b[31m" = 1\n',
     "f.toml:2:1: options.\"\\u001b[31m\": unknown key '\\x1b[31m'; known keys: table, listen,"),
    ('[[forward]]\nguest = "web\\u0000"\nipv4 = "10.0.0.1"\nports = [80]\n',
     "f.toml:2:9: forward[0].guest: 'web\\x00' is not a libvirt domain name"),
    ('[[forward]]\nguest = "web\\tx"\nipv4 = "10.0.0.1"\nports = [80]\n',
     "f.toml:2:9: forward[0].guest: 'web\\tx' is not a libvirt domain name"),
    ("a = " + "1" * 5000 + "\n", "f.toml:1:5: TOML syntax: a number too long to read"),
    (FWD + "ports = [0x" + "f" * 5000 + "]\n",
     "f.toml:4:10: forward[0].ports[0]: port 0xffffffffffffffffff… (5002 characters) not in"
     " 1..65535"),
    (FWD + "ports = [{guest = 0b1" + "0" * 20000 + "}]\n",
     "f.toml:4:10: forward[0].ports[0].host: port a number of more than 4300 digits not in"
     " 1..65535"),
    ('[[forward]]\nguest = 0o7' + "7" * 5000 + "\nipv4 = '10.0.0.1'\nports = [80]\n",
     "f.toml:2:9: forward[0].guest: expected a domain name string, got an integer"
     " (0o777777777777777777… (5003 characters))"),
    ('[[forward]]\nguest = "a"\nipv6 = "fd00::1%eth0"\nports = [80]\n',
     "f.toml:3:8: forward[0].ipv6: 'fd00::1%eth0': a guest address has no zone index (%…);"
     " write the address alone"),
    (FWD + 'listen = ["2001:db8::1%x"]\nports = [80]\n',
     "f.toml:4:11: forward[0].listen[0]: '2001:db8::1%x': a listen address has no zone index (%…);"
     " to listen on an interface's addresses, give the interface's name"),
    (FWD + 'from = ["2001:db8::%\\u0000/64"]\nports = [80]\n',
     "f.toml:4:9: forward[0].from[0]: '2001:db8::%\\x00/64': a source network has no zone index"
     " (%…)"),
    ("\ufeff[options]\n", "f.toml:1:1: the file starts with a byte-order mark (U+FEFF), which TOML"
                          " does not allow (an editor saved it as \"UTF-8 with BOM\"); save it as"
                          " plain UTF-8, e.g. sed -i '1s/^\\xEF\\xBB\\xBF//' f.toml"),
])
def test_odd_input_is_a_located_error(text: str, expected: str) -> None:
    lines = errors(text)
    assert lines[0].startswith(expected), lines
    assert all("\x00" not in line and "\x1b" not in line and "\n" not in line for line in lines)


def test_duplicate_and_adjacent_from_networks_are_fine() -> None:
    parsed = config.parse(FWD + 'from = ["192.0.2.0/25", "192.0.2.128/25", "192.0.3.5",'
                          ' "192.0.3.5/32", "192.0.2.0/25", "2001:db8::/33", "2001:db8:8000::/33"]'
                          '\nports = [80]\n', "f.toml")
    assert [str(n) for n in parsed.forwards[0].ports[0].sources] == [
        "192.0.2.0/25", "192.0.2.128/25", "192.0.3.5/32", "2001:db8::/33", "2001:db8:8000::/33"]


def test_check_command_on_deep_nesting_exits_1_without_traceback(tmp_path: str) -> None:
    path = os.path.join(str(tmp_path), "deep.toml")
    with open(path, "w") as f:
        f.write(FWD + "ports = " + "[" * 100000 + "\n")
    env = dict(os.environ)
    env.pop(state.ENV_CONFIG, None)
    r = subprocess.run([sys.executable, "-m", "portfwd.cli", "check", "--config", path], env=env,
                       capture_output=True, text=True, timeout=60)
    assert (r.returncode, r.stdout) == (1, ""), r.stderr
    assert r.stderr == f"{path}:4:59: TOML syntax: {DEEP}\n"


def test_deepest_skips_strings_comments_and_headers() -> None:
    text = '[[a]]\n[b.c]\nx = "[[[" # [[[\ny = \'\'\'[[[\n\'\'\'\nz = [[1], {q = [2]}]\n'
    assert deepest(text, 5) == (6, 16)  # the first of the greatest depth
    assert deepest("", 5) == (1, 1)
    assert deepest("x = '[[[", 5) == (1, 1)


TOKENS = st.sampled_from([
    "[", "]", "[[", "]]", "{", "}", "=", ",", ".", "\n", " ", "#", '"', "'", '"""', "'''",
    "\\", "\x00", "\r", "\t", "a", "forward", "options", "guest", "ports", "listen", "from",
    "ipv4", "ipv6", '"web1"', '"10.0.0.1"', '"80"', "80", "0x50", "1e9", "true", "-",
    '"10.0.0.0/8"', '"eth0"', "\ufeff", "é", "1979-05-27", "inf",
])


@settings(max_examples=400, deadline=None)
@given(st.lists(TOKENS, max_size=60))
def test_any_text_gives_a_config_or_located_errors(tokens: List[str]) -> None:
    text = "".join(tokens)
    try:
        config.parse(text, "f.toml")
    except ConfigError as e:
        assert e.lines and all(line.startswith("f.toml:") for line in e.lines)
    locate(text)  # on any text, valid or not: no exception, no hang


def _check_as(user: str, path: str, *args: str) -> "subprocess.CompletedProcess[str]":
    """``portfwd check`` as ``user``, with this source tree."""
    src = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "src")
    return subprocess.run(["runuser", "-u", user, "--", "env", f"PYTHONPATH={src}", "LC_ALL=C",
                           "/usr/bin/python3", "-m", "portfwd.cli", "check", "-c", path, *args],
                          capture_output=True, text=True, cwd="/")


@pytest.mark.skipif(os.geteuid() != 0 or shutil.which("runuser") is None,
                    reason="needs root to become another user")
def test_check_as_non_root_says_once_it_cannot_see_the_firewall() -> None:
    import tempfile

    with tempfile.TemporaryDirectory() as folder:  # below /tmp: pytest's are root's alone
        os.chmod(folder, 0o755)
        path = os.path.join(folder, "forward.toml")
        with open(path, "w", encoding="utf-8") as f:
            f.write('[[forward]]\nguest = "web1"\nipv4 = "192.168.122.10"\nports = ["8080:80"]\n')
        r = _check_as("nobody", path)
    assert r.returncode == 0, r
    assert r.stdout == f"{path}: OK: 1 port forward for 1 guest, table inet portfwd; 1 warning\n"
    assert r.stderr == (f"{path}: warning: not root: cannot see the firewall (nftables lists it"
                        " to root alone); the configuration was checked, run `portfwd check` as"
                        " root to see whether anything blocks forwarded traffic\n")


def test_check_an_empty_file_warns_that_nothing_is_forwarded(tmp_path: "os.PathLike[str]") -> None:
    path = os.path.join(str(tmp_path), "forward.toml")
    with open(path, "w", encoding="utf-8") as f:
        f.write("# nothing yet\n")
    r = subprocess.run([sys.executable, "-m", "portfwd.cli", "check", "-c", path, "--json"],
                       capture_output=True, text=True)
    report = json.loads(r.stdout)
    assert report["warnings"][0] == {"file": path, "line": None, "column": None,
                                     "message": "no forwards configured",
                                     "hint": 'add one, e.g. [[forward]] guest = "web1" ports ='
                                             ' ["8080:80"] (one key a line)'}
    text = subprocess.run([sys.executable, "-m", "portfwd.cli", "check", "-c", path],
                          capture_output=True, text=True)
    assert text.stdout.startswith(f"{path}: OK: 0 port forwards for 0 guests, table inet"
                                  " portfwd; ")
    assert "no forwards configured" in text.stderr


@pytest.mark.parametrize("text, expected", [
    ('[[forward]]\nguest = web1\nports = ["80"]\n',
     'f.toml:2:9: TOML syntax: strings need quotes: guest = "web1"'),
    ('[[forward]]\nguest = "a"\nlisten = [eth0]\nports = ["80"]\n',
     'f.toml:3:11: TOML syntax: strings need quotes: "eth0"'),
    ('[[forward]]\nguest = "a"\nipv4 = 10.0.0.1\nports = ["80"]\n',
     'f.toml:3:8: TOML syntax: strings need quotes: ipv4 = "10.0.0.1"'),
    ("[options]\nstrict = True\n",
     "f.toml:2:10: TOML syntax: True is not a TOML value: write true (booleans are true or"
     " false, in lower case)"),
    (FWD + 'ports = ["80"]\nguest = "b"\n',
     "f.toml:5:1: TOML syntax: key 'guest' is set twice in one table: on line 2 and on line 5;"
     " keep one"),
    ('[options]\ntable = "a"\n[options]\n',
     "f.toml:3:1: TOML syntax: table [options] is declared twice (first on line 1): put its keys"
     " under one [options]"),
    ("[options]\nstrict = 1\n", "f.toml:2:10: options.strict: expected true or false, got an"
                                " integer (1)"),
    (FWD + "ports = [true]\n", "f.toml:4:10: forward[0].ports[0]: expected a port spec string,"
                               " a port number or a table, got a boolean (true)"),
    (FWD + "ports = [1234567890123456789012345678901234567890]\n",
     "f.toml:4:10: forward[0].ports[0]: port 1234567890123456789012345678901234567890 not in"
     " 1..65535"),
    (FWD + "ports = [0x1_0000]\n", "f.toml:4:10: forward[0].ports[0]: port 0x1_0000 not in 1..65535"),
    (FWD + "ports = [{ host = -1, guest = 80 }]\n",
     "f.toml:4:19: forward[0].ports[0].host: port -1 not in 1..65535"),
    (FWD + 'ports = ["8086-:80"]\n',
     "f.toml:4:10: forward[0].ports[0]: '8086-:80': the range '8086-' has no last port (write"
     " 8086-END, or 8086 alone); accepted forms: \"8080:80\", \"80\""),
    ('[[forward]]\nguest = "web1\u200b"\nipv4 = "10.0.0.1"\nports = [80]\n',
     "f.toml:2:9: forward[0].guest: 'web1\\u200b' is not a libvirt domain name: invisible"
     " character U+200B (zero width space) at column 14; retype the name"),
])
def test_common_slips_are_named_with_the_fix(text: str, expected: str) -> None:
    lines = errors(text)
    assert lines[0].startswith(expected), lines


def test_listen_warnings_point_at_the_listen_entry() -> None:
    parsed = config.parse('[[forward]]\nguest = "a"\nipv4 = "10.0.0.1"\n'
                          'listen = ["192.0.2.1", "2001:db8::1"]\nports = ["80", "443"]\n', "f.toml")
    assert parsed.warnings == (
        "f.toml:4:24: warning: forward[0].listen[1]: listen address 2001:db8::1 is unused by"
        " forward[0] (a): it has no ipv6 guest address",)
