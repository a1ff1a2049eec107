"""The validator's ground floor: errors and warnings located in forward.toml, and
the checks of single values (addresses, interfaces, networks, MACs, names, UUIDs)
that ``config.Validator`` builds the document's checks on."""

from __future__ import annotations

import re
import uuid as uuidlib
from ipaddress import ip_address, ip_network
from typing import Any, Dict, List, Optional, Sequence, Tuple

from portfwd.config import keys
from portfwd.libvirt.domainxml import mac_problem
from portfwd.config.model import IPAddress, IPNetwork, Listen, Where
from portfwd.suggest import did_you_mean
from portfwd.config.tomlpos import Path, Positions, locate

OPTION_KEYS = keys.names("options")
IFNAME = re.compile(r"(?=.*[A-Za-z])[A-Za-z0-9_.-]{1,15}\Z")
BARE_KEY = re.compile(r"[A-Za-z0-9_-]+\Z")


class Checker:
    """Errors and warnings located in one file's text, and the checks of single values."""

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
            return int_text(value)
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
        return Where(self.file, dotted(path))

    def location(self, path: Path) -> str:
        line, col = self.positions.of(path)
        return f"{self.file}:{line}:{col}"

    def error(self, path: Path, message: str, at_key: bool = False) -> None:
        pos = self.positions.of_key(path) if at_key else self.positions.of(path)
        self.errors.append((pos, f"{self.file}:{pos[0]}:{pos[1]}: {dotted(path)}: {message}"))

    def warn(self, path: Path, message: str) -> None:
        """A warning at ``path``; once, however many ports share what it is about."""
        line = f"{self.location(path)}: warning: {dotted(path)}: {message}"
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
                     else describe(value))
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
                       f" {self.location(path + (there,))}, {dotted(path + (there,))}), and"
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


def dotted(path: Path) -> str:
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


def parse_path(text: str) -> Path:
    """``forward[1].ports[0]`` → ("forward", 1, "ports", 0) (for portfwd's own keys)."""
    parts: List[Any] = []
    for piece in re.findall(r"[^.\[\]]+", text):
        parts.append(int(piece) if piece.isdigit() else piece)
    return tuple(parts)


def describe(value: Any) -> str:
    names = {bool: "a boolean", int: "an integer", float: "a number", str: "a string",
             list: "a list", dict: "a table"}
    if isinstance(value, (list, dict)):
        return names[type(value)]
    if isinstance(value, bool):
        shown = "true" if value else "false"  # as TOML writes it
    else:
        shown = int_text(value) if isinstance(value, int) else repr(value)
    return f"{names.get(type(value), type(value).__name__)} ({shown})"


def int_text(value: int) -> str:
    """An integer as text: in decimal, a long one cut (Python prints no more than
    4300 digits; TOML's hex, octal and binary literals may be longer)."""
    try:
        text = str(value)
    except ValueError:
        return "a number of more than 4300 digits"
    return text if len(text) <= 50 else f"{text[:20]}… ({len(text.lstrip('-'))} digits)"
