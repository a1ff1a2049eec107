"""`portfwd check` against the host it runs on (the lab's host namespace): a forward
that would take a listening service's port, listen interfaces and addresses the
host lacks, forwards that forward nothing, guests given one address; --json and
--strict for scripts."""

from __future__ import annotations

import json
import re

import pytest

from netlab import GUEST4, HOST4
from pfhost import PortfwdHost

pytestmark = pytest.mark.kernel

CONFIG = f"""\
[[forward]]
guest = "web1"
ipv4 = "{GUEST4}"
ports = ["2222:22", "8080:80"]

[[forward]]
guest = "web2"
ipv4 = "{GUEST4}"
listen = ["nosuch0", "198.51.100.99", "{HOST4}"]
ports = ["9090:90"]

[[forward]]
guest = "web3"
ipv4 = "192.168.150.12"
listen = ["2001:db8:1::1"]
ports = ["7070:70"]
"""


def test_check_warns_about_what_the_host_says(pf: PortfwdHost) -> None:
    pf.lab.serve("tcp", [2222], ns=pf.lab.host)  # a service on [::]:2222 of the host
    pf.write_config(CONFIG)
    r = pf.cli("check")
    err = r.stderr.decode().splitlines()
    assert r.returncode == 0, err
    path = pf.config
    shadow = [line for line in err if "listens there" in line]
    assert len(shadow) == 1 and re.match(
        re.escape(f"{path}:4:10: warning: forward[0].ports[0]: host port 2222/tcp on every"
                  " address: ") + r"python3? \(pid \d+\) listens there \(\[::\]:2222\); the"
        " forward would take its connections", shadow[0]), shadow
    assert f"{path}:9:11: warning: forward[1].listen[0]: listen interface nosuch0 does not exist" \
        " (yet): this forward answers on it only once it does (check the name with `ip link`)" in err
    assert any(line.startswith(f"{path}:9:22: warning: forward[1].listen[1]: listen address"
                               " 198.51.100.99 is not an address of this host") for line in err)
    assert not any(HOST4 in line for line in err)  # an address the host has: no warning
    assert f"{path}:8:8: warning: forward[1].ipv4: {GUEST4} is also the address of web1" \
        f" (at {path}:3:8): forwards of both guests would lead to one of them; give each guest" \
        " its own address" in err
    assert f"{path}:12:3: warning: forward[2]: forwards nothing for web3: every port's listen" \
        " or from names only address families this forward has no guest address of" in err
    assert r.stdout.decode().startswith(f"{path}: OK: 4 port forwards for 3 guests")

    strict = pf.cli("check", "--strict")
    assert strict.returncode == 1
    assert strict.stderr.decode().splitlines()[-1].startswith(f"{path}: failed: --strict and ")

    out = pf.cli("check", "--json", "--strict")
    assert out.returncode == 1
    report = json.loads(out.stdout)
    assert report["valid"] is True and report["strict"] is True and report["errors"] == []
    texts = [line for line in err if ": warning: " in line and "forwarded traffic blocked" not in line]
    assert [f"{w['file']}:{w['line']}:{w['column']}: warning: {w['message']}"
            + (f"; {w['hint']}" if w["hint"] else "") for w in report["warnings"]] == texts
    assert {
        "file": path, "line": 8, "column": 8, "message": f"forward[1].ipv4: {GUEST4} is also the"
        f" address of web1 (at {path}:3:8): forwards of both guests would lead to one of them",
        "hint": "give each guest its own address"} in report["warnings"]
    assert (report["guests"], report["ports"], report["table"]) == (3, 4, "portfwd")
    assert pf.cli("check", "--json").returncode == 0


def test_check_json_lists_errors(pf: PortfwdHost) -> None:
    pf.write_config(CONFIG.replace('"8080:80"', '"8080:80/TCP"'))
    r = pf.cli("check", "--json")
    assert r.returncode == 1 and r.stderr == b""
    report = json.loads(r.stdout)
    assert report["valid"] is False
    assert report["errors"] == [{"file": pf.config, "line": 4, "column": 21,
                                 "message": "forward[0].ports[1]: '8080:80/TCP': unknown"
                                            " protocol 'TCP'",
                                 "hint": "use tcp, udp or sctp (lower case: 'tcp')"}]


def test_a_clean_file_has_no_warnings(pf: PortfwdHost) -> None:
    pf.write_config(f'[[forward]]\nguest = "web1"\nipv4 = "{GUEST4}"\nlisten = ["{HOST4}"]\n'
                    'ports = ["8080:80"]\n')
    r = pf.cli("check", "--strict")
    assert (r.returncode, r.stderr) == (0, b"")
