"""hooks.json of libvirt-hook-qemu (saschpe's hook and its forks) → forward.toml.

Pure: text in, text and messages out; no I/O (``hooksjson`` reads the JSON and
where each value stands; ``importcmd`` reads and writes the files). The old
format, as its README, ``hooks.schema.json`` and hook document it:

- an object whose keys are libvirt domain names; each value is one entry, or a
  list of entries (one set of iptables chains each);
- an entry: ``private_ip`` (required; the DNAT target), ``public_ip`` (the host
  address the DNAT matches; absent: the first IPv4 address of the interface of
  the host's default route, looked up at each guest start), ``source_ip`` (an
  iptables ``-s``: address, CIDR or comma-separated list; only the ``port_map``
  rules carry it), ``interface`` (only narrows the hook's FORWARD accept),
  ``port_map`` (protocol → list of ``PORT`` or ``[PUBLIC, PRIVATE]``),
  ``port_range`` (list of ``{init_port, ports_num, protocol}``: the same ports
  on host and guest);
- comments ``// …`` and ``/* … */`` outside strings.

What has no equivalent is refused, each with ``FILE:LINE:COL: POINTER: message``;
so is what no port can be: a number too long for Python to read or print (an
integer of thousands of digits, ``1e999``) is kept as its text (``Number``) and
refused where it stands, and every value a message quotes is shortened (``shown``).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from ipaddress import IPv4Address, IPv4Network, ip_address, ip_network
from typing import Any, Dict, List, Optional, Tuple

from portfwd.errors import ConfigError
from portfwd.commands.hooksjson import JSONSyntaxError, Number, Path, Reader, pointer, shown, strip_comments

PROTOCOLS = ("tcp", "udp", "sctp")
ENTRY_KEYS = ("private_ip", "public_ip", "source_ip", "interface", "port_map", "port_range")
RANGE_KEYS = ("init_port", "ports_num", "protocol")


@dataclass
class Result:
    """The forward.toml text (empty when ``errors``), refusals and notes."""

    toml: str
    errors: List[str] = field(default_factory=list)
    warnings: List[str] = field(default_factory=list)
    guests: List[str] = field(default_factory=list)  # converted guests, in order


# -- conversion ---------------------------------------------------------------

def toml_string(text: str) -> str:
    """A TOML basic string holding ``text`` exactly."""
    out = []
    for c in text:
        if c in '"\\':
            out.append("\\" + c)
        elif c == "\n":
            out.append("\\n")
        elif c == "\t":
            out.append("\\t")
        elif ord(c) < 0x20 or ord(c) == 0x7F:
            out.append(f"\\u{ord(c):04x}")
        else:
            out.append(c)
    return '"' + "".join(out) + '"'


def comment_text(text: str) -> str:
    """``text`` safe inside a TOML comment (no line breaks or control characters)."""
    return "".join(c if c.isprintable() else f"\\x{ord(c):02x}" for c in text)


class _Converter:
    def __init__(self, text: str, source: str, default_listen: Optional[str]) -> None:
        self.text = text
        self.source = source
        self.default_listen = default_listen
        self.at: Dict[Path, int] = {}
        self.errors: List[str] = []
        self.warnings: List[str] = []
        self.blocks: List[str] = []
        self.origins: List[Tuple[Path, List[Path]]] = []  # per [[forward]]: entry, ports

    def relocate(self, line: str) -> str:
        """A message about the converted TOML, its places turned into hooks.json ones."""
        def path_of(m: "re.Match[str]") -> Optional[Path]:
            f, p = int(m.group("f")), m.group("p")
            if f >= len(self.origins) or (p is not None and int(p) >= len(self.origins[f][1])):
                return None  # not a place of ours (a guest name may look like one)
            entry, ports = self.origins[f]
            return ports[int(p)] if p is not None else entry

        def leading(m: "re.Match[str]") -> str:
            path = path_of(m)
            return m.group() if path is None else f"{self.where(path)}: {pointer(path)}"

        def at(m: "re.Match[str]") -> str:
            path = path_of(m)
            return m.group() if path is None else f"{self.where(path)} ({pointer(path)})"

        line = _AT.sub(at, _LEADING.sub(leading, line))
        if not line.startswith(self.source):
            line = f"{self.source}: {line.replace(CONVERTED + ': ', '')}"
        return line

    def where(self, path: Path, key: bool = False) -> str:
        if key and path + ("<key>",) in self.at:
            path = path + ("<key>",)
        probe = path
        while probe and probe not in self.at:
            probe = probe[:-1]
        offset = self.at.get(probe, 0)
        line = self.text.count("\n", 0, offset) + 1
        col = offset - (self.text.rfind("\n", 0, offset) + 1) + 1
        return f"{self.source}:{line}:{col}"

    def error(self, path: Path, message: str, key: bool = False) -> None:
        """A refusal at ``path`` (at its key rather than its value with ``key``)."""
        self.errors.append(f"{self.where(path, key)}: {pointer(path)}: {message}")

    def warn(self, path: Path, message: str) -> None:
        self.warnings.append(f"{self.where(path)}: warning: {pointer(path)}: {message}")

    def run(self) -> Result:
        if self.text.startswith("\ufeff"):
            from portfwd.config import byte_order_mark

            return Result("", [byte_order_mark(self.source, "JSON")])
        try:
            data = Reader(strip_comments(self.text))
            doc = data.document()
        except JSONSyntaxError as e:
            self.at = {(): e.offset}
            return Result("", [f"{self.where(())}: JSON syntax: {e.message}"])
        self.at = data.at
        if not isinstance(doc, dict):
            return Result("", [f"{self.where(())}: hooks.json must be an object of guest names"])
        if not doc:
            self.warnings.append(f"{self.where(())}: warning: no guests: nothing to convert")
        for guest, value in doc.items():
            if isinstance(value, list):
                if not value:
                    self.warn((guest,), "an empty list forwards nothing; skipped")
                for i, entry in enumerate(value):
                    self.entry(guest, (guest, i), entry)
            else:
                self.entry(guest, (guest,), value)
        if self.errors:
            return Result("", self.errors, self.warnings)
        head = (f"# forward.toml converted by `portfwd import` from {comment_text(self.source)}"
                " (libvirt-hook-qemu).\n# Check it with `portfwd check`; each [[forward]] names"
                " the hooks.json entry it came from.\n")
        toml = head + "".join(self.blocks)
        guests = list(dict.fromkeys(str(path[0]) for path, _ in self.origins))
        return Result(toml, self.errors, self.warnings, guests)

    def entry(self, guest: str, path: Path, entry: Any) -> None:
        if not isinstance(entry, dict):
            self.error(path, "an entry must be an object with private_ip and port_map")
            return
        errors = len(self.errors)
        for key in entry:
            if key not in ENTRY_KEYS:
                self.error(path + (key,), f"unknown key {key!r}: the hook knows only"
                           f" {', '.join(ENTRY_KEYS)}; remove it or convert it by hand", True)
        private = self.address(path + ("private_ip",), entry.get("private_ip"), required=True)
        public = self.address(path + ("public_ip",), entry.get("public_ip"), required=False)
        sources = self.sources(path + ("source_ip",), entry.get("source_ip"))
        notes: List[str] = []
        if "interface" in entry:
            if not isinstance(entry["interface"], str):
                self.error(path + ("interface",), "must be a string (an interface name)")
            notes.append(f"interface {comment_text(str(entry['interface']))} dropped: portfwd"
                         " accepts forwarded traffic on the bridge the guest address is routed to")
        ports: List[Tuple[str, str, Path]] = []  # (port spec, what it came from, where)
        port_map = entry.get("port_map")
        if port_map is not None:
            ports += self.port_map(path + ("port_map",), port_map)
        port_range = entry.get("port_range")
        if port_range is not None:
            ranges = self.port_range(path + ("port_range",), port_range)
            if ranges and sources:
                notes.append("source_ip now limits port_range too (the old hook left it out"
                             " of its port_range rules, admitting every source there)")
            ports += ranges
        if len(self.errors) > errors or private is None:
            return
        if not ports:
            self.warn(path, "no port_map or port_range ports: forwards nothing; skipped")
            return
        lines = [f"\n# from {comment_text(self.source)}: {comment_text(pointer(path))}"
                 f" ({comment_text(self.where(path))})\n"]
        lines += [f"# note: {n}\n" for n in notes]
        lines.append("[[forward]]\n")
        lines.append(f"guest = {toml_string(guest)}\n")
        lines.append(f'ipv4 = "{private}"\n')
        if public is not None:
            lines.append(f'listen = ["{public}"]  # public_ip\n')
        elif self.default_listen is not None:
            lines.append(f"listen = [{toml_string(self.default_listen)}]  # no public_ip: the"
                         " old hook used the address of this default-route interface\n")
        else:
            lines.append("# no public_ip: every local address (the old hook used only the"
                         " default-route interface's first address)\n")
        if sources:
            lines.append("from = [" + ", ".join(f'"{s}"' for s in sources) + "]  # source_ip\n")
        lines.append("ports = [\n")
        width = max(len(spec) for spec, _, _ in ports) + 3
        self.origins.append((path, [at for _, _, at in ports]))
        for spec, origin, _ in ports:
            lines.append(f"  {(json.dumps(spec) + ','):<{width}} # {comment_text(origin)}\n")
        lines.append("]\n")
        self.blocks.append("".join(lines))

    def address(self, path: Path, value: Any, required: bool) -> Optional[IPv4Address]:
        if value is None:
            if required:
                self.error(path[:-1], f"{path[-1]} is missing: the guest address to forward to")
            return None
        if not isinstance(value, str):
            self.error(path, f"must be an IPv4 address in a string, not {shown(value)}")
            return None
        try:
            addr = ip_address(value.strip())
        except ValueError:
            self.error(path, f"{value!r} is not an IP address")
            return None
        if not isinstance(addr, IPv4Address):
            self.error(path, f"{value!r} is IPv6: the old hook ran iptables (IPv4 only), so this"
                       " never forwarded; write an ipv6 forward in forward.toml by hand")
            return None
        return addr

    def sources(self, path: Path, value: Any) -> List[IPv4Network]:
        if value is None:
            return []
        if not isinstance(value, str):
            self.error(path, f"must be a string (address or CIDR), not {shown(value)}")
            return []
        out: List[IPv4Network] = []
        for part in value.split(","):  # iptables -s takes a comma-separated list
            part = part.strip()
            try:
                net = ip_network(part, strict=False)
            except ValueError:
                self.error(path, f"{part!r} is not an address or CIDR (host names, which"
                           " iptables resolves once, have no equivalent)")
                continue
            if not isinstance(net, IPv4Network):
                self.error(path, f"{part!r} is IPv6: the old hook's iptables rules were IPv4 only")
                continue
            if str(net) != part and str(net.network_address) != part:
                self.warn(path, f"{part!r} has host bits set; iptables matched {net}, and so does"
                          " the converted forward")
            out.append(net)
        nets = sorted(set(out), key=lambda n: (int(n.network_address), n.prefixlen))
        # one inside another: the wider one says it all (portfwd refuses overlapping from)
        return [n for n in nets if not any(o != n and n.subnet_of(o) for o in nets)]

    def port(self, path: Path, value: Any) -> Optional[int]:
        if isinstance(value, Number) and value.integer:
            self.error(path, f"port {shown(value)} not in 1..65535")
            return None
        if isinstance(value, bool) or not isinstance(value, int):
            self.error(path, f"must be a port number, not {shown(value)}")
            return None
        if not 1 <= value <= 65535:
            self.error(path, f"port {value} not in 1..65535")
            return None
        return value

    def protocol(self, path: Path, proto: Any, key: bool = False) -> Optional[str]:
        if proto == "icmp":
            self.error(path, "icmp has no ports and no equivalent in portfwd (the old hook passed"
                       " `-p icmp --dport` to iptables, which refused it: it never forwarded"
                       " anything); remove it", key)
            return None
        if proto not in PROTOCOLS:
            lower = (f" (lower case: {shown(proto.lower())})"
                     if isinstance(proto, str) and proto.lower() in PROTOCOLS else "")
            self.error(path, f"unknown protocol {shown(proto)}; use tcp, udp or sctp{lower}", key)
            return None
        return str(proto)

    def port_map(self, path: Path, value: Any) -> List[Tuple[str, str, Path]]:
        if not isinstance(value, dict):
            self.error(path, "must be an object: protocol → list of ports")
            return []
        out: List[Tuple[str, str, Path]] = []
        for proto, items in value.items():
            here = path + (proto,)
            if self.protocol(here, proto, key=True) is None:
                continue
            if not isinstance(items, list):
                self.error(here, "must be a list of ports and [public, private] pairs")
                continue
            for i, item in enumerate(items):
                at = here + (i,)
                if isinstance(item, list):
                    if len(item) != 2:
                        self.error(at, f"a pair is [public, private], not {len(item)} items")
                        continue
                    public, private = self.port(at + (0,), item[0]), self.port(at + (1,), item[1])
                else:
                    public = private = self.port(at, item)
                if public is None or private is None:
                    continue
                spec = f"{public}/{proto}" if public == private else f"{public}:{private}/{proto}"
                out.append((spec, f"{pointer(at[-3:])} {json.dumps(item)}", at))
        return out

    def port_range(self, path: Path, value: Any) -> List[Tuple[str, str, Path]]:
        if not isinstance(value, list):
            self.error(path, "must be a list of {init_port, ports_num, protocol}")
            return []
        out: List[Tuple[str, str, Path]] = []
        for i, item in enumerate(value):
            at = path + (i,)
            if not isinstance(item, dict):
                self.error(at, "must be an object {init_port, ports_num, protocol}")
                continue
            missing = [k for k in RANGE_KEYS if k not in item]
            unknown = [k for k in item if k not in RANGE_KEYS]
            for k in unknown:
                self.error(at + (k,), f"unknown key {k!r}: a range has {', '.join(RANGE_KEYS)}",
                           True)
            if missing:
                self.error(at, f"missing {', '.join(missing)}")
                continue
            first = self.port(at + ("init_port",), item["init_port"])
            proto = self.protocol(at + ("protocol",), item["protocol"])
            count = item["ports_num"]
            if isinstance(count, Number) and count.integer and not count.negative:
                self.error(at + ("ports_num",), f"{shown(count)} ports run past port 65535")
                continue
            if isinstance(count, bool) or not isinstance(count, int) or count < 1:
                self.error(at + ("ports_num",), f"must be a number of ports >= 1, not"
                           f" {shown(count)}")
                continue
            if first is None or proto is None:
                continue
            last = first + count - 1
            if last > 65535:
                self.error(at + ("ports_num",), f"{first}+{count}-1 = {last} runs past port 65535")
                continue
            spec = f"{first}/{proto}" if count == 1 else f"{first}-{last}/{proto}"
            out.append((spec, f"{pointer(at[-2:])} {first}..{last} (same ports on the guest)",
                        at))
        return out


def convert(text: str, source: str = "hooks.json", default_listen: Optional[str] = None) -> Result:
    """hooks.json text → forward.toml text, every refusal located in ``source``.

    ``default_listen`` stands in for an absent ``public_ip`` (the old hook's
    default-route address): an interface name or address; None: every address.
    The result is checked with portfwd's own parser (two entries claiming one
    host port, say) before it is returned; its complaints name hooks.json places.
    """
    converter = _Converter(text, source, default_listen)
    result = converter.run()
    if result.errors:
        return result
    from portfwd.config import parse

    try:
        parse(result.toml, CONVERTED)
    except ConfigError as e:
        return Result("", [converter.relocate(line) for line in e.lines], result.warnings)
    return result


CONVERTED = "<converted>"
_ENTRY = r"forward\[(?P<f>\d+)\](?:\.ports\[(?P<p>\d+)\])?"
_LEADING = re.compile(r"\A<converted>:\d+:\d+: " + _ENTRY)
_AT = re.compile(r"<converted>:\d+:\d+ \(" + _ENTRY + r"\)")
