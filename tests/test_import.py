"""`portfwd import`: libvirt-hook-qemu's hooks.json → forward.toml (pure converter and CLI)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from ipaddress import IPv4Address, IPv4Network
from typing import Any, Dict, List, Optional, Tuple

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from portfwd.config import parse
from portfwd.commands.importer import convert

HERE = os.path.dirname(os.path.abspath(__file__))
DATA = os.path.join(HERE, "data", "import")


def _read(name: str) -> str:
    with open(os.path.join(DATA, name), encoding="utf-8") as f:
        return f.read()


def test_the_old_projects_example_converts_to_the_expected_file() -> None:
    result = convert(_read("example.json"), "example.json", "eth0")
    assert result.errors == [] and result.warnings == []
    assert result.toml == _read("example.toml")
    config = parse(result.toml)
    admin, node = config.forwards
    assert (admin.guest, str(admin.ipv4)) == ("cloud-admin", "192.168.124.10")
    assert [str(p.ports) for p in admin.ports] == ["1100:3000/tcp", "443:443/tcp"]
    assert admin.ports[0].sources == (IPv4Network("8.8.8.8/32"),)
    assert admin.ports[0].listen == ("eth0",)
    assert [str(p.ports) for p in node.ports] == ["1101:80/tcp", "1102:443/tcp"]
    assert node.ports[0].sources == ()


def test_every_key_and_both_entry_forms() -> None:
    text = """{
  "web1": [
    {"private_ip": "192.168.122.10", "public_ip": "203.0.113.5",
     "source_ip": "198.51.100.0/24, 192.0.2.7",
     "port_map": {"tcp": [80, [8443, 443]], "udp": [[5353, 53]], "sctp": [9]},
     "port_range": [{"init_port": 6000, "ports_num": 10, "protocol": "udp"},
                    {"init_port": 7000, "ports_num": 1, "protocol": "tcp"}]},
    {"private_ip": "192.168.122.10", "port_map": {"tcp": [22]}}
  ]
}"""
    result = convert(text, "h.json", None)
    assert result.errors == []
    assert result.guests == ["web1"]
    first, second = parse(result.toml).forwards
    assert [str(p.ports) for p in first.ports] == [
        "80:80/tcp", "8443:443/tcp", "5353:53/udp", "9:9/sctp", "6000-6009:6000-6009/udp",
        "7000:7000/tcp"]
    assert {str(n) for n in first.ports[0].sources} == {"198.51.100.0/24", "192.0.2.7/32"}
    assert first.ports[0].listen == (IPv4Address("203.0.113.5"),)
    # source_ip covers the ranges too (the old hook left it out there: documented in the file)
    assert first.ports[4].sources == first.ports[0].sources
    assert "source_ip now limits port_range too" in result.toml
    assert second.ports[0].listen == () and "every local address" in result.toml
    assert "# from h.json: web1[0] (h.json:3:5)" in result.toml
    assert "# from h.json: web1[1] (h.json:8:5)" in result.toml


@pytest.mark.parametrize("text, message", [
    ('{"a": {"private_ip": "10.0.0.1", "port_map": {"icmp": [1]}}}',
     "h.json:1:47: a.port_map.icmp: icmp has no ports and no equivalent"),
    ('{"a": [{"private_ip": "10.0.0.1", "port_map": {"tcp": [80]}},\n'
     ' {"private_ip": "10.0.0.1", "port_range": [{"init_port": 1, "ports_num": 2,'
     ' "protocol": "icmp"}]}]}',
     "h.json:2:89: a[1].port_range[0].protocol: icmp has no ports"),
    ('{"a": {"port_map": {"tcp": [80]}}}', "h.json:1:7: a: private_ip is missing"),
    ('{"a": {"private_ip": "fd00::1", "port_map": {"tcp": [80]}}}',
     "h.json:1:22: a.private_ip: 'fd00::1' is IPv6"),
    ('{"a": {"private_ip": "10.0.0.1", "public_ip": "host.example", "port_map": {"tcp": [80]}}}',
     "h.json:1:47: a.public_ip: 'host.example' is not an IP address"),
    ('{"a": {"private_ip": "10.0.0.1", "source_ip": "example.org", "port_map": {"tcp": [80]}}}',
     "a.source_ip: 'example.org' is not an address or CIDR"),
    ('{"a": {"private_ip": "10.0.0.1", "port_map": {"tcp": [[80, 70000]]}}}',
     "h.json:1:60: a.port_map.tcp[0][1]: port 70000 not in 1..65535"),
    ('{"a": {"private_ip": "10.0.0.1", "port_map": {"tcp": [[80, 81, 82]]}}}',
     "a.port_map.tcp[0]: a pair is [public, private], not 3 items"),
    ('{"a": {"private_ip": "10.0.0.1", "port_map": {"tcp": ["80"]}}}',
     'a.port_map.tcp[0]: must be a port number, not "80"'),
    ('{"a": {"private_ip": "10.0.0.1", "port_map": {"gre": [80]}}}',
     'a.port_map.gre: unknown protocol "gre"'),
    ('{"a": {"private_ip": "10.0.0.1", "port_range": [{"init_port": 65530, "ports_num": 9,'
     ' "protocol": "tcp"}]}}', "a.port_range[0].ports_num: 65530+9-1 = 65538 runs past"),
    ('{"a": {"private_ip": "10.0.0.1", "port_range": [{"init_port": 5, "ports_num": 0,'
     ' "protocol": "tcp"}]}}', "a.port_range[0].ports_num: must be a number of ports >= 1"),
    ('{"a": {"private_ip": "10.0.0.1", "port_range": [{"init_port": 5, "protocol": "tcp"}]}}',
     "a.port_range[0]: missing ports_num"),
    ('{"a": {"private_ip": "10.0.0.1", "comment": "x", "port_map": {"tcp": [80]}}}',
     "h.json:1:34: a.comment: unknown key 'comment'"),
    ('{"a": {"private_ip": "10.0.0.1", "port_map": {"tcp": [80]}},\n'
     ' "b": {"private_ip": "10.0.0.2", "port_map": {"tcp": [[80, 8080]]}}}',
     "h.json:2:55: b.port_map.tcp[0]: host port 80/tcp on every IPv4 address is claimed twice:"
     " here for b and at h.json:1:55 (a.port_map.tcp[0]) for a"),
    ('{"forward[7].ports[3]": {"private_ip": "10.0.0.1", "port_map": {"tcp": [80]}},'
     ' "b": {"private_ip": "10.0.0.2", "port_map": {"tcp": [80]}}}',
     'h.json:1:133: b.port_map.tcp[0]: host port 80/tcp on every IPv4 address is claimed twice:'
     ' here for b and at h.json:1:73 ("forward[7].ports[3]".port_map.tcp[0])'),
    ('{"a/b": {"private_ip": "10.0.0.1", "port_map": {"tcp": [80]}}}',
     'h.json:1:9: "a/b".guest: \'a/b\' is not a libvirt domain name'),
    ('{"a": {"private_ip": "10.0.0.1", /* open', "h.json:1:34: JSON syntax: comment /*"),
    ('{"a": {"private_ip": "10.0.0.1",}}', "h.json:1:32: JSON syntax: trailing comma after line 1:"
                                           " JSON allows no ',' before '}'; remove it"),
    ('{"a": {"private_ip": "10.0.0.1",\n "port_map": {"tcp": [80,\n]}}}',
     "h.json:2:25: JSON syntax: trailing comma after line 2: JSON allows no ',' before ']'"),
    ('["a"]', "h.json:1:1: hooks.json must be an object of guest names"),
    ('\ufeff{"a": {"private_ip": "10.0.0.1"}}', "h.json:1:1: the file starts with a byte-order"
                                                 " mark (U+FEFF), which JSON does not allow"),
    ('{"a": {"private_ip": "10.0.0.1", "port_map": {"TCP": [80]}}}',
     'h.json:1:47: a.port_map.TCP: unknown protocol "TCP"; use tcp, udp or sctp (lower case:'
     ' "tcp")'),
    ('{"a": 7}', "h.json:1:7: a: an entry must be an object"),
])
def test_refusals_name_the_place(text: str, message: str) -> None:
    result = convert(text, "h.json", None)
    assert result.toml == ""
    assert any(message in line for line in result.errors), result.errors


BIG = "9" * 5000  # past Python's 4,300 digits of int(str) and str(int)


@pytest.mark.parametrize("value, message", [
    (BIG, "h.json:1:55: a.port_map.tcp[0]: port 999999999999...9999 (5000 digits) not in"
          " 1..65535"),
    ("-" + BIG, "h.json:1:55: a.port_map.tcp[0]: port -99999999999...9999 (5000 digits) not in"
                " 1..65535"),
    ("1e999", "h.json:1:55: a.port_map.tcp[0]: must be a port number, not 1e999"),
    ("-1e999", "h.json:1:55: a.port_map.tcp[0]: must be a port number, not -1e999"),
    ("1" + "0" * 400 + ".5", "h.json:1:55: a.port_map.tcp[0]: must be a port number, not"
                             " 100000000000...00.5 (402 digits)"),
    ("12345678901234567890", "h.json:1:55: a.port_map.tcp[0]: port 12345678901234567890 not"
                             " in 1..65535"),
    ("-7", "h.json:1:55: a.port_map.tcp[0]: port -7 not in 1..65535"),
    ("[[[[[[[[1e999, %s]]]]]]]]" % BIG, "h.json:1:55: a.port_map.tcp[0]: a pair is [public,"
                                        " private], not 1 items"),
    ("[[%s], 80]" % BIG, "h.json:1:56: a.port_map.tcp[0][0]: must be a port number, not"
                         " [999999999999...9999 (5000 digits)]"),
])
def test_absurd_numbers_are_located_refusals(value: str, message: str) -> None:
    text = '{"a": {"private_ip": "10.0.0.1", "port_map": {"tcp": [%s]}}}' % value
    assert convert(text, "h.json").errors == [message]


@pytest.mark.parametrize("entry, message", [
    ('"private_ip": %s' % BIG, "a.private_ip: must be an IPv4 address in a string, not"
                               " 999999999999...9999 (5000 digits)"),
    ('"private_ip": "10.0.0.1", "port_range": [{"init_port": 1, "ports_num": %s,'
     ' "protocol": "tcp"}]' % BIG, "a.port_range[0].ports_num: 999999999999...9999 (5000"
                                   " digits) ports run past port 65535"),
    ('"private_ip": "10.0.0.1", "port_range": [{"init_port": 1, "ports_num": -%s,'
     ' "protocol": "tcp"}]' % BIG, "a.port_range[0].ports_num: must be a number of ports >= 1,"
                                   " not -99999999999...9999 (5000 digits)"),
    ('"private_ip": "10.0.0.1", "port_range": [{"init_port": 65535, "ports_num": %s,'
     ' "protocol": "tcp"}]' % ("9" * 18), "a.port_range[0].ports_num: 65535+999999999999999999-1"
                                          " = 1000000000000065533 runs past port 65535"),
    ('"private_ip": "10.0.0.1", "port_range": [{"init_port": 1, "ports_num": 1,'
     ' "protocol": %s}]' % BIG, "a.port_range[0].protocol: unknown protocol"
                                " 999999999999...9999 (5000 digits); use tcp, udp or sctp"),
    ('"private_ip": "10.0.0.1", "source_ip": [%s], "port_map": {}' % ", ".join(["1"] * 3000),
     'a.source_ip: must be a string (address or CIDR), not [1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1,'
     ' 1, 1, 1, 1, 1, 1, 1, 1,...'),
    ('"private_ip": "10.0.0.1\\ud800", "port_map": {}', "JSON syntax: a \\u escape of half a"
                                                       " surrogate pair names no character"),
])
def test_absurd_values_elsewhere_are_located_refusals(entry: str, message: str) -> None:
    errors = convert('{"a": {%s}}' % entry, "h.json").errors
    assert len(errors) == 1 and errors[0].startswith("h.json:1:") and message in errors[0], errors


def test_every_refusal_is_reported_at_once() -> None:
    text = ('{"a": {"private_ip": "10.0.0.1", "port_map": {"icmp": [1], "tcp": [0]}},'
            ' "b": {"private_ip": "x", "port_map": {"udp": [53]}}}')
    assert len(convert(text, "h.json").errors) == 3


def test_entries_without_ports_are_skipped_with_a_warning() -> None:
    result = convert('{"a": {"private_ip": "10.0.0.1", "port_map": {}}, "b": [],'
                     ' "c": {"private_ip": "10.0.0.3", "port_map": {"tcp": [22]}}}', "h.json")
    assert result.errors == [] and result.guests == ["c"]
    assert len(result.warnings) == 2 and "a: no port_map" in result.warnings[0]


def test_host_bits_and_nested_sources() -> None:
    result = convert('{"a": {"private_ip": "10.0.0.1", "source_ip": "198.51.100.7/24,'
                     ' 198.51.100.9", "port_map": {"tcp": [22]}}}', "h.json")
    assert result.errors == []
    assert "host bits set" in result.warnings[0]
    assert [str(n) for n in parse(result.toml).forwards[0].ports[0].sources] == ["198.51.100.0/24"]


def test_names_and_comments_cannot_break_out_of_toml() -> None:
    name = 'we"ird\\ # [[forward]] ü'
    text = json.dumps({name: {"private_ip": "10.0.0.1", "port_map": {"tcp": [22]}}})
    result = convert(text, "h\nx.json")
    config = parse(result.toml)
    assert [f.guest for f in config.forwards] == [name]


def test_slashes_inside_strings_are_not_comments() -> None:
    result = convert('{"a": {"private_ip": "10.0.0.1", "interface": "x//y/*",'
                     ' "port_map": {"tcp": [22]}}}', "h")
    assert "interface x//y/* dropped" in result.toml


# -- generated hooks.json: whatever converts is what portfwd check accepts, port for port --

GUESTS = st.sampled_from(["web1", "db", "a-b_c", "x y", "gäst"])
PORT = st.integers(1, 65535)
ITEM = st.one_of(PORT, st.tuples(PORT, PORT).map(list))


@st.composite
def entries(draw: Any) -> Dict[str, Any]:
    entry: Dict[str, Any] = {"private_ip": str(IPv4Address(draw(st.integers(0x0A000001, 0x0AFFFFFE))))}
    if draw(st.booleans()):
        entry["public_ip"] = draw(st.sampled_from(["203.0.113.1", "198.51.100.1"]))
    if draw(st.booleans()):
        entry["source_ip"] = draw(st.sampled_from(["192.0.2.0/24", "192.0.2.9", "10.0.0.0/8"]))
    port_map = draw(st.dictionaries(st.sampled_from(["tcp", "udp", "sctp"]),
                                    st.lists(ITEM, min_size=1, max_size=4), max_size=3))
    if port_map or draw(st.booleans()):
        entry["port_map"] = port_map
    ranges = draw(st.lists(st.fixed_dictionaries({
        "init_port": st.integers(1, 65000), "ports_num": st.integers(1, 500),
        "protocol": st.sampled_from(["tcp", "udp"])}), max_size=2))
    if ranges:
        entry["port_range"] = ranges
    return entry


def _expected(entry: Dict[str, Any]) -> List[Tuple[str, int, int, int]]:
    out = []
    for proto, items in entry.get("port_map", {}).items():
        for item in items:
            public, private = item if isinstance(item, list) else (item, item)
            out.append((proto, public, public, private))
    for r in entry.get("port_range", []):
        out.append((r["protocol"], r["init_port"], r["init_port"] + r["ports_num"] - 1,
                    r["init_port"]))
    return out


@settings(max_examples=200, deadline=None)
@given(st.dictionaries(GUESTS, st.one_of(entries(), st.lists(entries(), min_size=1, max_size=3)),
                       min_size=1, max_size=3))
def test_generated_files_convert_port_for_port(doc: Dict[str, Any]) -> None:
    text = json.dumps(doc, indent=2, ensure_ascii=False)
    result = convert(text, "h.json", None)
    flat = [(g, e) for g, v in doc.items() for e in (v if isinstance(v, list) else [v])]
    if result.errors:  # only conflicts between entries are refused in this corpus
        assert all("claimed twice" in line or "forwards: here" in line
                   for line in result.errors), result.errors
        return
    config = parse(result.toml)
    kept = [(g, e) for g, e in flat if _expected(e)]
    assert len(config.forwards) == len(kept)
    for forward, (guest, entry) in zip(config.forwards, kept):
        assert forward.guest == guest and str(forward.ipv4) == entry["private_ip"]
        got = [(p.ports.proto, p.ports.host_first, p.ports.host_last, p.ports.guest_first)
               for p in forward.ports]
        assert got == _expected(entry)
        for p in forward.ports:
            assert [str(a) for a in p.listen] == ([entry["public_ip"]] if "public_ip" in entry
                                                  else [])
            want = [] if "source_ip" not in entry else [entry["source_ip"]]
            assert [str(n) for n in p.sources] == [str(IPv4Network(w)) for w in want]


JSON = st.recursive(st.none() | st.booleans() | st.integers(-2, 70000) | st.floats(allow_nan=False)
                    | st.text(max_size=8) | st.sampled_from(["tcp", "udp", "icmp", "10.0.0.1"]),
                    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(
                        st.sampled_from(["private_ip", "port_map", "port_range", "tcp", "init_port",
                                         "ports_num", "protocol", "public_ip", "x"]) | st.text(),
                        inner, max_size=4), max_leaves=12)


@settings(max_examples=300, deadline=None)
@given(st.one_of(JSON.map(json.dumps), st.text(max_size=60)))
def test_any_input_gives_a_file_or_located_errors(text: str) -> None:
    result = convert(text, "h.json")
    assert bool(result.toml) != bool(result.errors) or (not result.toml and result.warnings)
    for line in result.errors:
        assert line.startswith("h.json:"), line
    if result.toml:
        parse(result.toml)


# -- the command --

def _cli(*args: str, cwd: Optional[str] = None) -> "subprocess.CompletedProcess[str]":
    return subprocess.run([sys.executable, "-m", "portfwd.cli", "import", *args], cwd=cwd,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_cli_prints_the_file_and_the_steps(tmp_path: "os.PathLike[str]") -> None:
    r = _cli(os.path.join(DATA, "example.json"), "--listen", "eth0")
    assert r.returncode == 0, r.stderr
    assert r.stdout == _read("example.toml").replace("example.json",
                                                     os.path.join(DATA, "example.json"))
    assert "portfwd sync" in r.stderr and "stopped end -" in r.stderr
    assert "for g in cloud-admin cloud-node1; do" in r.stderr


def test_cli_writes_only_with_force(tmp_path: "os.PathLike[str]") -> None:
    out = os.path.join(str(tmp_path), "forward.toml")
    source = os.path.join(DATA, "example.json")
    assert _cli(source, "-o", out, "--listen", "all").returncode == 0
    assert os.stat(out).st_mode & 0o777 == 0o644
    with open(out, "w") as f:
        f.write("mine\n")
    r = _cli(source, "-o", out)
    assert r.returncode == 2 and "use --force" in r.stderr
    with open(out) as f:
        assert f.read() == "mine\n"
    assert _cli(source, "-o", out, "--force", "--listen", "all").returncode == 0
    parse(open(out).read())
    assert os.listdir(str(tmp_path)) == ["forward.toml"]  # no temporary file left


def test_cli_refusal_is_located_with_exit_1(tmp_path: "os.PathLike[str]") -> None:
    path = os.path.join(str(tmp_path), "hooks.json")
    with open(path, "w") as f:
        f.write('{\n  "vm": {"private_ip": "10.0.0.1",\n         "port_map": {"icmp": [0]}}}\n')
    r = _cli(path, "-o", os.path.join(str(tmp_path), "out.toml"))
    assert r.returncode == 1 and r.stdout == ""
    assert r.stderr.startswith(f"{path}:3:23: vm.port_map.icmp: icmp has no ports")
    assert "Traceback" not in r.stderr and not os.path.exists(os.path.join(str(tmp_path), "out.toml"))
    r = _cli(os.path.join(str(tmp_path), "missing.json"))
    assert r.returncode == 1 and "cannot read" in r.stderr and "Traceback" not in r.stderr
    with open(path, "wb") as f:
        f.write(b'{"\xff": 1}')
    r = _cli(path)
    assert r.returncode == 1 and f"{path}:1:3: not UTF-8" in r.stderr


def test_cli_refuses_a_5000_digit_port_without_a_traceback(tmp_path: "os.PathLike[str]") -> None:
    path = os.path.join(str(tmp_path), "hooks.json")
    with open(path, "w") as f:
        f.write('{"vm": {"private_ip": "10.0.0.1",\n "port_map": {"tcp": [%s]}}}\n' % BIG)
    out = os.path.join(str(tmp_path), "out.toml")
    r = _cli(path, "-o", out, "--listen", "all")
    assert (r.returncode, r.stdout) == (1, "") and "Traceback" not in r.stderr
    assert r.stderr == f"{path}:2:23: vm.port_map.tcp[0]: port 999999999999...9999 (5000" \
                       " digits) not in 1..65535\n"
    assert sorted(os.listdir(str(tmp_path))) == ["hooks.json"]


def test_cli_output_never_writes_through_a_symlink(tmp_path: "os.PathLike[str]") -> None:
    """-o naming a symlink (someone else's, in a folder others can write): without
    --force it exists, so it stays; with --force the link itself is replaced by
    the new file (a rename never follows it). The file it pointed to is untouched."""
    folder = str(tmp_path)
    victim = os.path.join(folder, "victim")
    with open(victim, "w") as f:
        f.write("mine\n")
    out = os.path.join(folder, "forward.toml")
    os.symlink(victim, out)
    source = os.path.join(DATA, "example.json")
    r = _cli(source, "-o", out, "--listen", "all")
    assert r.returncode == 2 and "use --force" in r.stderr
    assert os.path.islink(out)
    assert _cli(source, "-o", out, "--force", "--listen", "all").returncode == 0
    assert not os.path.islink(out) and os.stat(out).st_mode & 0o777 == 0o644
    with open(victim) as f:
        assert f.read() == "mine\n"
    assert sorted(os.listdir(folder)) == ["forward.toml", "victim"]


def test_cli_output_into_a_missing_folder_is_a_host_error(tmp_path: "os.PathLike[str]") -> None:
    out = os.path.join(str(tmp_path), "no", "forward.toml")
    r = _cli(os.path.join(DATA, "example.json"), "-o", out, "--listen", "all")
    assert r.returncode == 3 and "Traceback" not in r.stderr
    assert f"{out}: cannot write: No such file or directory" in r.stderr


def test_cli_help() -> None:
    r = _cli("--help")
    assert r.returncode == 0 and "usage: portfwd import" in r.stdout


def test_steps_fit_the_install_they_find(tmp_path: "os.PathLike[str]") -> None:
    """With the Debian package, the hooks and units are there and forward.toml exists:
    the printed write needs --force, and nothing is to be installed."""
    from portfwd.commands.importcmd import retire_steps
    from portfwd.commands.installpaths import packaged

    pip = retire_steps(["web1"], None, "h.json")
    assert pip[1] == ("  1. write the converted configuration to /etc/portfwd/forward.toml"
                      " (portfwd import h.json -o /etc/portfwd/forward.toml); portfwd check")
    assert pip[2].startswith("  2. portfwd install ")
    deb = retire_steps(["web1"], None, "h.json", packaged=True)
    assert deb[1].startswith("  1. write the converted configuration to /etc/portfwd/forward.toml"
                             " (portfwd import h.json -o /etc/portfwd/forward.toml --force:")
    assert deb[2].startswith("  2. portfwd check ") and "nothing to install" in deb[2]
    assert not any("portfwd install" in line for line in deb) and deb[3:] == pip[3:]
    elsewhere = retire_steps(["web1"], "/root/new.toml", "h.json", packaged=True)
    assert "(cp /root/new.toml /etc/portfwd/forward.toml:" in elsewhere[1]
    # the printed step works on the file the package ships
    shipped = os.path.join(str(tmp_path), "forward.toml")
    with open(shipped, "w") as f:
        f.write("# [[forward]]\n")
    source = os.path.join(DATA, "example.json")
    assert _cli(source, "-o", shipped, "--force", "--listen", "all").returncode == 0
    with open(shipped) as f:
        assert "[[forward]]\n" in f.read()
    # the command prints the steps for this host
    r = _cli(source, "--listen", "all")
    assert ("nothing to install" in r.stderr) == (packaged() is not None), r.stderr


def test_package_is_told_by_dpkg_status_or_its_hooks(tmp_path: "os.PathLike[str]") -> None:
    from portfwd.commands.installpaths import packaged

    root = str(tmp_path)
    assert packaged(root) is None
    status = os.path.join(root, "var/lib/dpkg/status")
    os.makedirs(os.path.dirname(status))
    with open(status, "w") as f:
        f.write("Package: portfwd\nStatus: deinstall ok config-files\nVersion: 0.2\n\n"
                "Package: other\nStatus: install ok installed\n")
    assert packaged(root) is None  # removed, its conffiles kept: not the package's any more
    with open(status, "w") as f:
        f.write("Package: other\nStatus: install ok installed\n\n"
                "Package: portfwd\nStatus: install ok installed\nDescription: x\n y\n")
    assert packaged(root) == "the Debian package portfwd is installed (dpkg: install ok installed)"
    os.unlink(status)
    os.makedirs(os.path.join(root, "usr/lib/portfwd/hooks"))
    assert packaged(root) == "/usr/lib/portfwd/hooks exists (the Debian package's hooks)"
    r = subprocess.run([sys.executable, "-m", "portfwd.cli", "install", "--root", root],
                       capture_output=True, text=True)
    assert (r.returncode, r.stdout) == (2, ""), r
    assert "not installing: /usr/lib/portfwd/hooks exists" in r.stderr
    assert "`portfwd install --force` installs anyway" in r.stderr and "Traceback" not in r.stderr
    assert not os.path.exists(os.path.join(root, "etc/libvirt/hooks/qemu.d/portfwd"))
    forced = subprocess.run([sys.executable, "-m", "portfwd.cli", "install", "--root", root,
                             "--force"], capture_output=True, text=True)
    assert forced.returncode == 0, forced.stderr
    assert os.path.exists(os.path.join(root, "etc/libvirt/hooks/qemu.d/portfwd"))


def test_reapply_takes_no_config_and_flush_names_libvirts_chains() -> None:
    def cli(*args: str) -> "subprocess.CompletedProcess[str]":
        return subprocess.run([sys.executable, "-m", "portfwd.cli", *args], capture_output=True,
                              text=True)

    r = cli("reapply", "-c", "/nonexistent.toml")
    assert r.returncode == 2 and "unrecognized arguments: -c" in r.stderr
    assert "-c" not in cli("reapply", "--help").stdout
    assert "accepts in libvirt's chains" in " ".join(cli("flush", "--help").stdout.split())
