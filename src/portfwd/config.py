"""forward.toml → Config, with every error located as PATH:LINE:COL."""

from __future__ import annotations

import difflib
import os
import re
import stat
import struct
import uuid as uuidlib
from ipaddress import (IPv4Address, IPv6Address, ip_address, ip_network)
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

from . import portspec
from .conflicts import (Claim, claimed_where, claims_of, clash_message, crowd_message,
                        find_conflicts, group_conflicts)
from .constants import DEFAULT_TABLE, DISCOVER_SOURCES
from .domainxml import mac_problem
from .errors import ConfigError
from .model import (Config, Forward, IPAddress, IPNetwork, Listen,
                    Options, PortForward, Where)
from .pathwalk import walk
from .tomlpos import Path, Positions, deepest, locate

from .toml import tomllib

TABLE_NAME = re.compile(r"[A-Za-z][A-Za-z0-9_]{0,63}\Z")
OPTION_KEYS = ("table", "listen", "strict", "localhost", "discover", "domain_forwards",
               "domain_ports")
FORWARD_KEYS = ("guest", "uuid", "interface", "ipv4", "ipv6", "ports", "listen", "from",
                "localhost")
IFNAME = re.compile(r"(?=.*[A-Za-z])[A-Za-z0-9_.-]{1,15}\Z")
PORT_KEYS = ("host", "guest", "proto", "listen", "from")
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


def _open_trusted(path: str) -> Tuple[Optional[int], List[str]]:
    """A descriptor of the real file (None if it could not be opened) and every
    reason not to trust it."""
    try:
        real, lookups = walk(path)
        final = os.lstat(real)
    except FileNotFoundError:
        return None, [f"{path}: no such file; create it (see config/forward.toml)"
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
        raise ConfigError([f"{path}:1:1: the file starts with a byte-order mark (U+FEFF), which"
                           " TOML does not allow (an editor saved it as \"UTF-8 with BOM\");"
                           f" save it as plain UTF-8, e.g. sed -i '1s/^\\xEF\\xBB\\xBF//' {path}"])
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
        return f"{path}:{m.group(1)}:{m.group(2)}: TOML syntax: {message[:m.start()]}"
    m = re.search(r"\s*\(at end of document\)\s*$", message)
    lines = text.split("\n")
    where = f"{len(lines)}:{len(lines[-1]) + 1}"
    body = message[:m.start()] if m else message
    return f"{path}:{where}: TOML syntax: {body}"


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

    def where(self, path: Path) -> Where:
        return Where(self.file, _dotted(path))

    def location(self, path: Path) -> str:
        line, col = self.positions.of(path)
        return f"{self.file}:{line}:{col}"

    def error(self, path: Path, message: str, at_key: bool = False) -> None:
        pos = self.positions.of_key(path) if at_key else self.positions.of(path)
        self.errors.append((pos, f"{self.file}:{pos[0]}:{pos[1]}: {_dotted(path)}: {message}"))

    def warn(self, path: Path, message: str) -> None:
        self.warnings.append(f"{self.location(path)}: warning: {_dotted(path)}: {message}")

    def unknown_keys(self, table: Dict[str, Any], allowed: Sequence[str], path: Path) -> None:
        for key in table:
            if key not in allowed:
                close = difflib.get_close_matches(key, allowed, n=1, cutoff=0.7)
                hint = f"did you mean {close[0]!r}? " if close else ""
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
            self.error(path, f"expected {what}, got {_describe(value)}")
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
        if "listen" in raw:
            listen = self.listen_list(raw["listen"], path + ("listen",)) or ()
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
                pf = self.port(item, path + ("ports", j), listen, sources, localhost)
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
                self.error(path + ("guest",), f"{guest!r} is not a libvirt domain name")
        if uuid is not None and self.expect(uuid, str, path + ("uuid",), "a UUID string"):
            try:
                uuid = str(uuidlib.UUID(uuid))
            except ValueError:
                self.error(path + ("uuid",), f"{uuid!r} is not a UUID"
                           " (write it as virsh domuuid prints it)")
        return (guest if isinstance(guest, str) else None,
                uuid if isinstance(uuid, str) else None)

    def port(self, item: Any, path: Path, listen: Tuple[Listen, ...],
             sources: Tuple[IPNetwork, ...], localhost: bool) -> Optional[PortForward]:
        try:
            if isinstance(item, str):
                rng = portspec.parse(item)
            elif isinstance(item, int) and not isinstance(item, bool):
                rng = portspec.parse(_port_text(item))
            elif isinstance(item, dict):
                return self.port_table(item, path, listen, sources, localhost)
            else:
                self.error(path, f"expected a port spec string, a port number or a table,"
                                 f" got {_describe(item)}")
                return None
        except portspec.PortSpecError as e:
            self.error(path, str(e))
            return None
        return PortForward(rng, listen, sources, self.where(path), localhost)

    def port_table(self, item: Dict[str, Any], path: Path, listen: Tuple[Listen, ...],
                   sources: Tuple[IPNetwork, ...], localhost: bool) -> Optional[PortForward]:
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
                    spans[key] = portspec.parse_span(_port_text(value), _port_text(value))
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
        return PortForward(rng, listen, sources, self.where(path), localhost)

    def unused_listen(self, fwd: Forward) -> None:
        for pf in fwd.ports:
            here = _path_of(pf)
            if pf.localhost and fwd.target(4) is None:
                self.warn(here, "localhost = true is unused: 127.0.0.1 is forwarded to an ipv4"
                                " guest address, and this forward has none")
            for addr in pf.listen:
                if not isinstance(addr, str) and fwd.target(addr.version) is None:
                    self.warn(here, f"listen address {addr} is unused: this forward has no"
                                    f" ipv{addr.version} guest address")
            for family in (4, 6):
                if fwd.target(family) is None:
                    continue
                if pf.listen and not any(isinstance(a, str) or a.version == family
                                         for a in pf.listen):
                    self.warn(here, f"no IPv{family} listen address: the ipv{family} guest address"
                                    " is not forwarded")
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
    shown = _int_text(value) if isinstance(value, int) else repr(value)
    return f"{names.get(type(value), type(value).__name__)} ({shown})"


def _port_text(value: int) -> str:
    """A port number as text for portspec (PortSpecError if absurdly large)."""
    if value.bit_length() > 64:
        raise portspec.PortSpecError(f"port {_int_text(value)} not in 1..65535")
    return str(value)


def _int_text(value: int) -> str:
    """An integer as text; one too long for Python to print in decimal (a TOML hex,
    octal or binary literal may be) as the start of its hex form."""
    if value.bit_length() <= 64:
        return str(value)
    return f"{hex(value)[:18]}…"
