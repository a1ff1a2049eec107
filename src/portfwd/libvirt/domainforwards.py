"""Forwards a domain declares in its own XML, opt-in:

    <metadata>
      <pf:forwards xmlns:pf="urn:portfwd:forwards:1">
        <pf:forward ports="8080:80 2222:22" from="198.51.100.0/24"/>
      </pf:forwards>
    </metadata>

Each ``<pf:forward>`` holds the keys of a ``[[forward]]`` table as attributes
(``ports``, ``from``, ``listen``: space-separated lists; ``ipv4``, ``ipv6``,
``interface``; ``proto``: the protocols of the specs without ``/PROTO``), for the
domain it sits in. Read only when forward.toml says ``[options] domain_forwards =
true``; then every host port it claims must lie in ``[options] domain_ports``, and
it may not claim what a forward of forward.toml claims (forward.toml wins). A
forward failing any of that is refused whole, with its reason; the others stand.
``domainxml`` reads the element; ``config``'s validator checks it, so its errors
read ``DOMAIN <metadata>: forward[0].ports[1]: …``.
"""

from __future__ import annotations

from typing import Any, Dict, List, Optional, Sequence, Tuple

from portfwd.config import portspec
from portfwd.config import Validator
from portfwd.config.configvalues import dotted
from portfwd.config.conflicts import claims_of, find_conflicts
from portfwd.config.model import Config, Forward, Where
from portfwd.plan import forwards_bindings, templates
from portfwd.rundir.record import GuestState

TYPE_CHECKING = False
if TYPE_CHECKING:
    from portfwd.plan import Template
from portfwd.config.tomlpos import Path

LISTS = ("ports", "from", "listen")
INDEX_BASE = 1 << 20  # after every [[forward]] of forward.toml, in file order


class _MetadataValidator(Validator):
    """config's validator, its messages located in the domain's <metadata>."""

    def error(self, path: Path, message: str, at_key: bool = False) -> None:
        self.errors.append(((0, 0), f"{self.file}: {dotted(path)}: {message}"))

    def warn(self, path: Path, message: str) -> None:
        self.warnings.append(f"{self.file}: warning: {dotted(path)}: {message}")

    def location(self, path: Path) -> str:
        return f"{self.file} {dotted(path)}"


def label(name: str) -> str:
    return f"{name} <metadata>"


def forwards(elements: Sequence[Dict[str, str]], name: str, uuid: Optional[str],
             config: Config, others: Sequence[GuestState] = ()
             ) -> Tuple[List[Forward], List[str]]:
    """The forwards the ``<pf:forward>`` attributes ``elements`` of domain ``name``
    declare that ``config`` lets it have, and why each other one is refused
    (``others``: what other guests hold now; a port one of them holds is theirs)."""
    if not config.options.domain_forwards or not elements:
        return [], []
    accepted: List[Forward] = []
    refused: List[str] = []
    for i, attributes in enumerate(elements):
        check = _MetadataValidator(label(name), "")
        raw = _table(attributes, name, check, i)
        fwd = check.forward(raw, i, config.options)
        problems = [m for _, m in check.errors]
        if fwd is not None and not problems:
            fwd = Forward(INDEX_BASE + i, name, uuid, fwd.ipv4, fwd.ipv6, fwd.ports,
                          Where(label(name), f"forward[{i}]"), fwd.interface, fwd.ipv6_suffix)
            problems = (_outside(fwd, config) + _claimed(fwd, config, accepted)
                        + _held(fwd, name, others))
        if problems:
            refused += problems
        elif fwd is not None:
            accepted.append(fwd)
    return accepted, refused


def hook_templates(xml: bytes, name: str, uuid: Optional[str], config_path: str,
                   others: Sequence[GuestState]) -> List[Template]:
    """The binding templates of the forwards a starting domain's XML declares (the
    hook's: the XML on stdin is the source, libvirt is never asked), less those
    whose ports the recorded forwards of ``others`` hold; each refused one logged."""
    from portfwd import log
    from portfwd.config import load
    from portfwd.libvirt.domainxml import parse

    accepted, refused = forwards(parse(xml).forwards, name, uuid, load(config_path), others)
    for line in refused:
        log.warning(line)
    return templates(accepted)


def refusals(config: Config, others: Sequence[GuestState] = (),
             xmls: Optional[Dict[str, bytes]] = None) -> List[Tuple[str, str, str]]:
    """(guest, where, why) per refused ``<pf:forward>`` of a running domain, for
    ``status`` (``others``: the guests' records; ``xmls``: name → live XML, default:
    the copies libvirt keeps in its status files)."""
    from portfwd.libvirt.domainxml import FORWARDS_MARK, parse, status_files

    out: List[Tuple[str, str, str]] = []
    found = status_files() if xmls is None else xmls
    for name, xml in sorted((found or {}).items()):
        if FORWARDS_MARK not in xml:
            continue
        domain = parse(xml)
        for reason in forwards(domain.forwards, domain.name or name, domain.uuid, config,
                               others)[1]:
            where, _, why = reason.partition(": ")
            out.append((domain.name or name, where, why))
    return out


def _table(attributes: Dict[str, str], name: str, check: Validator, i: int) -> Dict[str, Any]:
    """The attributes as the [[forward]] table they stand for."""
    raw: Dict[str, Any] = {}
    for key, value in attributes.items():
        if key in ("guest", "uuid"):
            check.error(("forward", i, key), "a domain's forwards are its own: leave out"
                        f" {key}", at_key=True)
        elif key in LISTS:
            raw[key] = value.split()
        elif key != "proto":
            raw[key] = value
    protos = []
    for proto in attributes.get("proto", "").split():
        try:
            protos.append(portspec.check_proto(proto, proto))
        except portspec.PortSpecError as e:
            check.error(("forward", i, "proto"), str(e))
    if "ports" in raw:
        raw["ports"] = portspec.with_protos(raw["ports"], protos)
    raw["guest"] = name
    return raw


def _outside(fwd: Forward, config: Config) -> List[str]:
    """A port outside ``[options] domain_ports``."""
    spans = config.options.domain_ports
    out = []
    for j, pf in enumerate(fwd.ports):
        rng = pf.ports
        if not any(first <= rng.host_first and rng.host_last <= last for first, last in spans):
            allowed = ", ".join(f"{a}-{b}" if a != b else str(a) for a, b in spans)
            out.append(f"{fwd.where.file}: {fwd.where.path}.ports[{j}]: refused: host port(s)"
                       f" {rng.host_first}-{rng.host_last}/{rng.proto} lie outside [options]"
                       f" domain_ports ({allowed}) of {config.path}")
    return out


def _held(fwd: Forward, name: str, others: Sequence[GuestState]) -> List[str]:
    """A port another guest's applied forwards hold (the guest that has it keeps it)."""
    from portfwd.plan.claims import Claims

    held = Claims()
    for st in others:
        if st.guest != name:
            for b in st.bindings:
                held.add(b, st.guest)
    holders = sorted({h for b in forwards_bindings([fwd], name) for h in [held.holder(b)] if h})
    if not holders:
        return []
    return [f"{fwd.where.file}: {fwd.where.path}: refused: guest {', '.join(holders)} holds a"
            " host port of it"]


def _claimed(fwd: Forward, config: Config, accepted: List[Forward]) -> List[str]:
    """A port forward.toml (or an earlier element of the same domain) claims."""
    owners = list(config.forwards) + accepted
    items = [(o, pf) for o in owners for pf in o.ports] + [(fwd, pf) for pf in fwd.ports]
    claims = [c for n, (o, pf) in enumerate(items) for c in claims_of(pf, o.families(pf), n)]
    out = []
    for a, b in find_conflicts(claims):
        if (items[a.owner][0] is fwd) == (items[b.owner][0] is fwd):
            continue  # not between this forward and another
        theirs, mine = (a, b) if items[b.owner][0] is fwd else (b, a)
        other, pf = items[theirs.owner]
        out.append(f"{fwd.where.file}: {items[mine.owner][1].where.path}: refused: host"
                   f" port(s) {mine.first}-{mine.last}/{mine.proto} are claimed by"
                   f" {other.where.file} {pf.where.path} for {other.label}, which wins")
    return list(dict.fromkeys(out))
