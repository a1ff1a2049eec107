"""``portfwd add --domain`` / ``remove --domain``: a guest's forwards written into its
own ``<metadata>`` (see ``domainforwards``) through libvirt's
``virDomainSetMetadata``, from the command line only (never from a hook).

The element is replaced whole: ``<forwards>`` with one ``<forward>`` per forward,
stored by libvirt under the prefix ``pf`` and the namespace ``FORWARDS_NS``; on a
running persistent guest in its live and its persistent definition, else in the
one it has. An added forward is validated against forward.toml as the hook will
validate it (``domainforwards.forwards``) before libvirt is asked to store it.
"""

from __future__ import annotations

from typing import Any, Dict, List, Optional, Sequence, Tuple
from xml.sax.saxutils import quoteattr

from portfwd.config import portspec
from portfwd.config import load
from portfwd.config.configedit import matches, parse_spec
from portfwd.libvirt.domainforwards import forwards, label
from portfwd.libvirt.domainxml import FORWARDS_NS
from portfwd.errors import ConfigError, HostError
from portfwd.libvirt.libvirtapi import bindings, connect

KEY = "pf"


def edit(uri: str, config_path: str, name: str, add: Optional[Dict[str, str]],
         specs: Sequence[str]) -> List[str]:
    """Add the forward ``add`` (attributes), or remove the forwards (``specs``: only
    those ports) of domain ``name``; the lines saying what changed."""
    libvirt = bindings()
    config = load(config_path)
    if not config.options.domain_forwards:
        raise ConfigError([f"{config_path}: [options] domain_forwards is not true, so portfwd"
                           " reads no forwards from domains; set domain_forwards = true and"
                           " domain_ports there first; nothing changed"])
    conn = connect(uri, read_only=False)
    try:
        try:
            dom = conn.lookupByName(name)
        except libvirt.libvirtError as e:
            raise HostError(f"guest {name}: {e.get_error_message()}") from None
        flags = _flags(libvirt, dom)
        elements = _current(libvirt, dom, flags)
        if add is not None:
            elements, said = _added(elements, add, name, dom.UUIDString().lower(), config)
        else:
            elements, said = _removed(elements, name, specs)
        try:
            dom.setMetadata(libvirt.VIR_DOMAIN_METADATA_ELEMENT,
                            render(elements) if elements else None,
                            KEY if elements else None, FORWARDS_NS, flags)
        except libvirt.libvirtError as e:
            raise HostError(f"guest {name}: libvirt did not store the metadata:"
                            f" {e.get_error_message()}; nothing changed") from None
    finally:
        conn.close()
    return said


def render(elements: Sequence[Dict[str, str]]) -> str:
    """The ``<forwards>`` element libvirt stores."""
    inner = "".join("<forward" + "".join(f" {k}={quoteattr(v)}" for k, v in e.items()) + "/>"
                    for e in elements)
    return f"<forwards>{inner}</forwards>"


def attributes(ports: Sequence[str], protos: Sequence[str], ipv4: Optional[str],
               ipv6: Optional[str], sources: Sequence[str], listen: Sequence[str]
               ) -> Dict[str, str]:
    """The ``<forward>`` attributes of what ``add --domain`` was given."""
    out = {"ports": " ".join(portspec.with_protos(ports, protos))}
    for key, value in (("ipv4", ipv4), ("ipv6", ipv6), ("from", " ".join(sources)),
                       ("listen", " ".join(listen))):
        if value:
            out[key] = value
    return out


def _flags(libvirt: Any, dom: Any) -> int:
    if dom.isActive() and dom.isPersistent():
        return int(libvirt.VIR_DOMAIN_AFFECT_LIVE | libvirt.VIR_DOMAIN_AFFECT_CONFIG)
    if dom.isActive():
        return int(libvirt.VIR_DOMAIN_AFFECT_LIVE)  # transient: it has no other definition
    return int(libvirt.VIR_DOMAIN_AFFECT_CONFIG)


def _current(libvirt: Any, dom: Any, flags: int) -> List[Dict[str, str]]:
    """The ``<forward>`` elements the domain holds now (live if it runs)."""
    from xml.etree import ElementTree

    which = flags & libvirt.VIR_DOMAIN_AFFECT_LIVE or libvirt.VIR_DOMAIN_AFFECT_CONFIG
    try:
        text = dom.metadata(libvirt.VIR_DOMAIN_METADATA_ELEMENT, FORWARDS_NS, which)
    except libvirt.libvirtError as e:
        if e.get_error_code() == libvirt.VIR_ERR_NO_DOMAIN_METADATA:
            return []
        raise HostError(f"guest {dom.name()}: {e.get_error_message()}") from None
    try:
        root = ElementTree.fromstring(text)
    except ElementTree.ParseError:
        return []
    return [dict(e.attrib) for e in root if e.tag.rpartition("}")[2] == "forward"]


def _added(elements: List[Dict[str, str]], new: Dict[str, str], name: str, uuid: str,
           config: Any) -> Tuple[List[Dict[str, str]], List[str]]:
    result = elements + [new]
    where = f"{label(name)}: forward[{len(elements)}]"
    refused = [line for line in forwards(result, name, uuid, config)[1]
               if line.startswith(where + ":") or line.startswith(where + ".")]
    if refused:
        raise ConfigError(refused + [f"{label(name)}: not changed"])
    return result, [f"{where}: added: ports {new['ports']}"]


def _removed(elements: List[Dict[str, str]], name: str, specs: Sequence[str]
             ) -> Tuple[List[Dict[str, str]], List[str]]:
    if not elements:
        raise ConfigError([f"{label(name)}: holds no forwards; nothing changed"])
    if not specs:
        return [], [f"{label(name)}: removed every forward ({len(elements)})"]
    where = label(name)

    def hit(port: str, spec: str) -> bool:
        return matches(port, parse_spec(spec, where), ":" in spec.partition("/")[0])

    every = [p for e in elements for p in e.get("ports", "").split()]
    missing = [s for s in specs if not any(hit(p, s) for p in every)]
    if missing:
        raise ConfigError([f"{where}: forwards no port {' '.join(missing)}; it forwards"
                           f" {' '.join(every) or 'nothing'}; nothing changed"])
    out: List[Dict[str, str]] = []
    said: List[str] = []
    for i, element in enumerate(elements):
        ports = element.get("ports", "").split()
        keep = [p for p in ports if not any(hit(p, s) for s in specs)]
        if len(keep) == len(ports):
            out.append(element)
        elif keep:
            out.append(dict(element, ports=" ".join(keep)))
            said.append(f"{where}: forward[{i}]: removed ports"
                        f" {' '.join(p for p in ports if p not in keep)}")
        else:
            said.append(f"{where}: forward[{i}]: removed")
    return out, said
