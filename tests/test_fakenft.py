"""The in-memory nftables of tests/fakenft.py: its semantics pinned without root,
and the same calls replayed through the real ``Nft`` in a network namespace of
their own (``kernel``): every transaction refused or accepted alike, every read
answered alike, the same tables in the end. The engine scenarios of
tests/test_engine_paths.py are replayed the same way, so the batches the engine
really sends keep the fake honest; those the kernel here cannot run (``FAKE_ONLY``)
are left out of that replay."""

from __future__ import annotations

import json
import subprocess
import sys
from typing import Any, Callable, Dict, List, Optional

import pytest

from fakenft import (EBUSY, EEXIST, ENOENT, NO_INTERVAL, READS, WRITES, Call, FakeNft, Ruleset,
                     libvirt_network, listing, normalised)
from portfwd.host import compat
from portfwd.plan import rules
from portfwd.constants import MARK, MARKER_SET, TABLE_COMMENT
from portfwd.errors import HostError
from test_engine_paths import FAKE_ONLY, SCENARIOS, EngineHost, host  # noqa: F401 (a fixture)

Json = Dict[str, Any]
T = {"family": "inet", "table": "t"}


def reason(message: str) -> str:
    """What nftables said, without where: "File exists", "No such file or directory"."""
    return message.rsplit(": ", 1)[-1]


EXISTS, ABSENT, BUSY = reason(EEXIST), reason(ENOENT), reason(EBUSY)


def attempt(nft: FakeNft, commands: List[Json], dry_run: bool = False) -> Optional[str]:
    """None when nftables took the batch, else the reason it refused it with."""
    try:
        nft.apply(commands, dry_run)
    except HostError as e:
        return reason(str(e))
    return None


def el(op: str, name: str, elems: List[Any]) -> Json:
    return {op: {"element": dict(T, name=name, elem=elems)}}


def e(key: Any, comment: str = "c1") -> Json:
    return {"elem": {"val": key, "comment": comment}}


def _has(nft: FakeNft, name: str, key: Any) -> bool:
    s = nft.ruleset.tables[("inet", "t")].sets[name]
    return any(x.val == key for x in s.elements.values())


def elements_case(nft: FakeNft) -> List[Optional[str]]:
    """Adding, re-adding and deleting elements, single and interval keys."""
    nft.create_table("t", TABLE_COMMENT, MARKER_SET)
    nft.apply(rules.skeleton("t"))
    k, r1 = {"concat": ["tcp", 8080]}, {"concat": ["udp", {"range": [5000, 5010]}]}
    src = {"concat": [{"prefix": {"addr": "0.0.0.0", "len": 0}},
                      {"prefix": {"addr": "198.51.100.0", "len": 24}}, "tcp", 2222]}
    inside = {"concat": [{"prefix": {"addr": "0.0.0.0", "len": 0}},
                         {"prefix": {"addr": "198.51.100.128", "len": 25}}, "tcp", 2222]}
    wider = {"concat": [{"prefix": {"addr": "0.0.0.0", "len": 0}},
                        {"prefix": {"addr": "198.51.0.0", "len": 16}}, "tcp", 2222]}
    out = [attempt(nft, [el("add", "any4_ip", [[e(k), "192.168.122.10"]])]),
           attempt(nft, [el("add", "any4_ip", [[e(k), "192.168.122.10"]])]),
           attempt(nft, [el("add", "any4_ip", [[e(k, "c2"), "192.168.122.10"]])]),
           attempt(nft, [el("add", "any4_ip", [[e(k), "192.168.122.11"]])]),
           attempt(nft, [el("delete", "any4_ip", [{"concat": ["tcp", 9]}])]),
           attempt(nft, [el("add", "any4_port", [[{"concat": ["tcp", 9]}, 9]]),
                         el("delete", "any4_port", [{"concat": ["tcp", 9]}])]),
           attempt(nft, [el("add", "any4_port", [[{"concat": ["tcp", 7]}, 7]]),
                         el("delete", "any4_port", [{"concat": ["tcp", 99]}])]),
           attempt(nft, [el("add", "any4_range", [[e(r1), "192.168.122.10"]])]),
           attempt(nft, [el("add", "any4_range", [[e(r1), "192.168.122.10"]])]),
           attempt(nft, [el("add", "any4_range", [[e(r1), "192.168.122.11"]])]),
           attempt(nft, [el("add", "any4_range", [
               [e({"concat": ["udp", {"range": [5005, 5020]}]}), "192.168.122.10"]])]),
           attempt(nft, [el("add", "any4_range", [[e({"concat": ["udp", 5003]}),
                                                   "192.168.122.10"]])]),
           attempt(nft, [el("add", "any4_range", [[e({"concat": ["tcp", 5003]}),
                                                   "192.168.122.10"]])]),
           attempt(nft, [el("add", "src4_ip", [[e(src), "192.168.122.10"]])]),
           attempt(nft, [el("add", "src4_ip", [[e(inside), "192.168.122.10"]])]),
           attempt(nft, [el("add", "src4_ip", [[e(wider), "192.168.122.10"]])]),  # holds it
           attempt(nft, [el("add", "any4_port", [[{"concat": ["udp", {"range": [1, 5]}]}, 1]])]),
           attempt(nft, [el("delete", "any4_range", [r1])]),
           attempt(nft, [el("delete", "any4_range", [r1])]),
           attempt(nft, [el("add", "any4_port", [[{"concat": ["tcp", 6]}, 6]])], dry_run=True),
           attempt(nft, [el("add", "any4_ip", [[e(k), "192.168.122.11"]])], dry_run=True),
           attempt(nft, rules.hairpin("t", ["virbr1", "virbr0"]))]
    nft.list_table("t")
    assert not _has(nft, "any4_port", {"concat": ["tcp", 7]})  # the refused batch left nothing
    assert not _has(nft, "any4_port", {"concat": ["tcp", 6]})  # nor the dry run
    return out


ELEMENTS = [None, None, None, EXISTS, ABSENT, None, ABSENT, None, None, EXISTS, EXISTS, EXISTS,
            None, None, EXISTS, None, NO_INTERVAL.format("map"), None, ABSENT, None, EXISTS, None]


def declarations_case(nft: FakeNft) -> List[Optional[str]]:
    """Declaring, redeclaring and deleting tables, sets and maps; comments."""
    nft.create_table("t", TABLE_COMMENT, MARKER_SET)
    nft.apply(rules.skeleton("t"))
    where = dict(T, name="any4_ip", type=["inet_proto", "inet_service"])
    out = [attempt(nft, [{"add": {"map": dict(where, map="ipv4_addr")}}]),  # no counter
           attempt(nft, [{"add": {"set": dict(T, name="any4_rkeys",
                                              type=["inet_proto", "inet_service"])}}]),
           attempt(nft, rules.skeleton("t")),
           attempt(nft, [{"delete": {"map": dict(T, name="any4_ip")}}]),  # the DNAT uses it
           attempt(nft, [{"flush": {"chain": dict(T, name="prerouting")}},
                         {"flush": {"chain": dict(T, name="output")}},
                         {"delete": {"map": dict(T, name="any4_ip")}}]),
           attempt(nft, [{"flush": {"set": dict(T, name="nope")}}]),
           attempt(nft, [{"flush": {"set": {"family": "inet", "table": "nope", "name": "s"}}}]),
           attempt(nft, [{"create": {"table": {"family": "inet", "name": "t"}}}]),
           attempt(nft, [{"delete": {"table": {"family": "inet", "name": "nope"}}}]),
           attempt(nft, rules.drop_table("nope")),
           attempt(nft, [{"add": {"table": {"family": "inet", "name": "u", "comment": "tc"}}},
                         {"add": {"set": {"family": "inet", "table": "u", "name": "s",
                                          "type": "inet_service", "comment": "sc"}}}])]
    nft.table_comment("u")
    nft.set_comment("u", "s")
    nft.table_comment("nope")
    nft.set_comment("nope", MARKER_SET)
    nft.set_comment("t", "hairpin")
    nft.set_comment("t", MARKER_SET)
    nft.mark_table("u", TABLE_COMMENT, MARKER_SET)
    nft.set_comment("u", MARKER_SET)
    nft.create_table("t", "another comment", MARKER_SET)  # there: nothing changes
    nft.table_comment("t")
    nft.create_table("t", TABLE_COMMENT, MARKER_SET, replace=True)
    nft.list_table("t")
    nft.list_table("nope")
    with pytest.raises(HostError):
        nft.mark_table("nope", TABLE_COMMENT, MARKER_SET)
    return out


DECLARATIONS = [EXISTS, EXISTS, None, BUSY, None, ABSENT, ABSENT, EXISTS, ABSENT, None, None]


def chains_case(nft: FakeNft) -> List[Optional[str]]:
    """A foreign table's chains: listing them, inserting and deleting rules."""
    nft.apply(libvirt_network("virbr0", "192.168.122.0/24"))
    where = {"family": "ip", "table": "libvirt_network", "chain": "guest_input"}
    mark = {"ct": {"key": "mark"}}
    accept = {"insert": {"rule": dict(where, comment=compat.COMMENT, expr=[
        {"match": {"op": "==", "left": {"meta": {"key": "oifname"}}, "right": "virbr0"}},
        {"match": {"op": "in", "left": {"ct": {"key": "status"}}, "right": "dnat"}},
        {"match": {"op": "==", "left": {"&": [mark, MARK]}, "right": MARK}},
        {"counter": None}, {"accept": None}])}}
    nft.list({"chains": {}})
    out = [attempt(nft, [accept])]
    listed = nft.list({"chain": {"family": "ip", "table": "libvirt_network", "name": "guest_input"}})
    handle = [o["rule"]["handle"] for o in listed or [] if "rule" in o][0]
    out += [attempt(nft, [{"delete": {"rule": dict(where, handle=handle)}}]),
            attempt(nft, [{"delete": {"rule": dict(where, handle=handle)}}]),
            attempt(nft, [accept, accept]),
            attempt(nft, [{"add": {"rule": dict(where, chain="nope", expr=[{"accept": None}])}}]),
            attempt(nft, [{"add": {"rule": dict(where, expr=[
                {"match": {"op": "==", "left": {"meta": {"key": "oifname"}},
                           "right": "@nope"}}])}}])]
    nft.list({"chain": {"family": "ip", "table": "libvirt_network", "name": "guest_input"}})
    nft.list({"chain": {"family": "ip", "table": "libvirt_network", "name": "nope"}})
    nft.list({"chain": {"family": "ip6", "table": "libvirt_network", "name": "guest_input"}})
    return out


CHAINS = [None, None, ABSENT, None, ABSENT, ABSENT]
CASES: Dict[str, Callable[[FakeNft], List[Optional[str]]]] = {
    "elements": elements_case, "declarations": declarations_case, "chains": chains_case}
EXPECTED = {"elements": ELEMENTS, "declarations": DECLARATIONS, "chains": CHAINS}


@pytest.mark.parametrize("case", list(CASES))
def test_fake_refuses_what_nftables_refuses(case: str) -> None:
    assert CASES[case](FakeNft()) == EXPECTED[case]


def test_fake_answers_reads_from_its_model() -> None:
    nft = FakeNft()
    declarations_case(nft)
    answers = {(c.kind, json.dumps(c.payload, sort_keys=True)): c.answer for c in nft.calls
               if c.kind in ("table_comment", "set_comment")}
    assert answers == {
        ("table_comment", '{"table": "u"}'): "",  # JSON gives no comment
        ("set_comment", '{"name": "s", "table": "u"}'): "",
        ("table_comment", '{"table": "nope"}'): None,
        ("set_comment", '{"name": "managed_by_portfwd", "table": "nope"}'): None,
        ("set_comment", '{"name": "hairpin", "table": "t"}'): "",
        ("set_comment", '{"name": "managed_by_portfwd", "table": "t"}'): TABLE_COMMENT,
        ("set_comment", '{"name": "managed_by_portfwd", "table": "u"}'): TABLE_COMMENT,
        ("table_comment", '{"table": "t"}'): TABLE_COMMENT}
    replaced = listing(nft.ruleset, "inet", "t") or []
    assert [list(o) for o in replaced] == [["table"], ["set"]]  # replace=True: the marker alone


def test_fake_records_calls_as_nft_makes_them() -> None:
    """An empty batch reaches no nftables; the variant is probed once per process."""
    nft = FakeNft(concat=True)
    nft.apply([])
    assert nft.concat_values() and nft.concat_values()
    nft.set_comment("t", MARKER_SET)
    assert [c.kind for c in nft.calls] == ["concat_values", "set_comment"]
    assert nft.calls == nft.ruleset.log


def test_concatenated_values_are_refused_where_nftables_crashes_on_them() -> None:
    nft = FakeNft(concat=False)
    nft.create_table("t", TABLE_COMMENT, MARKER_SET)
    with pytest.raises(AssertionError, match="concatenated value"):
        nft.apply(rules.skeleton("t", variant=rules.CONCAT))
    newer = FakeNft(concat=True)  # nftables 1.1 takes them
    newer.create_table("t", TABLE_COMMENT, MARKER_SET)
    newer.apply(rules.full_rebuild("t", [], rules.CONCAT))


def test_unmodelled_commands_are_not_accepted_silently() -> None:
    nft = FakeNft()
    with pytest.raises(AssertionError, match="does not model"):
        nft.apply([{"add": {"flowtable": {"family": "inet", "table": "t", "name": "f"}}}])
    with pytest.raises(AssertionError, match="does not model"):
        nft.list({"ruleset": {}})


# -- the same calls through the kernel ------------------------------------------------------

REPLAY = """
import json, sys
from portfwd.host import guard
from portfwd.errors import HostError
from portfwd.host.nft import Nft

nft = Nft()
answers = []
for call in json.load(sys.stdin):
    kind = call.pop("call")
    try:
        if kind == "guard":
            answers.append(guard.present(call["table"]))
        elif kind == "concat_values":
            answers.append(nft.concat_values())
        else:
            answers.append(getattr(nft, kind)(**call))
    except HostError as e:
        answers.append({"refused": str(e)})
tables = [o["table"] for o in nft.list({"tables": {}}) or []]
final = {f"{t['family']} {t['name']}": nft.list({"table": {"family": t["family"],
                                                            "name": t["name"]}})
         for t in tables}
print(json.dumps({"answers": answers, "tables": final}))
"""


def kernel_replay(log: List[Call]) -> Json:
    """Every call of ``log`` made again through ``Nft`` in a new network namespace
    (gone with the process): each one's answer, and every table in the end."""
    calls = [{"call": c.kind, **c.payload} for c in log]
    r = subprocess.run(["unshare", "--net", sys.executable, "-c", REPLAY],
                       input=json.dumps(calls).encode(), capture_output=True, timeout=300)
    assert r.returncode == 0, r.stderr.decode()
    out: Json = json.loads(r.stdout)
    return out


def assert_kernel_agrees(rs: Ruleset) -> None:
    real = kernel_replay(rs.log)
    assert len(real["answers"]) == len(rs.log)
    for i, (call, answer) in enumerate(zip(rs.log, real["answers"])):
        where = f"call {i} ({call.kind} {json.dumps(call.payload)[:300]})"
        refused = answer.get("refused") if isinstance(answer, dict) else None
        if call.kind in WRITES:
            said = reason(refused) if refused else None
            fake = reason(call.refused) if call.refused else None
            assert fake == said, f"{where}: the fake said {fake}, nftables {said}"
        elif call.kind in ("list", "list_table"):
            assert normalised(call.answer) == normalised(answer), where
        else:
            assert call.kind in READS + ("guard",), where
            assert call.answer == answer, f"{where}: the fake said {call.answer!r}, the kernel {answer!r}"
    fake_tables = {f"{f} {n}": listing(rs, f, n) for f, n in rs.tables}
    assert sorted(fake_tables) == sorted(real["tables"])
    for name, objects in fake_tables.items():
        assert normalised(objects) == normalised(real["tables"][name]), name


@pytest.mark.kernel
@pytest.mark.parametrize("case", list(CASES))
def test_fake_semantics_match_the_kernel(case: str) -> None:
    nft = FakeNft()
    CASES[case](nft)
    assert_kernel_agrees(nft.ruleset)


@pytest.mark.kernel
@pytest.mark.parametrize("name", [n for n in SCENARIOS if n not in FAKE_ONLY])
def test_engine_scenario_replays_alike_in_the_kernel(host: EngineHost, name: str) -> None:
    SCENARIOS[name](host)
    assert_kernel_agrees(host.ruleset)
