"""state.Store, the owner of /run/portfwd, on a temporary directory (no root)."""

from __future__ import annotations

import json
import os

from portfwd import state
from portfwd.plan import Binding
from portfwd.record import GuestState
from portfwd.values import Bridges


def _bridges(st: GuestState) -> Bridges:
    return Bridges.of(st.table, {(4, "virbr0")}, {"virbr0"} if st.guest == "web1" else set())


def test_guests_and_summary_round_trip(tmp_path: "os.PathLike[str]") -> None:
    store = state.Store(str(tmp_path))
    b = Binding("fwd", 4, ("127.0.0.1", "tcp", 8080), "192.168.122.10", 80, "web1", "c",
                "forward[0].ports[0]")
    store.write_guests([GuestState("web1", None, "portfwd", [b]),
                        GuestState("db 1", None, "other", [b])], _bridges)
    assert sorted(st.guest for st in store.all_guests()) == ["db 1", "web1"]
    assert store.read_guest("web1") is not None and store.read_guest("nobody") is None
    with open(os.path.join(str(tmp_path), state.SUMMARY), encoding="utf-8") as f:
        assert json.load(f) == {"db 1": ["4:virbr0", "T:other"],
                                "web1": ["4:virbr0", "L:virbr0", "T:portfwd"]}
    summary = store.read_summary(_bridges)
    assert summary["web1"].table == "portfwd" and summary["web1"].localnet == {"virbr0"}
    store.write_guests([GuestState("web1", None, "portfwd", [])], _bridges)  # forgotten
    assert [st.guest for st in store.all_guests()] == ["db 1"]
    assert list(store.read_summary(_bridges)) == ["db 1"]
    assert state.has_forwards(str(tmp_path))


def test_hairpin_layout_and_clear(tmp_path: "os.PathLike[str]") -> None:
    store = state.Store(str(tmp_path))
    assert store.hairpin() == {} and store.localnet() == [] and store.layout("t") is None
    store.write_hairpin({"t": ["virbr0"]})
    store.remember_layout("t", "4")
    store.write_localnet(["virbr1", "virbr0"])
    assert store.hairpin() == {"t": ["virbr0"]} and store.layout("t") == "4"
    assert store.localnet() == ["virbr0", "virbr1"]
    store.forget_hairpin("t")
    assert store.hairpin() == {}
    store.write_hairpin_ports({"web1": {"vnet3": (17, "0")}})
    store.clear()
    assert store.layout("t") is None and store.localnet() == ["virbr0", "virbr1"]
    # kept, so that the hairpin modes are put back after a flush
    assert store.hairpin_ports() == {"web1": {"vnet3": (17, "0")}}


def test_unreadable_hairpin_ports_read_as_none(tmp_path: "os.PathLike[str]") -> None:
    store = state.Store(str(tmp_path))
    for text in ("[1]", '{"web1": {"vnet3": [17]}}', '{"web1": 3}', "{"):
        with open(os.path.join(str(tmp_path), "ports.json"), "w") as f:
            f.write(text)
        assert store.hairpin_ports() == {}
