"""forward.toml → Config, with every error located as PATH:LINE:COL."""

from __future__ import annotations

import os
import re
import stat
import struct
import uuid as uuidlib
from ipaddress import (IPv4Address, IPv6Address, ip_address, ip_network)
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

from . import installpaths, keys, portspec
from .conflicts import (Claim, claimed_where, claims_of, clash_message, crowd_message,
                        find_conflicts, group_conflicts)
from .constants import DEFAULT_TABLE, DISCOVER_SOURCES
from .domainxml import mac_problem
from .errors import ConfigError
from .model import (Config, Forward, IPAddress, IPNetwork, Listen,
                    Options, PortForward, Where)
from .pathwalk import walk
from .suggest import did_you_mean
from .tomlpos import Path, Positions, deepest, locate

from .toml import tomllib

TABLE_NAME = re.compile(r"[A-Za-z][A-Za-z0-9_]{0,63}\Z")
# the keys each table accepts: keys.KEYS, which forward.toml(5) is written from
OPTION_KEYS = keys.names("options")
FORWARD_KEYS = keys.names("forward")
IFNAME = re.compile(r"(?=.*[A-Za-z])[A-Za-z0-9_.-]{1,15}\Z")
PORT_KEYS = keys.names("port")
BARE_KEY = re.compile(r"[A-Za-z0-9_-]+\Z")
MAX_NESTING = 50  # where a document nested deeper than Python can parse is reported


def load(path: str) -> Config:
    """Read, check and parse the file at ``path``; ConfigError lists every problem."""
    return parse(read(path), path)


# -- trust: who could change what portfwd reads ------------------------------

ACL_ACCESS = "system.posix_acl_access"
ACL_USER, ACL_GROUP_OBJ, ACL_GROUP, ACL_MASK = 0x02, 0x04, 0x08, 0x10
ACL_UNREADABLE = 0  # stands for an ACL portfwd cannot parse
ACL_WRITE = 0x02
MOVE_HINT = ("fix: keep the configuration in a directory only root can write, such as"
             " /etc/portfwd (the default path is /etc/portfwd/forward.toml)")
REGULAR_HINT = ("fix: make the configuration a regular file in a directory only root can write,"
                " such as /etc/portfwd/forward.toml (the default path)")
_KINDS = ((stat.S_ISDIR, "directory"), (stat.S_ISFIFO, "FIFO"), (stat.S_ISCHR, "character device"),
          (stat.S_ISBLK, "block device"), (stat.S_ISSOCK, "socket"),
          (stat.S_ISLNK, "symbolic link"))


def read(path: str) -> str:
    """The text of the configuration at ``path``, read only if root alone could have
    written it; ConfigError otherwise.

    The rule: ``path`` is resolved one component at a time (as the kernel does,
    following every symlink), and every directory in which a name is looked up
    (each ancestor of the real file and each directory holding a symlink of the
    chain) must be owned by root and writable by root alone (mode bits and POSIX
    ACL). One exception: a root-owned directory with the sticky bit (such as /tmp)
    may be writable by others when the entry portfwd passes through in it is owned
    by root (which the sticky bit protects) and is not the file itself. The file
    must be a regular file owned by root, writable by root alone, whatever its
    group. It is opened without following symlinks and without blocking, judged
    by ``fstat`` of that descriptor, and read from that same descriptor.
    """
    fd, problems = _open_trusted(path)
    if fd is None:
        raise ConfigError(problems)
    try:
        if problems:
            raise ConfigError(problems)
        chunks = []
        while True:
            chunk = os.read(fd, 1 << 16)
            if not chunk:
                break
            chunks.append(chunk)
    except OSError as e:
        raise ConfigError([f"{path}: cannot read: {e.strerror}"]) from None
    finally:
        os.close(fd)
    data = b"".join(chunks)
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data[:e.start].count(b"\n") + 1
        col = e.start - (data.rfind(b"\n", 0, e.start) + 1) + 1
        raise ConfigError([f"{path}:{line}:{col}: not UTF-8 text"]) from None


def strict_setting(path: str) -> Optional[bool]:
    """``[options] strict`` as a file that fails validation still says it, for the
    hook; None when the file is missing, untrusted (see ``read``), not TOML or silent.
    Never blocks (a FIFO is refused unopened) and never raises."""
    try:
        data = tomllib.loads(read(path))
    except (ConfigError, ValueError, RecursionError):
        return None
    options = data.get("options")
    value = options.get("strict") if isinstance(options, dict) else None
    return value if isinstance(value, bool) else None


def example_config() -> str:
    """Where a missing configuration's error sends the admin: the commented example the
    Debian package ships, else the one beside portfwd's code, else the manual page."""
    here = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "forward.toml")
    for example in (installpaths.DEB_EXAMPLE, here):
        if os.path.isfile(example):
            return example
    return "forward.toml(5)"


def _open_trusted(path: str) -> Tuple[Optional[int], List[str]]:
    """A descriptor of the real file (None if it could not be opened) and every
    reason not to trust it."""
    try:
        real, lookups = walk(path)
        final = os.lstat(real)
    except FileNotFoundError:
        return None, [f"{path}: no such file; create it (see {example_config()})"
                      " or point --config / $PORTFWD_CONFIG at it"]
    except OSError as e:
        return None, [f"{e.filename or path}: cannot open {path}: {e.strerror}"]
    via = f" (reached through {path})" if os.path.abspath(path) != real else ""
    problems: List[str] = []
    for i, (directory, name, entry) in enumerate(lookups):
        is_parent = i == len(lookups) - 1 and not stat.S_ISLNK(entry.st_mode)
        if not any(p.startswith(f"{directory}:1:1:") for p in problems):  # once per directory
            problems += _judge_directory(directory, os.path.join(directory, name), entry, is_parent)
    if not stat.S_ISREG(final.st_mode):
        return None, list(dict.fromkeys(problems)) + [_not_regular(real, final, via)]
    try:
        fd = os.open(real, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC)
    except OSError as e:
        return None, list(dict.fromkeys(problems)) + [
            f"{real}: cannot open{via}: {e.strerror}; it changed while portfwd looked at it?"]
    st = os.fstat(fd)
    if (st.st_dev, st.st_ino) != (final.st_dev, final.st_ino):
        problems.append(f"{real}:1:1: refused: the file was replaced while portfwd checked it{via};"
                        " run the command again")
    elif not stat.S_ISREG(st.st_mode):
        problems.append(_not_regular(real, st, via))
    else:
        writers, acl = _writers(st, _acl(fd))
        if writers:
            fix = f"chown root:root {real} && chmod go-w {real}" + (
                f" && setfacl -b {real}" if acl else "")
            mode = stat.S_IMODE(st.st_mode)
            problems.append(
                f"{real}:1:1: refused: this file is writable by {' and '.join(writers)}"
                f" (mode {mode:04o}){via}, who could then forward ports as root; fix: {fix}")
    return fd, list(dict.fromkeys(problems))


def _judge_directory(directory: str, entry_path: str, entry: os.stat_result,
                     is_parent: bool) -> List[str]:
    """Why a lookup of ``entry_path`` in ``directory`` cannot be trusted (see ``read``)."""
    st = os.lstat(directory)
    writers, acl = _writers(st, _acl(directory))
    if not writers:
        return []
    mode = stat.S_IMODE(st.st_mode)
    shared = bool(mode & stat.S_ISVTX) and st.st_uid == 0
    if shared and not is_parent:
        if entry.st_uid == 0:
            return []
        return [f"{entry_path}:1:1: refused: this {_kind(entry)} belongs to uid {entry.st_uid} and"
                f" lies in {directory}, which {' and '.join(writers)} may write (mode {mode:04o}),"
                f" so uid {entry.st_uid} could replace it; {MOVE_HINT}"]
    if shared:
        return [f"{directory}:1:1: refused: this directory is writable by {' and '.join(writers)}"
                f" (mode {mode:04o}, shared) and holds the configuration file itself, which"
                f" cleaners may delete and anyone may then recreate; {MOVE_HINT}"]
    if "portfwd" in os.path.basename(directory) and not mode & stat.S_ISVTX:
        fix = f"fix: chown root:root {directory} && chmod go-w {directory}" + (
            f" && setfacl -b {directory}" if acl else "")
    elif directory in ("/", "/etc"):
        fix = f"fix: {directory} must be writable by root alone (Debian installs it root:root 0755)"
    else:
        fix = MOVE_HINT
    return [f"{directory}:1:1: refused: this directory is writable by {' and '.join(writers)}"
            f" (mode {mode:04o}), who could replace {entry_path} and so forward ports as root;"
            f" {fix}"]


AclEntry = Tuple[int, int, int]  # tag, perm, id


def _writers(st: os.stat_result, acl: Optional[List[AclEntry]]) -> Tuple[List[str], bool]:
    """Who besides root may write a file or directory, and whether an ACL grants it.

    ``acl``: the (tag, perm, id) entries of its access ACL, or None (mode bits only);
    a named user or group, and the owning group, get write through the ACL only
    when the mask grants it too.
    """
    out = []
    if st.st_uid != 0:
        out.append(f"its owner, uid {st.st_uid}")
    by_acl = False
    if acl is None:
        if st.st_mode & stat.S_IWGRP:
            out.append(f"group gid {st.st_gid}")
    else:
        masks = [perm for tag, perm, _ in acl if tag == ACL_MASK]
        mask = masks[0] if masks else 0x07
        for tag, perm, ident in acl:
            if not perm & mask & ACL_WRITE:
                continue
            if tag == ACL_GROUP_OBJ:
                out.append(f"group gid {st.st_gid}")
            elif tag == ACL_USER and ident != 0:
                out.append(f"user uid {ident} (ACL)")
                by_acl = True
            elif tag == ACL_GROUP:
                out.append(f"group gid {ident} (ACL)")
                by_acl = True
            elif tag == ACL_UNREADABLE:
                out.append("whoever its unreadable ACL names")
                by_acl = True
    if st.st_mode & stat.S_IWOTH:
        out.append("everyone")
    return out, by_acl


def _acl(target: "int | str") -> Optional[List[AclEntry]]:
    """The entries (tag, perm, id) of the POSIX access ACL of a descriptor or real
    path; None without one. An ACL portfwd cannot parse counts as granting write."""
    try:
        if isinstance(target, int):
            raw = os.getxattr(target, ACL_ACCESS)
        else:
            raw = os.getxattr(target, ACL_ACCESS, follow_symlinks=False)
    except OSError:  # ENODATA: no ACL; ENOTSUP: none possible
        return None
    if len(raw) < 4 or (len(raw) - 4) % 8 or struct.unpack_from("<I", raw)[0] != 2:
        return [(ACL_UNREADABLE, ACL_WRITE, 0)]
    out: List[AclEntry] = []
    for offset in range(4, len(raw), 8):
        tag, perm, ident = struct.unpack_from("<HHI", raw, offset)
        out.append((tag, perm, ident))
    return out


def _kind(st: os.stat_result) -> str:
    for test, name in _KINDS:
        if test(st.st_mode):
            return name
    return "file"


def _not_regular(real: str, st: os.stat_result, via: str) -> str:
    return f"{real}:1:1: refused: this is a {_kind(st)}{via}, not a regular file; {REGULAR_HINT}"


def parse(text: str, path: str = "<config>") -> Config:
    """Parse TOML text; raise ConfigError with every problem found."""
    if text.startswith("\ufeff"):
        raise ConfigError([byte_order_mark(path, "TOML")])
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError([_syntax_error(path, text, str(e))]) from None
    except RecursionError:
        line, col = deepest(text, MAX_NESTING)
        raise ConfigError([f"{path}:{line}:{col}: TOML syntax: arrays or inline tables nested"
                           f" too deeply (forward.toml needs 3 levels at most)"]) from None
    except ValueError as e:  # e.g. an integer with more digits than Python converts
        runs = [m for m in re.finditer(r"[0-9_]+", text)]
        at = max(runs, key=lambda m: len(m.group())).start() if runs else 0
        line = text.count("\n", 0, at) + 1
        col = at - (text.rfind("\n", 0, at) + 1) + 1
        what = "a number too long to read" if "digits" in str(e) else str(e)
        raise ConfigError([f"{path}:{line}:{col}: TOML syntax: {what}"]) from None
    return _Validator(path, text).config(data)


def byte_order_mark(path: str, language: str) -> str:
    """The error for a file of ``language`` (TOML, JSON) starting with a byte-order mark."""
    return (f"{path}:1:1: the file starts with a byte-order mark (U+FEFF), which {language}"
            " does not allow (an editor saved it as \"UTF-8 with BOM\"); save it as plain"
            f" UTF-8, e.g. sed -i '1s/^\\xEF\\xBB\\xBF//' {path}")


def locator(text: str, file: str) -> Callable[[Where], str]:
    """``where`` → ``FILE:LINE:COL`` in ``text`` (positions found on first use)."""
    found: List[Positions] = []

    def locate_where(where: Where) -> str:
        if not found:
            found.append(locate(text))
        line, col = found[0].of(_parse_path(where.path))
        return f"{file}:{line}:{col}"
    return locate_where


def _syntax_error(path: str, text: str, message: str) -> str:
    m = re.search(r"\s*\(at line (\d+), column (\d+)\)\s*$", message)
    if m:
        line, col, body = int(m.group(1)), int(m.group(2)), message[:m.start()]
        lines = text.split("\n")
        said = _syntax_hint(lines, line, col, body)
        if said is not None:
            col, body = said
        return f"{path}:{line}:{col}: TOML syntax: {body}"
    m = re.search(r"\s*\(at end of document\)\s*$", message)
    lines = text.split("\n")
    where = f"{len(lines)}:{len(lines[-1]) + 1}"
    body = message[:m.start()] if m else message
    return f"{path}:{where}: TOML syntax: {body}"


KEY_LINE = re.compile(r"\s*([A-Za-z0-9_.\"'-]+?)\s*=\s*")
WORDS = {"True": "true", "False": "false", "TRUE": "true", "FALSE": "false", "yes": "true",
         "no": "false", "on": "true", "off": "false"}


def _syntax_hint(lines: List[str], line: int, col: int, message: str) -> Optional[Tuple[int, str]]:
    """(column, message) saying what the TOML parser's ``message`` at ``line``:``col``
    means for forward.toml: an unquoted string, a boolean in capitals, a key or a
    table given twice; None when it is none of these."""
    here = lines[line - 1] if line <= len(lines) else ""
    key = KEY_LINE.match(here)
    if message == "Invalid value" or message.startswith("Expected newline"):
        start = key.end() if key and message.startswith("Expected") else col - 1
        word = re.match(r"[A-Za-z0-9_.:/@+-]+(?=[\s,\]\}#]|$)", here[start:])
        if word is None:
            return None
        token = word.group()
        if token in WORDS:
            return start + 1, (f"{token} is not a TOML value: write {WORDS[token]} (booleans"
                               " are true or false, in lower case)")
        if message.startswith("Expected") and re.fullmatch(r"[-+]?[0-9_]+(\.[0-9_]+)?", token):
            return None  # a number followed by something else
        if key and key.end() == start:
            return start + 1, f"strings need quotes: {key.group(1)} = \"{token}\""
        return start + 1, f"strings need quotes: \"{token}\""
    if message == "Cannot overwrite a value" and key:
        name = key.group(1)
        for back in range(line - 2, -1, -1):
            if lines[back].lstrip().startswith("["):
                break
            earlier = KEY_LINE.match(lines[back])
            if earlier and earlier.group(1) == name:
                return here.index(name) + 1, (f"key {name!r} is set twice in one table: on line"
                                              f" {back + 1} and on line {line}; keep one")
        return here.index(name) + 1, f"key {name!r} is set a second time here; keep one"
    twice = re.match(r"Cannot declare \((.*)\) twice", message)
    if twice:
        name = ".".join(part.strip(" '\"") for part in twice.group(1).split(",") if part.strip())
        first = next((i + 1 for i, text in enumerate(lines[:line - 1])
                      if text.strip() == f"[{name}]"), None)
        since = f" (first on line {first})" if first else ""
        return 1, f"table [{name}] is declared twice{since}: put its keys under one [{name}]"
    return None


def _dotted(path: Path) -> str:
    """``forward[1].ports[0]``; a key that is not a bare TOML key is quoted and escaped."""
    out = ""
    for part in path:
        if isinstance(part, int):
            out += f"[{part}]"
            continue
        if not BARE_KEY.match(part):
            part = '"' + "".join(c if c.isprintable() and c not in '"\\' else
                                 (f"\\u{ord(c):04x}" if ord(c) < 0x10000 else f"\\U{ord(c):08x}")
                                 for c in part) + '"'
        out += f".{part}" if out else part
    return out


class _Validator:
    def __init__(self, file: str, text: str) -> None:
        self.file = file
        self.text = text
        self._positions: Optional[Positions] = None
        self.errors: List[Tuple[Tuple[int, int], str]] = []
        self.warnings: List[str] = []

    # -- reporting ---------------------------------------------------------
    @property
    def positions(self) -> Positions:
        """Key and value positions, found only once a message needs one."""
        if self._positions is None:
            self._positions = locate(self.text)
        return self._positions

    def written(self, path: Path, value: int) -> str:
        """The integer at ``path`` as the file writes it (``0xFFFF``, ``1_000``), cut when
        long; its value in decimal when no literal is found there."""
        line, col = self.positions.of(path)
        lines = self.text.split("\n")
        m = re.match(r"[-+]?[0-9][0-9A-Za-z_]*", lines[line - 1][col - 1:] if line <= len(lines)
                     else "")
        if m is None or "=" in m.group():
            return _int_text(value)
        text = m.group()
        return text if len(text) <= 50 else f"{text[:20]}… ({len(text)} characters)"

    def name_problem(self, name: str, path: Path) -> str:
        """Why ``name`` (the string at ``path``) is no domain name, with the column of
        an invisible or control character in it."""
        if not name:
            return "it is empty"
        if "/" in name:
            return "a domain name has no '/'"
        import unicodedata

        index, char = next((i, c) for i, c in enumerate(name) if not c.isprintable())
        line, col = self.positions.of(path)
        raw = self.text.split("\n")[line - 1][col:] if line else ""
        at = raw.find(char)  # the character as written (not as an escape): its column
        where = f" at column {col + 1 + at}" if at >= 0 else f" (character {index + 1} of the name)"
        what = unicodedata.name(char, "control character").lower()
        return (f"invisible character U+{ord(char):04X} ({what}){where}; retype the name as"
                " `virsh list --all --name` prints it")

    def where(self, path: Path) -> Where:
        return Where(self.file, _dotted(path))

    def location(self, path: Path) -> str:
        line, col = self.positions.of(path)
        return f"{self.file}:{line}:{col}"

    def error(self, path: Path, message: str, at_key: bool = False) -> None:
        pos = self.positions.of_key(path) if at_key else self.positions.of(path)
        self.errors.append((pos, f"{self.file}:{pos[0]}:{pos[1]}: {_dotted(path)}: {message}"))

    def warn(self, path: Path, message: str) -> None:
        """A warning at ``path``; once, however many ports share what it is about."""
        line = f"{self.location(path)}: warning: {_dotted(path)}: {message}"
        if line not in self.warnings:
            self.warnings.append(line)

    def unknown_keys(self, table: Dict[str, Any], allowed: Sequence[str], path: Path) -> None:
        for key in table:
            if key not in allowed:
                hint = did_you_mean(key, allowed, cutoff=0.7)
                if path[:1] == ("forward",) and len(path) == 2 and key in OPTION_KEYS:
                    hint = (f"{key!r} is a key of [options], and every key below a [[forward]]"
                            " header belongs to that forward: move it above the first"
                            " [[forward]], under [options]; ")
                self.error(path + (key,), f"unknown key {key!r}; {hint}known keys: {', '.join(allowed)}",
                           at_key=True)

    # -- typed getters -----------------------------------------------------
    def expect(self, value: Any, kind: type, path: Path, what: str) -> bool:
        ok = isinstance(value, kind) and not (kind is int and isinstance(value, bool))
        if not ok:
            shown = (f"an integer ({self.written(path, value)})" if type(value) is int
                     else _describe(value))
            self.error(path, f"expected {what}, got {shown}")
        return ok

    def listen_list(self, value: Any, path: Path) -> Optional[Tuple[Listen, ...]]:
        if not self.expect(value, list, path, "a list of addresses and interface names"):
            return None
        out: List[Listen] = []
        for i, item in enumerate(value):
            addr = self.listen_item(item, path + (i,))
            if addr is not None:
                out.append(addr)
        return tuple(dict.fromkeys(out))

    def listen_item(self, value: Any, path: Path) -> Optional[Listen]:
        """A host address, or the name of an interface whose addresses to listen on."""
        if not self.expect(value, str, path, "an IP address or interface name string"):
            return None
        if "%" in value:
            self.error(path, f"{value!r}: a listen address has no zone index (%…); to listen on"
                             " an interface's addresses, give the interface's name")
            return None
        try:
            addr = ip_address(value)
        except ValueError:
            if IFNAME.match(value) and value not in (".", ".."):
                return str(value)
            self.error(path, f"{value!r} is neither an IP address nor an interface name")
            return None
        if addr.is_unspecified:
            self.error(path, f"{value} means every address: leave listen empty ([]) instead")
        elif addr.is_multicast:
            self.error(path, f"{value} is a multicast address; a forward listens on a unicast host address")
        elif addr.version == 6 and addr.is_loopback:
            self.error(path, f"{value}: the kernel cannot DNAT ::1 (IPv6 has no route_localnet);"
                             " to reach a guest from the host itself use 127.0.0.1 with"
                             " localhost = true, or any other host address")
        elif addr.is_loopback:
            self.error(path, f"{value}: to forward 127.0.0.1 set localhost = true (in [options]"
                             " or in this [[forward]]) instead of listing it")
        else:
            return addr
        return None

    def flag(self, raw: Dict[str, Any], key: str, path: Path, default: bool) -> bool:
        value = raw.get(key, default)
        return bool(value) if self.expect(value, bool, path + (key,), "true or false") else default

    def network_list(self, value: Any, path: Path) -> Optional[Tuple[IPNetwork, ...]]:
        """Source networks; exact duplicates merge, overlapping ones are an error
        (nftables' interval maps hold no overlapping intervals)."""
        if not self.expect(value, list, path, "a list of CIDR networks"):
            return None
        if not value:  # say, a template's list left empty: never "every source"
            every = ('write ["0.0.0.0/0", "::/0"]' if "ports" in path
                     else "leave from out")
            self.error(path, "empty: list at least one source network such as"
                       f" \"198.51.100.0/24\" (for every source, {every})")
            return None
        first: Dict[IPNetwork, int] = {}  # each network → where it is first listed
        for i, item in enumerate(value):
            here = path + (i,)
            if not self.expect(item, str, here, "a CIDR string such as \"198.51.100.0/24\""):
                continue
            if "%" in item:
                self.error(here, f"{item!r}: a source network has no zone index (%…)")
                continue
            try:
                first.setdefault(ip_network(item), i)
            except ValueError:
                try:
                    loose = ip_network(item, strict=False)
                except ValueError:
                    self.error(here, f"{item!r} is not a CIDR network (write e.g. \"198.51.100.0/24\")")
                else:
                    self.error(here, f"{item!r} has host bits set; did you mean \"{loose}\"?")
        self.overlapping(first, path, value)
        return tuple(first)

    def overlapping(self, first: Dict[IPNetwork, int], path: Path, raw: List[Any]) -> None:
        """Report each network inside another of the list. In address order a network
        comes after every network that contains it, and the networks between them
        lie inside that one too, so one pass finds each."""
        outer: Optional[IPNetwork] = None
        for net in sorted(first, key=lambda n: (n.version, n.network_address, n.prefixlen)):
            if outer is None or outer.version != net.version \
                    or int(net.broadcast_address) > int(outer.broadcast_address):
                outer = net
                continue
            inner, wide = first[net], first[outer]
            here, there = max(inner, wide), min(inner, wide)
            self.error(path + (here,), f"{raw[here]} overlaps {raw[there]} (at"
                       f" {self.location(path + (there,))}, {_dotted(path + (there,))}), and"
                       " nftables cannot hold overlapping source networks in one forward;"
                       f" remove {raw[inner]}, which {raw[wide]} covers")

    def guest_address(self, value: Any, path: Path, family: int) -> Optional[IPAddress]:
        if not self.expect(value, str, path, f"an IPv{family} address string"):
            return None
        if "%" in value:
            self.error(path, f"{value!r}: a guest address has no zone index (%…); write the"
                             " address alone")
            return None
        try:
            addr = ip_address(value)
        except ValueError:
            self.error(path, f"{value!r} is not an IPv{family} address")
            return None
        if addr.version != family:
            other = "ipv6" if addr.version == 6 else "ipv4"
            self.error(path, f"{value} is an IPv{addr.version} address; put it in {other}")
        elif addr.is_unspecified or addr.is_multicast or addr.is_loopback or addr.is_link_local:
            self.error(path, f"{value} cannot be a guest address (unspecified, multicast,"
                             " loopback or link-local)")
        else:
            return addr
        return None

    # -- the document ------------------------------------------------------
    def config(self, data: Dict[str, Any]) -> Config:
        self.unknown_keys(data, ("options", "forward"), ())
        options = self.options(data.get("options", {}))
        forwards: List[Forward] = []
        raw = data.get("forward", [])
        if self.expect(raw, list, ("forward",), "[[forward]] tables"):
            for i, entry in enumerate(raw):
                fwd = self.forward(entry, i, options)
                if fwd is not None:
                    forwards.append(fwd)
        self.conflicts(forwards)
        if self.errors:
            self.errors.sort(key=lambda e: e[0])
            raise ConfigError([m for _, m in self.errors])
        return Config(self.file, options, tuple(forwards), tuple(self.warnings))

    def options(self, raw: Any) -> Options:
        path: Path = ("options",)
        if not self.expect(raw, dict, path, "an [options] table"):
            return Options()
        self.unknown_keys(raw, OPTION_KEYS, path)
        table = raw.get("table", DEFAULT_TABLE)
        if self.expect(table, str, path + ("table",), "a table name string") \
                and not TABLE_NAME.match(table):
            self.error(path + ("table",), f"{table!r} is not a valid table name: use a letter"
                       " then letters, digits or _ (at most 64)")
            table = DEFAULT_TABLE
        elif not isinstance(table, str):
            table = DEFAULT_TABLE
        listen = self.listen_list(raw.get("listen", []), path + ("listen",)) or ()
        domain = self.flag(raw, "domain_forwards", path, False)
        return Options(table, listen, self.flag(raw, "strict", path, False),
                       self.flag(raw, "localhost", path, False),
                       self.discover(raw.get("discover"), path + ("discover",)), domain,
                       self.domain_ports(raw.get("domain_ports"), path, domain))

    def domain_ports(self, value: Any, path: Path, enabled: bool) -> Tuple[Tuple[int, int], ...]:
        """``[options] domain_ports``: the host ports forwards in the domains' <metadata>
        may claim; required with ``domain_forwards = true``."""
        if value is None:
            if enabled:
                self.error(path + ("domain_forwards",), "domain_forwards = true needs"
                           " domain_ports, the host ports domains may claim: add e.g."
                           ' domain_ports = ["10000-19999"] to [options]', at_key=True)
            return ()
        here = path + ("domain_ports",)
        if not self.expect(value, list, here, 'a list of port ranges such as ["10000-19999"]'):
            return ()
        out = []
        for i, item in enumerate(value):
            text = str(item) if isinstance(item, int) and not isinstance(item, bool) else item
            if not self.expect(text, str, here + (i,), 'a port or "FIRST-LAST"'):
                continue
            try:
                out.append(portspec.parse_span(text, text))
            except portspec.PortSpecError as e:
                self.error(here + (i,), str(e))
        return tuple(out)

    def discover(self, value: Any, path: Path) -> Tuple[str, ...]:
        """``[options] discover``: which address sources portfwd may use (it always asks them
        in the order reservation, lease, agent, ARP)."""
        if value is None:
            return Options().discover
        if not self.expect(value, list, path, 'a list such as ["reservation", "lease"]'):
            return Options().discover
        out: List[str] = []
        for i, item in enumerate(value):
            if item not in DISCOVER_SOURCES:
                self.error(path + (i,), f"unknown address source {item!r}; use"
                           f" {', '.join(repr(s) for s in DISCOVER_SOURCES)}")
            elif item not in out:
                out.append(item)
        return tuple(out)

    def forward(self, raw: Any, index: int, options: Options) -> Optional[Forward]:
        path: Path = ("forward", index)
        if not self.expect(raw, dict, path, "a [[forward]] table"):
            return None
        start = len(self.errors)
        self.unknown_keys(raw, FORWARD_KEYS, path)
        guest, uuid = self.identity(raw, path)
        ipv4: Optional[IPv4Address] = None
        ipv6: Optional[IPv6Address] = None
        suffix: Optional[IPv6Address] = None
        if "ipv4" in raw:
            addr = self.guest_address(raw["ipv4"], path + ("ipv4",), 4)
            ipv4 = addr if isinstance(addr, IPv4Address) else None
        if "ipv6" in raw:
            addr = self.guest_address(raw["ipv6"], path + ("ipv6",), 6)
            if isinstance(addr, IPv6Address) and int(addr) >> 64 == 0:
                suffix = addr  # "::10": the network's prefix comes when the guest runs
            elif isinstance(addr, IPv6Address):
                ipv6 = addr
        interface = None
        if "interface" in raw:
            interface = self.mac(raw["interface"], path + ("interface",))
        listen = options.listen
        listen_at = "options.listen" if listen else None
        if "listen" in raw:
            listen = self.listen_list(raw["listen"], path + ("listen",)) or ()
            listen_at = _dotted(path + ("listen",))
        localhost = self.flag(raw, "localhost", path, options.localhost)
        sources: Tuple[IPNetwork, ...] = ()
        if "from" in raw:
            sources = self.network_list(raw["from"], path + ("from",)) or ()
        ports: List[PortForward] = []
        raw_ports = raw.get("ports")
        if raw_ports is None:
            self.error(path, "no ports: add e.g. ports = [\"8080:80\"]", at_key=True)
        elif self.expect(raw_ports, list, path + ("ports",), "a list of port specs"):
            if not raw_ports:
                self.error(path + ("ports",), "empty: list at least one port spec such as \"8080:80\"")
            for j, item in enumerate(raw_ports):
                pf = self.port(item, path + ("ports", j), listen, sources, localhost, listen_at)
                if pf is not None:
                    ports.append(pf)
        if len(self.errors) > start:
            return None
        fwd = Forward(index, guest, uuid, ipv4, ipv6, tuple(ports), self.where(path),
                      interface, suffix)
        self.unused_listen(fwd)
        return fwd

    def mac(self, value: Any, path: Path) -> Optional[str]:
        """A guest NIC's MAC: six octets, unicast, not all zero; returned lower case."""
        if not self.expect(value, str, path, 'a MAC address string such as "52:54:00:12:34:56"'):
            return None
        problem = mac_problem(value)
        if problem:
            self.error(path, problem)
            return None
        return str(value).lower()

    def identity(self, raw: Dict[str, Any], path: Path) -> Tuple[Optional[str], Optional[str]]:
        guest = raw.get("guest")
        uuid = raw.get("uuid")
        if guest is None and uuid is None:
            self.error(path, "no guest: set guest = \"NAME\" (the libvirt domain name) or uuid = \"…\"",
                       at_key=True)
        if guest is not None and uuid is not None:
            self.error(path + ("uuid",), "set guest or uuid, not both", at_key=True)
        if guest is not None and self.expect(guest, str, path + ("guest",), "a domain name string"):
            if not guest or "/" in guest or not guest.isprintable():
                self.error(path + ("guest",), f"{guest!r} is not a libvirt domain name:"
                                              f" {self.name_problem(guest, path + ('guest',))}")
        if uuid is not None and self.expect(uuid, str, path + ("uuid",), "a UUID string"):
            try:
                uuid = str(uuidlib.UUID(uuid))
            except ValueError:
                self.error(path + ("uuid",), f"{uuid!r} is not a UUID"
                           " (write it as virsh domuuid prints it)")
        return (guest if isinstance(guest, str) else None,
                uuid if isinstance(uuid, str) else None)

    def port(self, item: Any, path: Path, listen: Tuple[Listen, ...],
             sources: Tuple[IPNetwork, ...], localhost: bool,
             listen_at: Optional[str] = None) -> Optional[PortForward]:
        try:
            if isinstance(item, str):
                rng = portspec.parse(item)
            elif isinstance(item, int) and not isinstance(item, bool):
                rng = portspec.parse(_port_text(item, self.written(path, item)))
            elif isinstance(item, dict):
                return self.port_table(item, path, listen, sources, localhost, listen_at)
            else:
                self.error(path, f"expected a port spec string, a port number or a table,"
                                 f" got {_describe(item)}")
                return None
        except portspec.PortSpecError as e:
            self.error(path, str(e))
            return None
        return PortForward(rng, listen, sources, self.where(path), localhost, listen_at)

    def port_table(self, item: Dict[str, Any], path: Path, listen: Tuple[Listen, ...],
                   sources: Tuple[IPNetwork, ...], localhost: bool,
                   listen_at: Optional[str]) -> Optional[PortForward]:
        start = len(self.errors)
        self.unknown_keys(item, PORT_KEYS, path)
        if "guest" not in item:
            self.error(path, "no guest port: add guest = PORT", at_key=True)
            return None
        spans = {}
        for key in ("guest", "host"):
            value = item.get(key, item["guest"])
            here = path + (key,)
            try:
                if isinstance(value, int) and not isinstance(value, bool):
                    text = _port_text(value, self.written(here, value))
                    spans[key] = portspec.parse_span(text, text)
                elif isinstance(value, str):
                    spans[key] = portspec.parse_span(value, value)
                else:
                    self.error(here, f"expected a port number or \"FIRST-LAST\", got {_describe(value)}")
            except portspec.PortSpecError as e:
                self.error(here, str(e))
        proto = item.get("proto", "tcp")
        if self.expect(proto, str, path + ("proto",), "\"tcp\", \"udp\" or \"sctp\""):
            try:
                portspec.check_proto(proto, proto)
            except portspec.PortSpecError as e:
                self.error(path + ("proto",), str(e))
        if "listen" in item:
            listen = self.listen_list(item["listen"], path + ("listen",)) or ()
            listen_at = _dotted(path + ("listen",))
        if "from" in item:
            sources = self.network_list(item["from"], path + ("from",)) or ()
        if len(self.errors) > start:
            return None
        try:
            rng = portspec.make_range(proto, spans["host"], spans["guest"],
                                      f"{item.get('host', item['guest'])}:{item['guest']}")
        except portspec.PortSpecError as e:
            self.error(path, str(e))
            return None
        return PortForward(rng, listen, sources, self.where(path), localhost, listen_at)

    def unused_listen(self, fwd: Forward) -> None:
        for pf in fwd.ports:
            here = _path_of(pf)
            if pf.localhost and fwd.target(4) is None:
                self.warn(here, "localhost = true is unused: 127.0.0.1 is forwarded to an ipv4"
                                " guest address, and this forward has none")
            at = _parse_path(pf.listen_at) if pf.listen_at else here
            for i, addr in enumerate(pf.listen):
                if not isinstance(addr, str) and fwd.target(addr.version) is None:
                    self.warn(at + (i,), f"listen address {addr} is unused by {fwd.where.path}"
                                         f" ({fwd.label}): it has no ipv{addr.version} guest"
                                         " address")
            for family in (4, 6):
                if fwd.target(family) is None:
                    continue
                if pf.listen and not any(isinstance(a, str) or a.version == family
                                         for a in pf.listen):
                    self.warn(at, f"no IPv{family} listen address: the ipv{family} guest address"
                                  f" of {fwd.where.path} ({fwd.label}) is not forwarded")
                elif pf.sources and not any(n.version == family for n in pf.sources):
                    self.warn(here, f"from lists no IPv{family} network: no IPv{family} source"
                                    " may use this forward")

    def conflicts(self, forwards: List[Forward]) -> None:
        items: List[Tuple[Forward, PortForward]] = []
        claims: List[Claim] = []
        for fwd in forwards:
            for pf in fwd.ports:
                claims.extend(claims_of(pf, fwd.families(pf), len(items)))
                items.append((fwd, pf))
        for first, laters in group_conflicts(find_conflicts(claims)):
            (fa, pa), (fb, pb) = items[first.owner], items[laters[0].owner]
            where = claimed_where(first, laters[0])
            if len(laters) == 1:
                self.error(_path_of(pb), clash_message(
                    first, laters[0], where, fb.label, self.location(_path_of(pa)),
                    pa.where.path, fa.label))
                continue
            others = [(self.location(_path_of(items[c.owner][1])), items[c.owner][1].where.path,
                       items[c.owner][0].label) for c in [first] + laters[1:]]
            self.error(_path_of(pb), crowd_message([first] + laters, where, fb.label, others))


def _path_of(pf: PortForward) -> Path:
    return _parse_path(pf.where.path)


def _parse_path(text: str) -> Path:
    """``forward[1].ports[0]`` → ("forward", 1, "ports", 0) (for portfwd's own keys)."""
    parts: List[Any] = []
    for piece in re.findall(r"[^.\[\]]+", text):
        parts.append(int(piece) if piece.isdigit() else piece)
    return tuple(parts)


def _describe(value: Any) -> str:
    names = {bool: "a boolean", int: "an integer", float: "a number", str: "a string",
             list: "a list", dict: "a table"}
    if isinstance(value, (list, dict)):
        return names[type(value)]
    if isinstance(value, bool):
        shown = "true" if value else "false"  # as TOML writes it
    else:
        shown = _int_text(value) if isinstance(value, int) else repr(value)
    return f"{names.get(type(value), type(value).__name__)} ({shown})"


def _port_text(value: int, written: str) -> str:
    """A port number as text for portspec; PortSpecError naming it as ``written`` (its
    TOML literal) when it is no port."""
    if not 1 <= value <= 65535:
        raise portspec.PortSpecError(f"port {written} not in 1..65535")
    return str(value)


def _int_text(value: int) -> str:
    """An integer as text: in decimal, a long one cut (Python prints no more than
    4300 digits; TOML's hex, octal and binary literals may be longer)."""
    try:
        text = str(value)
    except ValueError:
        return "a number of more than 4300 digits"
    return text if len(text) <= 50 else f"{text[:20]}… ({len(text.lstrip('-'))} digits)"
