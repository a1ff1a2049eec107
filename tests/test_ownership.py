"""portfwd touches only tables it made: a marker on its own table, and an admin's
table of the same name left exactly as it was by hook, sync, reapply and flush."""

from __future__ import annotations

import json
import os
from typing import Optional

import pytest

from netlab import HOST4
from pfhost import PortfwdHost, web1_config
from portfwd.constants import MARKER_SET, TABLE_COMMENT

pytestmark = pytest.mark.kernel

TEST_URI = "test:///default"  # libvirt's test driver: one running domain, "test"
ADMIN_FILTER = """table inet filter {
	chain input {
		type filter hook input priority filter; policy accept;
		tcp dport 22 accept comment "the admin's ssh rule"
	}
}
"""


def listing(pf: PortfwdHost, table: str) -> str:
    r = pf.lab.ns(pf.lab.host, "nft", "list", "table", "inet", table, check=False)
    return r.stdout.decode() if r.returncode == 0 else ""


def marker_comment(pf: PortfwdHost, table: str) -> Optional[str]:
    """The comment of the marker set in ``table``, None without that set."""
    r = pf.lab.ns(pf.lab.host, "nft", "-j", "list", "set", "inet", table, MARKER_SET,
                  check=False)
    if r.returncode != 0:
        return None
    sets = [o["set"] for o in json.loads(r.stdout)["nftables"] if "set" in o]
    return str(sets[0].get("comment", "")) if sets else None


def test_portfwd_table_carries_the_marker(pf: PortfwdHost) -> None:
    pf.write_config(web1_config("8080:80"))
    assert pf.hook("web1", "started").returncode == 0
    assert 'comment "portfwd: managed by portfwd' in listing(pf, "portfwd")
    assert marker_comment(pf, "portfwd") == TABLE_COMMENT


@pytest.mark.parametrize("how", ["hook", "sync"])
def test_table_of_layout_4_is_still_portfwds_and_gets_the_marker_set(pf: PortfwdHost,
                                                                     how: str) -> None:
    """Layout 4 marked the table's own comment only: such a table (made before an
    upgrade, in this boot) is recognised, rebuilt, and marked with the set."""
    pf.lab.ns(pf.lab.host, "nft", "-f", "-", input=(
        f'table inet portfwd {{\n comment "{TABLE_COMMENT}"\n'
        ' chain prerouting { type nat hook prerouting priority -105; policy accept; }\n}\n'
    ).encode())
    os.makedirs(pf.run_dir, mode=0o700)
    with open(os.path.join(pf.run_dir, "layout.portfwd"), "w", encoding="ascii") as f:
        f.write("4")
    if how == "hook":
        pf.write_config(web1_config("8080:80"))
        assert pf.hook("web1", "started").returncode == 0
    else:
        pf.write_config(web1_config("8080:80").replace("web1", "test"))
        r = pf.cli("sync", "--connect", TEST_URI)
        assert r.returncode == 0, r.stderr
    assert marker_comment(pf, "portfwd") == TABLE_COMMENT
    pf.lab.serve("tcp", [80])
    assert pf.lab.reach("tcp", HOST4, 8080) is not None


def test_a_set_of_the_marker_s_name_without_its_comment_marks_nothing(pf: PortfwdHost) -> None:
    admin = ADMIN_FILTER.replace("\tchain input", f"\tset {MARKER_SET} {{\n\t\ttype"
                                 ' inet_service\n\t\tcomment "mine"\n\t}\n\tchain input')
    pf.lab.ns(pf.lab.host, "nft", "-f", "-", input=admin.encode())
    before = listing(pf, "filter")
    assert MARKER_SET in before
    pf.write_config('[options]\ntable = "filter"\n' + web1_config("8080:80"))
    r = pf.hook("web1", "started")
    assert r.returncode == 0
    assert b"table inet filter exists and was not made by portfwd" in r.stderr
    assert listing(pf, "filter") == before


@pytest.mark.parametrize("how", ["hook", "sync", "reapply", "flush"])
def test_admin_table_named_in_config_is_never_changed(pf: PortfwdHost, how: str) -> None:
    pf.lab.ns(pf.lab.host, "nft", "-f", "-", input=ADMIN_FILTER.encode())
    before = listing(pf, "filter")
    config = '[options]\ntable = "filter"\n' + web1_config("8080:80").replace("web1", "test")
    pf.write_config(config)
    if how == "hook":
        r = pf.hook("test", "started")
        assert r.returncode == 0  # not strict: the guest starts, the error is logged
        assert b"table inet filter exists and was not made by portfwd" in r.stderr
    elif how == "sync":
        r = pf.cli("sync", "--connect", TEST_URI)
        assert r.returncode == 3, r.stderr
        assert b"table inet filter exists and was not made by portfwd" in r.stderr
        assert b"Traceback" not in r.stderr
    elif how == "reapply":
        # portfwd's table was there, then `nft flush ruleset` and a table of the admin's
        # under the configured name: reapply must not fill it
        pf.lab.ns(pf.lab.host, "nft", "delete", "table", "inet", "filter")
        assert pf.hook("test", "started").returncode == 0
        pf.lab.ns(pf.lab.host, "nft", "flush", "ruleset")
        pf.lab.ns(pf.lab.host, "nft", "-f", "-", input=ADMIN_FILTER.encode())
        r = pf.cli("reapply")
        assert r.returncode == 3
        assert b"table inet filter exists and was not made by portfwd" in r.stderr
    else:
        r = pf.cli("flush")
        assert r.returncode == 0, r.stderr
        assert b"table inet filter left alone" in r.stderr
    assert listing(pf, "filter") == before
    assert listing(pf, "portfwd") == ""


def test_check_refuses_a_foreign_table_name(pf: PortfwdHost) -> None:
    pf.lab.ns(pf.lab.host, "nft", "-f", "-", input=ADMIN_FILTER.encode())
    pf.write_config('[options]\ntable = "filter"\n' + web1_config("8080:80"))
    r = pf.cli("check")
    assert r.returncode == 1
    assert f"{pf.config}:2:9: options.table: table inet filter exists".encode() in r.stderr
    pf.write_config('[options]\ntable = "pf2"\n' + web1_config("8080:80"))
    assert pf.cli("check").returncode == 0


def test_renamed_table_is_dropped_only_when_it_is_portfwds(pf: PortfwdHost) -> None:
    pf.write_config(web1_config("8080:80").replace("web1", "test"))
    assert pf.cli("sync", "--connect", TEST_URI).returncode == 0
    pf.write_config('[options]\ntable = "pf2"\n' + web1_config("8080:80").replace("web1", "test"))
    assert pf.cli("sync", "--connect", TEST_URI).returncode == 0
    assert listing(pf, "portfwd") == ""  # portfwd's own old table: gone
    assert 'comment "portfwd:' in listing(pf, "pf2")
