"""Small typed values that cross module lines, instead of strings that the next
module would parse again. Plain ``__slots__`` classes: the hook imports this
module on every guest start, and they cost nothing to import.

On disk (the compiled configuration, the recorded guest state) some of them are
still written as text (``?mac=…&suffix=…``, ``@eth0``; a pending reason as
``inactive: …`` by earlier versions, now as ``[cause, text]``); ``from_text``
here is the only place that reads that text.
"""

from __future__ import annotations

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any, Iterable, List, Optional, Set, Tuple, Union

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


class Reason(Value):
    """Why a binding is pending. ``cause``: WAITING (for an address: the daemon or the
    next sync may find it), INACTIVE (IPv6 off: no address will cure it), REFUSED (a
    discovered address portfwd does not trust), HELD (another guest holds the port)."""

    WAITING, INACTIVE, REFUSED, HELD = "waiting", "inactive", "refused", "held"
    _PREFIX = "inactive: "  # how an INACTIVE reason is written on disk

    __slots__ = ("cause", "text")

    def __init__(self, cause: str, text: str) -> None:
        self.cause = cause
        self.text = text

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

    def _fields(self) -> Tuple[str, str]:
        return (self.cause, self.text)



class Bridges:
    """Where one guest's forwards lead, as the bridges summary records it: the table,
    the interfaces the kernel routes the guest addresses to (per family), and those
    of forwards from 127.0.0.1 (which need ``route_localnet``).

    Kept as the entries the summary has always held (``["4:virbr0", "L:virbr0",
    "T:portfwd"]``) and read on demand: every guest change rewrites the summary of
    all guests, which must stay cheap with thousands of them."""

    __slots__ = ("entries", "default_table")

    def __init__(self, entries: List[str], default_table: str = "") -> None:
        self.entries = entries
        self.default_table = default_table

    @classmethod
    def of(cls, table: str, routed: Iterable[Tuple[int, str]] = (),
           localnet: Iterable[str] = ()) -> "Bridges":
        return cls(sorted({f"T:{table}"} | {f"{f}:{i}" for f, i in routed}
                          | {f"L:{i}" for i in localnet}))

    @property
    def table(self) -> str:
        return next((e[2:] for e in self.entries if e.startswith("T:")), self.default_table)

    @property
    def routed(self) -> Set[Tuple[int, str]]:
        """(family, interface) of every guest address with a route."""
        return {(int(e[0]), e[2:]) for e in self.entries if e[:2] in ("4:", "6:")}

    @property
    def localnet(self) -> Set[str]:
        return {e[2:] for e in self.entries if e.startswith("L:")}

    def to_json(self) -> List[str]:
        return self.entries

    @classmethod
    def from_json(cls, entries: List[str], default_table: str) -> "Bridges":
        return cls([str(e) for e in entries], default_table)
