"""forward.toml → Config, with every error located as PATH:LINE:COL."""

from __future__ import annotations

import difflib
import os
import re
import stat
import uuid as uuidlib
from ipaddress import (IPv4Address, IPv6Address, ip_address, ip_network)
from typing import Any, Dict, List, Optional, Sequence, Tuple

from . import portspec
from .conflicts import Claim, claims_of, find_conflicts
from .errors import ConfigError
from .plan import DEFAULT_TABLE
from .model import (Config, Forward, IPAddress, IPNetwork, Listen,
                    Options, PortForward, Where, families_of)
from .tomlpos import Path, Positions, locate

from .toml import tomllib

TABLE_NAME = re.compile(r"[A-Za-z][A-Za-z0-9_]{0,63}\Z")
OPTION_KEYS = ("table", "listen", "strict", "localhost")
FORWARD_KEYS = ("guest", "uuid", "interface", "ipv4", "ipv6", "ports", "listen", "from",
                "localhost")
IFNAME = re.compile(r"(?=.*[A-Za-z])[A-Za-z0-9_.-]{1,15}\Z")
PORT_KEYS = ("host", "guest", "proto", "listen", "from")


def load(path: str) -> Config:
    """Read, check and parse the file at ``path``; ConfigError lists every problem."""
    problems = unsafe_permissions(path)
    if problems:
        raise ConfigError(problems)
    try:
        with open(path, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        raise ConfigError([f"{path}: no such file; create it (see config/forward.toml)"
                           " or point --config / $PORTFWD_CONFIG at it"]) from None
    except OSError as e:
        raise ConfigError([f"{path}: cannot read: {e.strerror}"]) from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data[:e.start].count(b"\n") + 1
        col = e.start - (data.rfind(b"\n", 0, e.start) + 1) + 1
        raise ConfigError([f"{path}:{line}:{col}: not UTF-8 text"]) from None
    return parse(text, path)


def unsafe_permissions(path: str) -> List[str]:
    """Refuse a file, or its directory, that someone other than root may write."""
    problems: List[str] = []
    for target in (os.path.dirname(os.path.abspath(path)), path):
        try:
            st = os.stat(target)
        except OSError:
            continue
        writers = []
        if st.st_uid != 0:
            writers.append(f"its owner, uid {st.st_uid}")
        if st.st_gid != 0 and st.st_mode & stat.S_IWGRP:
            writers.append(f"group gid {st.st_gid}")
        if st.st_mode & stat.S_IWOTH:
            writers.append("everyone")
        if writers:
            kind = "directory" if stat.S_ISDIR(st.st_mode) else "file"
            problems.append(
                f"{target}:1:1: refused: this {kind} is writable by {' and '.join(writers)}"
                f" (mode {stat.S_IMODE(st.st_mode):04o}), who could then forward ports as root;"
                f" fix: chown root:root {target} && chmod go-w {target}")
    return problems


def parse(text: str, path: str = "<config>") -> Config:
    """Parse TOML text; raise ConfigError with every problem found."""
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError([_syntax_error(path, text, str(e))]) from None
    return _Validator(path, text).config(data)


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
    out = ""
    for part in path:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
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
        if not self.expect(value, list, path, "a list of CIDR networks"):
            return None
        out: List[IPNetwork] = []
        for i, item in enumerate(value):
            here = path + (i,)
            if not self.expect(item, str, here, "a CIDR string such as \"198.51.100.0/24\""):
                continue
            try:
                out.append(ip_network(item))
            except ValueError:
                try:
                    loose = ip_network(item, strict=False)
                except ValueError:
                    self.error(here, f"{item!r} is not a CIDR network (write e.g. \"198.51.100.0/24\")")
                else:
                    self.error(here, f"{item!r} has host bits set; did you mean \"{loose}\"?")
        return tuple(dict.fromkeys(out))

    def guest_address(self, value: Any, path: Path, family: int) -> Optional[IPAddress]:
        if not self.expect(value, str, path, f"an IPv{family} address string"):
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
        return Options(table, listen, self.flag(raw, "strict", path, False),
                       self.flag(raw, "localhost", path, False))

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
        octets = value.split(":")
        if len(octets) != 6 or not all(len(o) == 2 and all(c in "0123456789abcdefABCDEF" for c in o)
                                       for o in octets):
            self.error(path, f"{value!r} is not a MAC address (six octets such as"
                             " 52:54:00:12:34:56, as `virsh domiflist` prints them)")
            return None
        if int(octets[0], 16) & 1:
            self.error(path, f"{value} is a multicast MAC address; a guest NIC's MAC is unicast"
                             " (the first octet is even)")
            return None
        if value.strip("0:") == "":
            self.error(path, f"{value} is the all-zero MAC address; no NIC has it")
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
            if not guest or "/" in guest or "\n" in guest:
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
                rng = portspec.parse(str(item))
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
                    spans[key] = portspec.parse_span(str(value), str(value))
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
                claims.extend(claims_of(pf, families_of(fwd, pf), len(items)))
                items.append((fwd, pf))
        for first, second in find_conflicts(claims):
            (fa, pa), (fb, pb) = items[first.owner], items[second.owner]
            where = "every IPv%d address" % first.family if first.address is None else str(first.address)
            if second.address is not None and first.address is None:
                where = str(second.address)
            self.error(_path_of(pb),
                       f"host port {_overlap(first, second)}/{first.proto} on {where} is claimed twice:"
                       f" here for {fb.label} and at {self.location(_path_of(pa))}"
                       f" ({pa.where.path}) for {fa.label};"
                       " use another host port or listen address")


def _overlap(a: Claim, b: Claim) -> str:
    low, high = max(a.first, b.first), min(a.last, b.last)
    return str(low) if low == high else f"{low}-{high}"


def _path_of(pf: PortForward) -> Path:
    parts: List[Any] = []
    for piece in re.findall(r"[^.\[\]]+", pf.where.path):
        parts.append(int(piece) if piece.isdigit() else piece)
    return tuple(parts)


def _describe(value: Any) -> str:
    names = {bool: "a boolean", int: "an integer", float: "a number", str: "a string",
             list: "a list", dict: "a table"}
    return f"{names.get(type(value), type(value).__name__)} ({value!r})" if not isinstance(
        value, (list, dict)) else names[type(value)]
