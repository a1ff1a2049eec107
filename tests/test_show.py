"""``portfwd show``: the forwards as the configuration says them, no root, no
libvirt; and the bash completion offering the configured guests."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from typing import List

from portfwd.commands import docs
from portfwd.cmdline import parser

CONFIG = """
[[forward]]
guest = "web1"
ipv4 = "192.168.122.10"
from = ["198.51.100.0/24", "203.0.113.0/24"]
ports = ["8080:80", "5000-5010/udp"]

[[forward]]
guest = "db1"
ports = ["5432"]
"""


def show(path: str, *args: str) -> "subprocess.CompletedProcess[str]":
    return subprocess.run([sys.executable, "-m", "portfwd.cli", "-c", path, "show", *args],
                          capture_output=True, text=True)


def config(tmp_path: "os.PathLike[str]") -> str:
    path = os.path.join(str(tmp_path), "forward.toml")
    with open(path, "w", encoding="utf-8") as f:
        f.write(CONFIG)
    return path


def test_show_prints_one_line_per_forward(tmp_path: "os.PathLike[str]") -> None:
    r = show(config(tmp_path))
    assert (r.returncode, r.stderr) == (0, ""), r
    assert [line.split() for line in r.stdout.splitlines()] == [
        ["GUEST", "PROTO", "LISTEN", "TARGET", "FROM"],
        ["web1", "tcp", "*:8080", "->", "192.168.122.10:80", "198.51.100.0/24,203.0.113.0/24"],
        ["web1", "udp", "*:5000-5010", "->", "192.168.122.10:5000-5010",
         "198.51.100.0/24,203.0.113.0/24"],
        ["db1", "tcp", "*:5432", "->", "<IPv4", "of", "the", "first", "NIC>:5432", "*"],
        ["db1", "tcp", "[*]:5432", "->", "<IPv6", "of", "the", "first", "NIC>:5432", "*"]]


def test_show_json_and_guest_filter(tmp_path: "os.PathLike[str]") -> None:
    r = show(config(tmp_path), "web1", "--json")
    assert r.returncode == 0, r
    assert json.loads(r.stdout)[0] == {
        "guest": "web1", "family": 4, "proto": "tcp", "listen": "*:8080",
        "target": "192.168.122.10:80", "sources": ["198.51.100.0/24", "203.0.113.0/24"],
        "entry": "forward[0].ports[0]"}
    assert {row["guest"] for row in json.loads(r.stdout)} == {"web1"}
    assert show(config(tmp_path), "--names").stdout == "db1\nweb1\n"


def test_show_unknown_guest_is_a_usage_error(tmp_path: "os.PathLike[str]") -> None:
    r = show(config(tmp_path), "db2")
    assert (r.returncode, r.stdout) == (2, "")
    assert r.stderr == ("portfwd show: error: guest 'db2' is not configured; did you mean"
                        " 'db1'? configured guests: db1 and web1\n")


def complete(tmp_path: "os.PathLike[str]", *words: str) -> List[str]:
    """What the generated completion offers for ``words``, with a ``portfwd`` on PATH
    that is this source tree."""
    bindir = os.path.join(str(tmp_path), "bin")
    os.makedirs(bindir, exist_ok=True)
    exe = os.path.join(bindir, "portfwd")
    with open(exe, "w", encoding="utf-8") as f:
        f.write(f'#!/bin/sh\nexec {sys.executable} -m portfwd.cli "$@"\n')
    os.chmod(exe, stat.S_IRWXU)
    line = " ".join(f"'{w}'" for w in words)
    script = docs.bash_completion(parser())
    r = subprocess.run(["bash", "--norc", "--noprofile", "-c",
                        f'{script}\nCOMP_WORDS=({line}); COMP_CWORD={len(words) - 1}\n'
                        '_portfwd; printf "%s\\n" "${COMPREPLY[@]}"'],
                       capture_output=True, text=True,
                       env=dict(os.environ, PATH=f"{bindir}:{os.environ['PATH']}"))
    return r.stdout.split()


def test_completion_offers_configured_guests_and_protocols(tmp_path: "os.PathLike[str]") -> None:
    path = config(tmp_path)
    for command in ("show", "status", "doctor", "trace"):
        assert complete(tmp_path, "portfwd", "-c", path, command, "") == ["db1", "web1"]
    assert complete(tmp_path, "portfwd", "status", "-c", path, "w") == ["web1"]
    assert complete(tmp_path, "portfwd", "trace", "--proto", "") == ["tcp", "udp"]
