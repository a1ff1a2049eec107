"""Small typed values that cross module lines, instead of strings that the next
module would parse again. Plain ``__slots__`` classes and ``Enum``s (``enum``
comes with ``json``, which a guest start loads anyway): the hook imports this
module on every guest start with forwards, and they cost nothing to import.

On disk (the compiled configuration, the recorded guest state) some of them are
still written as text (``?mac=…&suffix=…``, ``@eth0``; a pending reason as
``inactive: …`` by earlier versions, now as ``[cause, text]``); ``from_text``
here is the only place that reads that text.
"""

from __future__ import annotations

from enum import Enum

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any, FrozenSet, Iterable, List, Optional, Sequence, Set, Tuple, Union

    # a binding's DNAT target: a guest address, or a selector until it is discovered
    Target = Union[str, "Selector"]


class Value:
    """Equality, hash and repr from ``_fields()``: the base of the small values here
    (and of ``plan.Binding``)."""

    __slots__ = ()

    def _fields(self) -> Tuple[Any, ...]:
        raise NotImplementedError

    def __eq__(self, other: object) -> bool:
        return (isinstance(other, Value) and type(other) is type(self)
                and self._fields() == other._fields())

    def __hash__(self) -> int:
        return hash(self._fields())

    def __repr__(self) -> str:
        return f"{type(self).__name__}{self._fields()!r}"


class Selector(Value):
    """A guest address to discover when the guest runs: the address of the NIC with
    this MAC ("" = the first NIC on a libvirt network), for IPv6 optionally a suffix
    (``::10``) joined to the network's prefix."""

    __slots__ = ("mac", "suffix")

    def __init__(self, mac: str = "", suffix: str = "") -> None:
        self.mac = mac
        self.suffix = suffix

    @classmethod
    def from_text(cls, text: str) -> "Selector":
        """``?mac=M&suffix=S`` (as written on disk) → Selector."""
        fields = dict(part.partition("=")[::2] for part in text[1:].split("&"))
        return cls(fields.get("mac", ""), fields.get("suffix", ""))

    def __str__(self) -> str:
        return f"?mac={self.mac}&suffix={self.suffix}" if self.suffix else f"?mac={self.mac}"

    def describe(self, family: int) -> str:
        """``IPv6 of 52:54:00:…, suffix ::10``, for people."""
        return (f"IPv{family} of {self.mac or 'the first NIC'}"
                + (f", suffix {self.suffix}" if self.suffix else ""))

    def _fields(self) -> Tuple[str, str]:
        return (self.mac, self.suffix)



def target_from_text(text: str) -> Target:
    """A target as written on disk: a selector starts with ``?``."""
    return Selector.from_text(text) if text.startswith("?") else text


class ListenIface(Value):
    """A listen interface in a binding's key, standing for its addresses until
    ``resolve`` expands it; ``prefix`` is the length of a ``src`` key's listen prefix
    (None in a ``fwd`` key)."""

    __slots__ = ("name", "prefix")

    def __init__(self, name: str, prefix: Optional[int] = None) -> None:
        self.name = name
        self.prefix = prefix

    @classmethod
    def from_text(cls, text: str) -> "ListenIface":
        """``@eth0`` or ``@eth0/32`` (as written on disk) → ListenIface."""
        name, slash, length = text[1:].partition("/")
        return cls(name, int(length) if slash else None)

    def with_address(self, address: str) -> str:
        """The key part for one of the interface's addresses."""
        return address if self.prefix is None else f"{address}/{self.prefix}"

    def __str__(self) -> str:
        return f"@{self.name}" if self.prefix is None else f"@{self.name}/{self.prefix}"

    def _fields(self) -> Tuple[str, Optional[int]]:
        return (self.name, self.prefix)



class PortSpan(Value):
    """One host port (``first == last``) or a range of them kept as one element of
    the maps: ``str`` gives ``"80"`` or ``"5000-5010"``, as the records and people
    read it; ``to_json`` the record's form (a range as that text, a port as a
    number), ``from_json`` reads either back."""

    __slots__ = ("first", "last")

    def __init__(self, first: int, last: Optional[int] = None) -> None:
        self.first = first
        self.last = first if last is None else last

    @property
    def is_range(self) -> bool:
        return self.last != self.first

    def overlaps(self, other: "PortSpan") -> bool:
        return self.first <= other.last and other.first <= self.last

    def __contains__(self, port: object) -> bool:
        return isinstance(port, int) and self.first <= port <= self.last

    def __str__(self) -> str:
        return f"{self.first}-{self.last}" if self.is_range else str(self.first)

    def to_json(self) -> Union[int, str]:
        return str(self) if self.is_range else self.first

    @classmethod
    def from_json(cls, raw: Union[int, str]) -> "PortSpan":
        """``80``, ``"80"`` or ``"5000-5010"`` (ValueError otherwise)."""
        first, _, last = str(raw).partition("-")
        return cls(int(first), int(last) if last else None)

    def _fields(self) -> Tuple[int, int]:
        return (self.first, self.last)


def key_part_from_text(part: Any) -> Any:
    """A key part as written on disk: an interface placeholder starts with ``@``."""
    return ListenIface.from_text(part) if isinstance(part, str) and part.startswith("@") else part


class FirewallBackend(Enum):
    """What holds libvirt's inbound chain of a family (``compat``); the value names it in
    ``portfwd status``."""

    IPTABLES_NFT = "iptables-nft"  # LIBVIRT_FWI in table ip|ip6 filter
    IPTABLES_LEGACY = "iptables-legacy"  # LIBVIRT_FWI in the kernel's legacy xtables
    NFTABLES = "nftables"  # guest_input in table ip|ip6 libvirt_network (libvirt >= 10.4)


class RuleRole(Enum):
    """What a rule of libvirt's inbound chain is to portfwd (OURS, REJECT, OTHER), or
    what PORTFWD_FWI holds (OURS: exactly portfwd's accept, EMPTY, OTHER)."""

    OURS = "ours"
    REJECT = "reject"
    OTHER = "other"
    EMPTY = "empty"


class Cause(Enum):
    """Why a binding is pending, in short (``Reason.cause``); the value is how the
    record writes it."""

    WAITING = "waiting"  # for an address: the daemon or the next sync may find it
    INACTIVE = "inactive"  # IPv6 off: no address will cure it
    REFUSED = "refused"  # a discovered address portfwd does not trust
    HELD = "held"  # another guest holds the port


class Reason(Value):
    """Why a binding is pending: its ``Cause`` and the text people read."""

    WAITING, INACTIVE, REFUSED, HELD = Cause.WAITING, Cause.INACTIVE, Cause.REFUSED, Cause.HELD
    _PREFIX = "inactive: "  # how an INACTIVE reason is written on disk

    __slots__ = ("cause", "text")

    def __init__(self, cause: Cause, text: str) -> None:
        self.cause = cause
        self.text = text

    def to_json(self) -> List[str]:
        """As the record writes it: ``[cause, text]``."""
        return [self.cause.value, self.text]

    @classmethod
    def from_json(cls, raw: Any) -> "Reason":
        """As recorded: ``[cause, text]``, or the text alone (earlier versions did not
        write the cause); an unknown cause is read from the text."""
        if isinstance(raw, list) and len(raw) == 2:
            try:
                return cls(Cause(str(raw[0])), str(raw[1]))
            except ValueError:
                return cls.from_text(str(raw[1]))
        return cls.from_text(str(raw))

    @classmethod
    def from_text(cls, text: str) -> "Reason":
        """A reason as earlier versions wrote it on disk, without its cause."""
        if text.startswith(cls._PREFIX):
            return cls(cls.INACTIVE, text[len(cls._PREFIX):])
        if text.startswith("refused "):
            return cls(cls.REFUSED, text)
        if " is held by guest " in text:
            return cls(cls.HELD, text)
        return cls(cls.WAITING, text)

    def __str__(self) -> str:
        """The text written on disk and shown: ``inactive: …`` for INACTIVE."""
        return self._PREFIX + self.text if self.cause == self.INACTIVE else self.text

    def _fields(self) -> Tuple[Cause, str]:
        return (self.cause, self.text)



class Bridges(Value):
    """Where one guest's forwards lead, as host.json records it: the table, the
    interfaces the kernel routes the guest addresses to (family, interface), and
    those of forwards from 127.0.0.1 (which need ``route_localnet``). Text only on
    disk: the entries ``["4:virbr0", "L:virbr0", "T:portfwd"]`` (``to_json``,
    ``from_json``)."""

    __slots__ = ("table", "routed", "localnet")

    def __init__(self, table: str, routed: FrozenSet[Tuple[int, str]] = frozenset(),
                 localnet: FrozenSet[str] = frozenset()) -> None:
        self.table = table
        self.routed = routed  # (family, interface) of every guest address with a route
        self.localnet = localnet

    @classmethod
    def of(cls, table: str, routed: Iterable[Tuple[int, str]] = (),
           localnet: Iterable[str] = ()) -> "Bridges":
        return cls(table, frozenset(routed), frozenset(localnet))

    def _fields(self) -> Tuple[Any, ...]:
        return (self.table, self.routed, self.localnet)

    def to_json(self) -> List[str]:
        return sorted({f"T:{self.table}"} | {f"{f}:{i}" for f, i in self.routed}
                      | {f"L:{i}" for i in self.localnet})

    @classmethod
    def from_json(cls, entries: List[str], default_table: str) -> "Bridges":
        """The entries as recorded (a record without "T:" is of ``default_table``);
        TypeError or AttributeError if they are not a list of texts."""
        table = default_table
        routed: Set[Tuple[int, str]] = set()
        localnet: Set[str] = set()
        for e in entries:
            kind, name = e[:2], e[2:]
            if kind == "T:":
                table = name
            elif kind in ("4:", "6:"):
                routed.add((int(e[0]), name))
            elif kind == "L:":
                localnet.add(name)
        return cls(table, frozenset(routed), frozenset(localnet))


class BlockerKind(Enum):
    """What drops forwarded connections (and so what fixes it): ``compat.blockers``,
    ``doctorfacts.own_drops``."""

    ORDER = "order"  # libvirt's reject before portfwd's accept: ``portfwd reapply``
    POLICY = "policy"  # a forward base chain's policy drop
    RULE = "rule"  # a drop or reject rule in another forward base chain
    FIREWALLD = "firewalld"  # firewalld's StrictForwardPorts=yes


class Blocker:
    """One place that drops forwarded connections to bridges with forwards, where
    portfwd does not, or must not, change that: its kind, the table and chain
    (``handle``: the rule's, for a RULE), the (family, bridge) pairs it concerns,
    and the line people read (``str``)."""

    __slots__ = ("kind", "family", "table", "chain", "handle", "concerned", "text")

    def __init__(self, kind: BlockerKind, family: str, table: str, chain: str, text: str,
                 concerned: Sequence[Tuple[int, str]] = (), handle: Optional[int] = None
                 ) -> None:
        self.kind = kind
        self.family = family  # "ip", "ip6" or "inet"
        self.table = table
        self.chain = chain
        self.handle = handle
        self.concerned = list(concerned)
        self.text = text

    def __str__(self) -> str:
        return self.text

    def __repr__(self) -> str:
        return f"Blocker({self.kind.name}, {self.text!r})"
