"""Constants shared across portfwd's layers. A leaf: it imports nothing, of ours
or of the standard library, so every module (the hook's fast path included) may
import it at no cost."""

DEFAULT_TABLE = "portfwd"
PROTOCOLS = ("tcp", "udp", "sctp")

# the table's layout (rules.skeleton)
LAYOUT = "7"  # bump whenever rules.skeleton() changes: tables made by another layout get rebuilt
UNMARKED_LAYOUT = "3"  # the last layout whose tables carried no marker (see TABLE_MARK)
HAIRPIN_SET = "hairpin"
# the chain and comment of the rule dropping outside packets to 127.0.0.0/8 (``guard``)
GUARD_CHAIN = "raw_prerouting"
GUARD_COMMENT = "portfwd: loopback addresses are not reachable from outside"
# an empty set carrying TABLE_COMMENT (layout 5 on): nftables lists one set without
# fetching the maps' elements, a table's own comment only with all of them
MARKER_SET = "managed_by_portfwd"
KINDS = ("src", "fwd", "any")  # lookup order in the chain
PRIORITY = -105  # just before dstnat (-100): our DNAT binds first
MARK = 0x01000000  # conntrack mark bit on every connection portfwd DNATs (see compat.py)
HAIRPIN_MARK = 0x02000000  # … and on those leaving by the bridge they came from (masqueraded)
COMMENT_MAX = 120  # bytes of an element's comment
# every table portfwd creates carries this comment; it never changes or deletes one without it
TABLE_MARK = "portfwd:"
TABLE_COMMENT = TABLE_MARK + " managed by portfwd (forward.toml); changes here are overwritten"

# where the address of a forward without ipv4/ipv6 may be found ([options] discover)
DISCOVER_SOURCES = ("reservation", "lease", "agent", "arp")
DEFAULT_DISCOVER = ("reservation", "lease")
