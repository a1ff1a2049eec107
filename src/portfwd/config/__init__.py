"""forward.toml → Config, with every error located as PATH:LINE:COL: the TOML
syntax said for forward.toml, and the document's checks (``configvalues`` holds
the single values' checks; ``configtrust`` decides whether the file may be read)."""

from __future__ import annotations

import re
from ipaddress import IPv4Address, IPv6Address
from typing import Any, Callable, Dict, List, Optional, Tuple

from portfwd.config import configtrust, keys, portspec
from portfwd.config.configvalues import OPTION_KEYS, Checker, describe, dotted, parse_path
from portfwd.config.conflicts import (Claim, claimed_where, claims_of, clash_message, crowd_message,
                        find_conflicts, group_conflicts)
from portfwd.constants import DEFAULT_TABLE, DISCOVER_SOURCES
from portfwd.errors import ConfigError
from portfwd.config.model import Config, Forward, IPNetwork, Listen, Options, PortForward, Where
from portfwd.config.tomlpos import Path, Positions, deepest, locate

from portfwd.config.toml import tomllib

TABLE_NAME = re.compile(r"[A-Za-z][A-Za-z0-9_]{0,63}\Z")
# the keys each table accepts: keys.KEYS, which forward.toml(5) is written from
FORWARD_KEYS = keys.names("forward")
PORT_KEYS = keys.names("port")
MAX_NESTING = 50  # where a document nested deeper than Python can parse is reported


def load(path: str) -> Config:
    """Read, check and parse the file at ``path``; ConfigError lists every problem."""
    return parse(configtrust.read(path), path)


def strict_setting(path: str) -> Optional[bool]:
    """``[options] strict`` as a file that fails validation still says it, for the
    hook; None when the file is missing, untrusted (see ``read``), not TOML or silent.
    Never blocks (a FIFO is refused unopened) and never raises."""
    try:
        data = tomllib.loads(configtrust.read(path))
    except (ConfigError, ValueError, RecursionError):
        return None
    options = data.get("options")
    value = options.get("strict") if isinstance(options, dict) else None
    return value if isinstance(value, bool) else None


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
    return Validator(path, text).config(data)


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
        line, col = found[0].of(parse_path(where.path))
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


class Validator(Checker):
    """The document's checks: [options], each [[forward]], its ports, the conflicts."""

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
            listen_at = dotted(path + ("listen",))
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
                                 f" got {describe(item)}")
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
                    self.error(here, f"expected a port number or \"FIRST-LAST\", got {describe(value)}")
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
            listen_at = dotted(path + ("listen",))
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
            at = parse_path(pf.listen_at) if pf.listen_at else here
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
    return parse_path(pf.where.path)


def _port_text(value: int, written: str) -> str:
    """A port number as text for portspec; PortSpecError naming it as ``written`` (its
    TOML literal) when it is no port."""
    if not 1 <= value <= 65535:
        raise portspec.PortSpecError(f"port {written} not in 1..65535")
    return str(value)
