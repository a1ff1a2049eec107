"""state.Store, the owner of /run/portfwd, on a temporary directory (no root)."""

from __future__ import annotations

import json
import os
import sys
from typing import Any, List

import pytest

from portfwd.rundir import atomicfile, run_compiled, run_host, state
from portfwd.plan import Binding
from portfwd.rundir.record import GuestState
from portfwd.values import Bridges, PortSpan


def _bridges(st: GuestState) -> Bridges:
    return Bridges.of(st.table, {(4, "virbr0")}, {"virbr0"} if st.guest == "web1" else set())


def test_guests_and_summary_round_trip(tmp_path: "os.PathLike[str]") -> None:
    store = state.Store(str(tmp_path))
    b = Binding("fwd", 4, ("127.0.0.1", "tcp", PortSpan(8080)), "192.168.122.10", 80, "web1", "c",
                "forward[0].ports[0]")
    store.write_guests([GuestState("web1", None, "portfwd", [b]),
                        GuestState("db 1", None, "other", [b])], _bridges)
    assert sorted(st.guest for st in store.all_guests()) == ["db 1", "web1"]
    assert store.read_guest("web1") is not None and store.read_guest("nobody") is None
    assert store.commit() and not store.commit()  # written once, then nothing changed
    with open(os.path.join(str(tmp_path), run_host.HOST), encoding="utf-8") as f:
        assert json.load(f)["guests"] == {"db 1": ["4:virbr0", "T:other"],
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
    for text in ("[1]", '{"web1": {"vnet3": [17]}}', '{"web1": 3}', "{"):
        with open(os.path.join(str(tmp_path), "ports.json"), "w") as f:
            f.write(text)
        assert state.Store(str(tmp_path)).hairpin_ports() == {}
    for text in ('{"ports": {"web1": 3}}', "{", "[]"):
        with open(os.path.join(str(tmp_path), run_host.HOST), "w") as f:
            f.write(text)
        assert state.Store(str(tmp_path)).hairpin_ports() == {}


def test_host_record_is_one_file_written_once(tmp_path: "os.PathLike[str]") -> None:
    """The summary, hairpin sets, route_localnet, hairpin ports and libvirt accepts live
    in host.json, changed in memory and written by one ``commit``; another Store (a
    later run) reads them back."""
    root = str(tmp_path)
    store = state.Store(root)
    store.write_summary({"web1": Bridges.of("portfwd", {(4, "virbr0")})})
    store.write_hairpin({"portfwd": ["virbr0"]})
    store.write_localnet(["virbr0"])
    store.write_hairpin_ports({"web1": {"vnet0": (7, "0")}})
    store.write_accepts({4: ["virbr0"], 6: []})
    assert not os.path.exists(os.path.join(root, run_host.HOST))
    assert store.commit() and os.listdir(root) == [run_host.HOST]
    later = state.Store(root)
    assert later.hairpin() == {"portfwd": ["virbr0"]} and later.localnet() == ["virbr0"]
    assert later.hairpin_ports() == {"web1": {"vnet0": (7, "0")}}
    assert later.accepts() == {4: ["virbr0"]}
    assert later.read_summary(_bridges)["web1"].routed == {(4, "virbr0")}
    later.write_localnet(["virbr0"])  # unchanged: nothing to write
    assert not later.commit()
    store.write_localnet([])  # the first Store sees the later one's file, not its own copy
    assert store.commit() and state.Store(root).localnet() == []


def test_files_of_earlier_versions_fold_into_the_host_record(
        tmp_path: "os.PathLike[str]") -> None:
    root = str(tmp_path)
    old = {"bridges.json": {"web1": ["4:virbr0", "T:portfwd"]},
           "hairpin.json": {"portfwd": ["virbr0"]}, "localnet.json": ["virbr0"],
           "ports.json": {"web1": {"vnet0": [7, "0"]}}}
    for name, value in old.items():
        with open(os.path.join(root, name), "w") as f:
            json.dump(value, f)
    store = state.Store(root)
    assert store.hairpin() == {"portfwd": ["virbr0"]} and store.localnet() == ["virbr0"]
    assert store.hairpin_ports() == {"web1": {"vnet0": (7, "0")}}
    assert list(store.read_summary(_bridges)) == ["web1"]
    assert store.commit()
    assert os.listdir(root) == [run_host.HOST]  # the old files went with the first write
    assert state.Store(root).hairpin() == {"portfwd": ["virbr0"]}


# -- what a killed run leaves, and the writes that leave nothing ----------------------

FS_CALLS = {"mkdir", "open", "write", "close", "symlink", "replace", "unlink", "rmdir",
            "listdir", "scandir", "readlink", "dump", "link", "fchmod", "fsync", "lstat"}


def leftovers(root: str) -> List[str]:
    """What the crash tests count as left behind (tests/test_crash.py)."""
    guests = os.path.join(root, "guests")
    names = os.listdir(root) + [f"guests/{n}" for n in
                                (os.listdir(guests) if os.path.isdir(guests) else [])]
    current = os.readlink(os.path.join(root, "compiled"))
    return [n for n in names if ".tmp." in n or n.startswith("compiled.new.")
            or (n.startswith("compiled.") and n != current)]


def _killed_at(root: str, step: int) -> bool:
    """Fork a run that takes the lock and compiles the "new" cache, SIGKILLed just
    before its ``step``-th file-system call; True if it finished first."""
    import signal

    pid = os.fork()
    if pid == 0:  # the child: never returns into pytest
        calls = 0

        def profile(frame: Any, event: str, arg: Any) -> None:
            nonlocal calls
            if event == "c_call" and getattr(arg, "__name__", "") in FS_CALLS:
                calls += 1
                if calls == step:
                    os.kill(os.getpid(), signal.SIGKILL)

        try:
            sys.setprofile(profile)
            with state.locked(root):
                run_compiled.write(root, {("name", "web1"): [], ("uuid", "u1"): []},
                                   ("portfwd", True, []), "new")
        finally:
            sys.setprofile(None)
            os._exit(0)
    _, status = os.waitpid(pid, 0)
    return os.WIFEXITED(status)


def test_a_run_killed_anywhere_in_a_compile_leaves_nothing_the_next_run_keeps(
        tmp_path: "os.PathLike[str]") -> None:
    """SIGKILL before every file-system call of a run that sweeps and compiles: the
    next run's sweep leaves nothing temporary, and the cache is the old or the new
    one, whole. A kill per call, not a random sample of them."""
    import marshal  # noqa: F401  (imported before the count starts, as in a run)
    import shutil

    root = os.path.join(str(tmp_path), "run")
    step = 0
    while True:
        step += 1
        assert step < 1000, "the run never finished"
        shutil.rmtree(root, ignore_errors=True)
        run_compiled.write(root, {("name", "web1"): []}, ("portfwd", False, []), "old")
        # what an earlier killed run left, for the sweep in the killed run to meet
        os.mkdir(os.path.join(root, "compiled.999.0badf00d"))
        os.symlink("compiled.999.0badf00d", os.path.join(root, "compiled.new.999.0badf00d"))
        os.makedirs(os.path.join(root, "guests"))
        with open(os.path.join(root, "guests", "web1.json.tmp.999.0badf00d"), "w") as f:
            f.write("{")
        finished = _killed_at(root, step)
        with state.locked(root):  # the next run
            pass
        assert leftovers(root) == [], f"killed before call {step}"
        signature = state.cached_signature(root)
        assert signature in ("old", "new"), f"killed before call {step}: {signature!r}"
        hit = run_compiled.read(root, "web1", "u1" if signature == "new" else None, "/nonexistent")
        assert hit is None  # the signature differs from the file's: stale, but readable
        with open(os.path.join(root, "compiled", "options"), "rb") as f:
            assert marshal.load(f)[1] is (signature == "new")
        if finished:
            assert signature == "new" and step > 10
            return


def test_a_new_cache_never_reuses_a_folder_name(tmp_path: "os.PathLike[str]",
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """A pid comes round again: the folder name a run picks may be the one the
    ``compiled`` link points to. It is never emptied and reused: another name."""
    root = str(tmp_path)
    # folder and link of the first write; the second's folder: taken, then another
    picks = iter([b"\0" * 4, b"\x09" * 4, b"\0" * 4, b"\1" * 4, b"\x09" * 4])
    monkeypatch.setattr(os, "urandom", lambda n: next(picks))
    run_compiled.write(root, {("name", "web1"): []}, ("portfwd", False, []), "old")
    first = os.readlink(os.path.join(root, "compiled"))
    assert first.endswith(".00000000")
    run_compiled.write(root, {("name", "web1"): []}, ("portfwd", False, []), "new")
    assert os.readlink(os.path.join(root, "compiled")).endswith(".01010101")
    assert state.cached_signature(root) == "new"
    assert sorted(os.listdir(root)) == ["compiled", os.readlink(os.path.join(root, "compiled"))]


def test_write_atomic_never_follows_a_link_planted_at_its_temporary_name(
        tmp_path: "os.PathLike[str]", monkeypatch: pytest.MonkeyPatch) -> None:
    """Someone who can write the folder plants a symlink where the temporary file
    will be made: O_EXCL refuses it, another name is taken, the target is intact."""
    folder = str(tmp_path)
    victim = os.path.join(folder, "victim")
    with open(victim, "w") as f:
        f.write("mine\n")
    out = os.path.join(folder, "forward.toml")
    planted = f"{out}.tmp.{os.getpid()}.00000000"
    os.symlink(victim, planted)
    picks = iter([b"\0" * 4, b"\2" * 4])
    monkeypatch.setattr(os, "urandom", lambda n: next(picks))
    os.umask(0o077)
    try:
        atomicfile.write_atomic(out, b"new\n", mode=0o644, durable=True)
    finally:
        os.umask(0o022)
    with open(victim) as f:
        assert f.read() == "mine\n"
    with open(out) as f:
        assert f.read() == "new\n"
    assert os.stat(out).st_mode & 0o777 == 0o644  # whatever the umask
    assert os.path.islink(planted)  # someone else's: left alone
    assert sorted(os.listdir(folder)) == sorted(["victim", "forward.toml",
                                                 os.path.basename(planted)])


def test_write_atomic_without_replace_and_on_errors_leaves_no_temporary_file(
        tmp_path: "os.PathLike[str]") -> None:
    folder = str(tmp_path)
    out = os.path.join(folder, "out")
    os.symlink("/nonexistent", out)  # exists (as a dangling link): not replaced, not followed
    with pytest.raises(FileExistsError):
        atomicfile.write_atomic(out, b"x", replace=False)
    assert os.readlink(out) == "/nonexistent" and os.listdir(folder) == ["out"]
    os.unlink(out)
    os.mkdir(out)  # a folder there: the rename fails
    with pytest.raises(OSError):
        atomicfile.write_atomic(out, b"x")
    assert os.listdir(folder) == ["out"]
    atomicfile.write_atomic(os.path.join(folder, "new"), b"x", replace=False)
    assert sorted(os.listdir(folder)) == ["new", "out"]
