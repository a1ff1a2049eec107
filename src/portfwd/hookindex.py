"""The hook index: what lets the hook's sh lines answer a guest without Python.

libvirt runs the qemu hook for every guest and phase; most calls concern guests
portfwd has nothing for. Whatever compiles the configuration (under the lock)
also writes, under the run directory, an index that ``hook/qemu`` reads with
shell builtins only (``test``; no fork, no ``read`` loop):

    hookindex -> hookindex.PID.RANDOM/   swapped in one rename, like ``compiled``
        v1          the format (the sh lines of another version look for theirs)
        config      symlink to the configuration this index was compiled from
        stamp       empty; its mtime S: the configuration is unchanged as long as
                    its mtime, and its folder's, are older than S
        sha256      of the configuration's bytes as compiled (``refresh``)
        n/NAME      one empty file per guest name that has forwards or recorded
                    state (the name's bytes, as libvirt passes it in argv)
        all         present when a guest may be managed whatever its name
                    (forwards by UUID; ``domain_forwards``: forwards in a domain's
                    own XML): every apply asks Python
        replaced    in a folder the link no longer names: since when (the
                    folder goes RETIRED_NS later, not while a hook may read it)

The sh lines trust the index when ``v1`` is root's, ``config`` is the same file
as the configuration path they were given, and ``stamp`` is newer (nanoseconds:
dash's ``-nt``) than the configuration and its folder; then a guest not in
``n/`` (and, for a name that is its own state file name, without
``guests/NAME.json``) needs nothing: exit 0. Anything else runs Python.

Why S is MARGIN before the configuration was read: a file system stamps a
write with a time up to its granularity (a jiffy; a second on some) before the
write, so a change after the read always gets an mtime at or after S, never
older: the stamp is then no longer newer. A configuration changed less than
MARGIN before it was compiled therefore gets an index that is not yet trusted;
the next Python run that finds it so (``refresh``) re-stamps it after comparing
the file's bytes with ``sha256``. A change that puts an older mtime back on the
same file in place (``cp -p`` over it, ``touch -d``) is not seen: ``portfwd
check`` or ``sync`` recompiles. A rename into the folder (an editor's save, a
``mv`` of a prepared file) changes the folder's mtime and is seen.

The run directory must be root's and writable by root alone (the writer checks
it and writes no index otherwise); a configuration path with a symlink on the
way gets no index either (a change behind the link would not be seen).
"""

from __future__ import annotations

import os
import stat
import time

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Iterable, List, Optional, Tuple

    from portfwd.config.model import Config

INDEX = "hookindex"
FORMAT = "v1"
MARGIN_NS = 2_000_000_000  # the coarsest file system time granularity trusted (FAT: 2 s)
RETIRED_NS = 60_000_000_000  # a replaced index folder stays this long (a slow reader)
NAME_MAX = 255  # bytes; longer names are not listed (the sh lines look up 63 characters
# at most: 255 bytes whether a shell counts bytes or characters)
SAFE = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_-")


def snapshot(config_path: str) -> Optional[Tuple[int, str]]:
    """(S, sha256 of the bytes) of the configuration as read now; None if it is not
    a regular file or cannot be read. Taken before and after ``load``: equal
    digests say ``load`` parsed those bytes."""
    import hashlib

    since = time.time_ns() - MARGIN_NS
    try:
        fd = os.open(config_path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return None
        digest = hashlib.sha256()
        while True:
            chunk = os.read(fd, 1 << 16)
            if not chunk:
                break
            digest.update(chunk)
    except OSError:
        return None
    finally:
        os.close(fd)
    return since, digest.hexdigest()


def write(root: str, config_path: str, names: Iterable[str], every: bool,
          before: Optional[Tuple[int, str]], after: Optional[Tuple[int, str]]) -> None:
    """Replace the index (caller holds the lock): ``names`` are the guests with
    forwards or recorded state, ``every`` that any guest may be managed;
    ``before``/``after``: ``snapshot`` around the compile. Writes no index (and
    removes the old one) when the sh lines could not trust it."""
    if (before is None or after is None or before[1] != after[1] or not trusted_root(root)
            or not plain_path(config_path)):
        remove(root)
        return
    encoded = []
    for name in set(names):
        try:
            data = os.fsencode(name)
        except UnicodeError:  # a name no argv can carry: nothing to look up
            continue
        if lookable(data):
            encoded.append(data)
    folder = _new_folder(root)
    os.mkdir(os.path.join(folder, "n"), 0o700)
    for data in encoded:
        os.close(os.open(os.path.join(os.fsencode(folder), b"n", data),
                         os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600))
    if every:
        _touch(os.path.join(folder, "all"))
    os.symlink(os.path.abspath(config_path), os.path.join(folder, "config"))
    with open(os.path.join(folder, "sha256"), "x", encoding="ascii") as f:
        f.write(before[1])
    _stamp(folder, before[0])
    _touch(os.path.join(folder, FORMAT))
    link = os.path.join(root, INDEX)
    previous = _current(root)
    tmp = os.path.join(root, f"{INDEX}.new.{os.getpid()}.{os.urandom(4).hex()}")
    os.symlink(os.path.basename(folder), tmp)
    os.replace(tmp, link)
    _retire(root, previous)
    _clean(root, os.path.basename(folder))


def refresh(root: str, config_path: str) -> bool:
    """Re-stamp an index the configuration's mtime made untrusted, when the file's
    bytes are still those it was compiled from (caller holds the lock, and knows
    the compiled cache current). Whether the index is trusted now."""
    if trusted(root, config_path):
        return True
    folder = os.path.join(root, INDEX)
    try:
        with open(os.path.join(folder, "sha256"), encoding="ascii") as f:
            compiled = f.read()
        if not os.path.samefile(os.path.join(folder, "config"), config_path):
            return False
    except OSError:
        return False
    now = snapshot(config_path)
    if now is None or now[1] != compiled or not trusted_root(root):
        return False
    try:
        _stamp(os.path.realpath(folder), now[0])
    except OSError:
        return False
    return trusted(root, config_path)


def trusted(root: str, config_path: str) -> bool:
    """What the sh lines decide about the index as a whole."""
    folder = os.path.join(root, INDEX)
    try:
        if (os.stat(root).st_uid != os.geteuid() or not os.path.isdir(os.path.join(folder, "n"))
                or os.stat(os.path.join(folder, FORMAT)).st_uid != os.geteuid()):
            return False
        if not os.path.samefile(os.path.join(folder, "config"), config_path):
            return False
        since = os.stat(os.path.join(folder, "stamp")).st_mtime_ns
        config = os.stat(config_path).st_mtime_ns
        parent = os.stat(os.path.join(os.path.dirname(config_path), ".")).st_mtime_ns
    except OSError:
        return False
    return since > config and since > parent


def remove(root: str) -> None:
    """No index: the sh lines ask Python for every guest."""
    previous = _current(root)
    try:
        os.unlink(os.path.join(root, INDEX))
    except FileNotFoundError:
        pass
    _retire(root, previous)
    _clean(root, "")


def lookable(name: bytes) -> bool:
    """Whether the sh lines look ``name`` up in the index (else they ask Python)."""
    return bool(name) and name not in (b".", b"..") and b"/" not in name and len(name) <= NAME_MAX


def trusted_root(root: str) -> bool:
    """The run directory is a directory of this user (root) that no one else may write."""
    try:
        st = os.lstat(root)
    except OSError:
        return False
    return (stat.S_ISDIR(st.st_mode) and st.st_uid == os.geteuid()
            and not st.st_mode & (stat.S_IWGRP | stat.S_IWOTH))


def plain_path(path: str) -> bool:
    """An absolute path without symlinks on the way (the sh lines compare the
    mtimes of the file and of its folder as named)."""
    return os.path.isabs(path) and os.path.realpath(path) == os.path.normpath(path)


def _new_folder(root: str) -> str:
    while True:
        folder = os.path.join(root, f"{INDEX}.{os.getpid()}.{os.urandom(4).hex()}")
        try:
            os.mkdir(folder, 0o700)
            return folder
        except FileExistsError:
            continue


def _touch(path: str) -> None:
    os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600))


def _stamp(folder: str, since: int) -> None:
    """``stamp`` with mtime ``since``, put in place by a rename."""
    tmp = os.path.join(folder, f"stamp.new.{os.getpid()}.{os.urandom(4).hex()}")
    _touch(tmp)
    os.utime(tmp, ns=(since, since))
    os.replace(tmp, os.path.join(folder, "stamp"))


def _current(root: str) -> str:
    """The folder name the index link points to ("" if none)."""
    try:
        return os.path.basename(os.readlink(os.path.join(root, INDEX)))
    except OSError:
        return ""


def _retire(root: str, name: str) -> None:
    """Mark folder ``name`` replaced now (``_clean`` removes it RETIRED_NS later)."""
    if name.startswith(INDEX + "."):
        try:
            _touch(os.path.join(root, name, "replaced"))
        except OSError:
            pass


def _clean(root: str, keep: str) -> None:
    """Remove the temporary links and the index folders but ``keep`` that were
    replaced (or, unmarked: a killed writer's, made) more than RETIRED_NS ago: a
    hook's sh lines may still be looking names up in a folder just replaced, and
    a name missing from a folder half removed would read as "no forwards"."""
    import shutil

    try:
        names = os.listdir(root)
    except OSError:
        return
    old = time.time_ns() - RETIRED_NS
    for name in names:
        if not name.startswith(INDEX + ".") or name == keep:
            continue
        path = os.path.join(root, name)
        try:
            if os.path.islink(path) or not os.path.isdir(path):
                os.unlink(path)
                continue
            marker = os.path.join(path, "replaced")
            since = os.stat(marker if os.path.exists(marker) else path).st_mtime_ns
        except OSError:
            continue
        if since < old:
            shutil.rmtree(path, ignore_errors=True)


def after_compile(root: str, config_path: str, config: Config,
                  before: Optional[Tuple[int, str]]) -> None:
    """The index of a configuration just compiled (``Engine.compile``, under the
    lock): its guests by name, and every guest with recorded state. Never fails
    the compile: an index that cannot be written is removed (Python answers)."""
    try:
        names = [f.guest for f in config.forwards if f.guest is not None]
        # forwards by UUID, or in a domain's <metadata> (only the XML tells): any guest
        every = len(names) < len(config.forwards) or config.options.domain_forwards
        write(root, config_path, names + recorded_names(root), every, before,
              snapshot(config_path))
    except (OSError, ValueError) as e:  # ValueError: a state file name not file_name's
        from portfwd import log

        log.warning(f"{os.path.join(root, INDEX)}: {e}; every hook call runs Python")
        try:
            remove(root)
        except OSError:
            pass


def recorded_names(root: str) -> List[str]:
    """The guests with a state file (guests/NAME.json, named by ``state.file_name``)."""
    folder = os.path.join(root, "guests")
    try:
        files = os.listdir(folder)
    except FileNotFoundError:
        return []
    out = []
    for file in files:
        if not file.endswith(".json"):
            continue
        stem = file[:-len(".json")]
        if "~" in stem:  # hashed: the name is only in the file
            import json

            try:
                with open(os.path.join(folder, file), encoding="utf-8") as f:
                    out.append(str(json.load(f)["guest"]))
            except (OSError, ValueError, KeyError, TypeError):
                raise OSError(f"cannot read the guest name in {os.path.join(folder, file)}")
            continue
        out.append(_unquote(stem))
    return out


def _unquote(stem: str) -> str:
    """The guest name ``state.file_name`` made ``stem`` of (not a hashed one)."""
    if stem == "%":
        return ""
    data = bytearray()
    i = 0
    while i < len(stem):
        if stem[i] == "%":
            data.append(int(stem[i + 1:i + 3], 16))
            i += 3
        else:
            data.extend(stem[i].encode())
            i += 1
    return data.decode("utf-8", "surrogatepass")
