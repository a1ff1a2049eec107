"""Whether portfwd's 127.0.0.0/8 guard is in the kernel: one netlink dump.

``route_localnet`` (forwards from 127.0.0.1) lets the kernel route packets to
127.0.0.0/8 that arrive on a bridge; the drop rule in chain ``raw_prerouting``
of portfwd's table (``rules.skeleton``) is what keeps them out. The table can
vanish behind portfwd's back (an ``nft -f`` file that starts with ``flush
ruleset``), so the daemon asks every few hundred milliseconds.

Asked with one NFT_MSG_GETRULE dump of that chain alone: the kernel sends its
rule and nothing else. nftables' own listing of a chain (``list chain``) fetches
every element of the table's maps first: 120 ms beside 10,000 forwards, this
under one. Cheap to import (``socket`` and ``struct`` only).
"""

from __future__ import annotations

from portfwd.constants import GUARD_CHAIN, GUARD_COMMENT

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Dict, Iterator, List, Tuple

NETLINK_NETFILTER = 12
NFPROTO_INET = 1
NFT_MSG_NEWRULE, NFT_MSG_GETRULE = 6, 7
NFNL_SUBSYS_NFTABLES = 10
NLM_F_REQUEST, NLM_F_DUMP = 0x1, 0x300
NLMSG_ERROR, NLMSG_DONE = 2, 3
NLA_TYPE_MASK = 0x3FFF  # without NLA_F_NESTED and NLA_F_NET_BYTEORDER
# attributes (linux/netfilter/nf_tables.h)
NFTA_RULE_TABLE, NFTA_RULE_CHAIN, NFTA_RULE_EXPRESSIONS, NFTA_RULE_USERDATA = 1, 2, 4, 7
NFTA_LIST_ELEM = 1
NFTA_EXPR_NAME, NFTA_EXPR_DATA = 1, 2
NFTA_IMMEDIATE_DATA = 2
NFTA_DATA_VERDICT = 2
NFTA_VERDICT_CODE = 1
NF_DROP = 0
NFTNL_UDATA_RULE_COMMENT = 0  # libnftnl's tag of a rule's comment in its user data


def present(table: str) -> bool:
    """Whether chain ``raw_prerouting`` of ``inet TABLE`` holds portfwd's drop rule
    for 127.0.0.0/8 (False too when the table or the chain is gone). OSError when
    netlink cannot be asked at all."""
    return any(is_guard(attrs) for attrs in _dump_rules(table, GUARD_CHAIN))


def is_guard(rule: Dict[int, bytes]) -> bool:
    """A rule (its netlink attributes) carrying the guard's comment and ending in drop."""
    if comment(rule.get(NFTA_RULE_USERDATA, b"")) != GUARD_COMMENT:
        return False
    exprs = [_attrs(elem) for kind, elem in _each(rule.get(NFTA_RULE_EXPRESSIONS, b""))
             if kind == NFTA_LIST_ELEM]
    if not exprs or exprs[-1].get(NFTA_EXPR_NAME, b"").rstrip(b"\0") != b"immediate":
        return False
    data = _attrs(_attrs(exprs[-1].get(NFTA_EXPR_DATA, b"")).get(NFTA_IMMEDIATE_DATA, b""))
    code = _attrs(data.get(NFTA_DATA_VERDICT, b"")).get(NFTA_VERDICT_CODE, b"")
    return len(code) == 4 and int.from_bytes(code, "big", signed=True) == NF_DROP


def comment(userdata: bytes) -> str:
    """The comment in a rule's user data (libnftnl's type-length-value records)."""
    pos = 0
    while pos + 2 <= len(userdata):
        kind, length = userdata[pos], userdata[pos + 1]
        if kind == NFTNL_UDATA_RULE_COMMENT:
            return userdata[pos + 2:pos + 2 + length].rstrip(b"\0").decode("utf-8", "replace")
        pos += 2 + length
    return ""


def _each(data: bytes) -> Iterator[Tuple[int, bytes]]:
    """(type, payload) of each netlink attribute in ``data``."""
    import struct

    pos = 0
    while pos + 4 <= len(data):
        length, kind = struct.unpack_from("=HH", data, pos)
        if length < 4:
            return
        yield kind & NLA_TYPE_MASK, data[pos + 4:pos + length]
        pos += (length + 3) & ~3


def _attrs(data: bytes) -> Dict[int, bytes]:
    return dict(_each(data))


def _attr(kind: int, value: bytes) -> bytes:
    import struct

    body = struct.pack("=HH", 4 + len(value), kind) + value
    return body + b"\0" * (-len(body) % 4)


def _dump_rules(table: str, chain: str) -> List[Dict[int, bytes]]:
    """The attributes of every rule of chain ``CHAIN`` in ``inet TABLE`` (a dump the
    kernel filters by table and chain; none when either does not exist)."""
    import socket
    import struct

    kind = (NFNL_SUBSYS_NFTABLES << 8) | NFT_MSG_GETRULE
    body = (struct.pack("=BBH", NFPROTO_INET, 0, 0)  # nfgenmsg: family, version, res_id
            + _attr(NFTA_RULE_TABLE, table.encode() + b"\0")
            + _attr(NFTA_RULE_CHAIN, chain.encode() + b"\0"))
    sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC,
                         NETLINK_NETFILTER)
    rules: List[Dict[int, bytes]] = []
    try:
        sock.settimeout(5.0)  # the kernel answers at once; never wait forever
        sock.send(struct.pack("=LHHLL", 16 + len(body), kind, NLM_F_REQUEST | NLM_F_DUMP, 1, 0)
                  + body)
        while True:
            data = sock.recv(1 << 16)
            offset = 0
            while offset + 16 <= len(data):
                length, msg = struct.unpack_from("=LH", data, offset)
                if length < 16 or msg == NLMSG_DONE:
                    return rules
                if msg == NLMSG_ERROR:
                    error = -struct.unpack_from("=i", data, offset + 16)[0]
                    if error in (0, 2):  # none, ENOENT: no such table or chain
                        return rules
                    raise OSError(error, f"netlink rule dump of inet {table} {chain}")
                if msg == (NFNL_SUBSYS_NFTABLES << 8) | NFT_MSG_NEWRULE:
                    rules.append(_attrs(data[offset + 20:offset + length]))
                offset += (length + 3) & ~3
    except socket.timeout:
        raise OSError(f"netlink rule dump of inet {table} {chain}: no answer") from None
    finally:
        sock.close()
