"""Bad input, generated: forward.toml documents (valid and broken) and hook argv and
stdin (truncated, huge or malformed XML, unknown operations, names with quotes,
newlines and nft syntax). Never a traceback; a user error always carries
FILE:LINE:COL; a hook never adds a rule the input did not ask for and never
removes a valid one."""

from __future__ import annotations

import re
import subprocess
import sys
from typing import List

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pfhost import HOOK, PortfwdHost, domain_xml, web1_config
from portfwd.config import parse
from portfwd.errors import ConfigError

LOCATED = re.compile(r"^<fuzz>:\d+:\d+: ")

# pieces of forward.toml, valid and not, glued at random
KEYS = st.sampled_from(["guest", "uuid", "ipv4", "ipv6", "ports", "listen", "from", "interface",
                        "localhost", "table", "strict", "discover", "gu\u00e9st", "ports\x00",
                        "\"quoted key\"", "a.b", "1"])
VALUES = st.one_of(
    st.sampled_from(['"web1"', '"192.168.150.10"', '"fd00::10"', '["8080:80"]', '["1-65535"]',
                     '["6000-6009:7000-7009/udp"]', '["99999"]', '[80, "x"]', "true", "1e999",
                     '"\\u0000"', '["eth0", "203.0.113.5"]', '["10.0.0.0/8", "10.1.0.0/16"]',
                     '"52:54:00:12:34:56"', "[[[[[[[[[[1]]]]]]]]]]", "{ a = { b = { c = 1 } } }",
                     '["reservation", "agent"]', "0x7fffffffffffffff", '"\U0001F600"']),
    st.text(max_size=12).map(lambda t: '"' + t.replace("\\", "\\\\").replace('"', '\\"')
                             .replace("\n", "\\n").replace("\r", "\\r") + '"'),
    st.integers(-70000, 70000).map(str))
LINES = st.one_of(
    st.sampled_from(["[[forward]]", "[options]", "[forward]", "[[forward.ports]]", "", "# c",
                     "[" * 300, "\x00", "\ufeff", "guest = ", "= 1"]),
    st.tuples(KEYS, VALUES).map(lambda kv: f"{kv[0]} = {kv[1]}"))


@settings(max_examples=10000, deadline=None, suppress_health_check=list(HealthCheck))
@given(st.lists(LINES, max_size=14))
def test_generated_documents_give_a_config_or_located_errors(lines: List[str]) -> None:
    text = "\n".join(lines)
    try:
        parse(text, "<fuzz>")
    except ConfigError as e:
        assert e.lines, text
        for line in e.lines:
            assert LOCATED.match(line), (text, line)


NAMES = st.one_of(st.sampled_from(['web1"; flush ruleset; "', "web1\nstarted", "we b1", "'", "",
                                   "-", "web1\x00", "é" * 70, "$(reboot)", "web1/.."]),
                  st.text(min_size=1, max_size=30))
OPS = st.sampled_from(["started", "stopped", "reconnect", "release", "prepare", "start",
                       "migrate", "restore", "attach", "shutdown", "STARTED", "", "-",
                       "started; nft flush ruleset"])
SUBS = st.sampled_from(["begin", "end", "-", "", "begin\n"])
XML = st.one_of(st.sampled_from([b"", b"<domain", b"<domain><uuid>", b"\x00" * 100,
                                 domain_xml("web1")[:120], b"<?xml version='1.0'?><!DOCTYPE x ["
                                 b"<!ENTITY a 'aaaaaaaaaa'>]><domain>&a;</domain>"]),
                st.binary(max_size=300), NAMES.map(domain_xml))


@pytest.mark.kernel
@settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))
@given(name=NAMES, op=OPS, sub=SUBS, xml=XML, extra=st.lists(st.text(max_size=5), max_size=2))
def test_hostile_hook_input_never_changes_valid_rules(pf: PortfwdHost, name: str, op: str,
                                                      sub: str, xml: bytes,
                                                      extra: List[str]) -> None:
    if pf.table() is None:  # once per lab: web1 runs, its forwards are in the table
        pf.write_config(web1_config("8080:80"))
        assert pf.hook("web1", "started").returncode == 0
        pf.before = pf.table()  # type: ignore[attr-defined]
    if name == "web1" and op in ("stopped", "release"):
        return  # that is a legitimate removal, not hostile input
    argv = [a for a in [name, op, sub] + extra if "\x00" not in a]
    r = subprocess.run(["ip", "netns", "exec", pf.lab.host, sys.executable, "-I", HOOK, *argv],
                       input=xml, capture_output=True, env=pf.env, timeout=60)
    assert (r.returncode, r.stdout) == (0, b""), r.stderr
    assert b"Traceback" not in r.stderr, r.stderr
    assert pf.table() == pf.before  # type: ignore[attr-defined]
