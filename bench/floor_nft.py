"""Floor for the hook: start Python, import nftables, run one JSON transaction.

Usage: floor_nft.py N TABLE

The transaction adds table ``inet TABLE`` with the two maps portfwd uses for
forwards on every address (``inet_proto . inet_service : ipv4_addr`` and
``... : inet_service``) and N elements into each, with a comment of the
length portfwd writes: the same elements a guest start with N forwards adds.
Deliberately standalone (no portfwd import): it is the cost of the bare work.
"""

import sys
from typing import Any, Dict, List


def batch(count: int, table: str) -> Dict[str, Any]:
    """The JSON batch: table, two maps, ``count`` elements in each."""
    key_type = ["inet_proto", "inet_service"]
    cmds: List[Dict[str, Any]] = [{"add": {"table": {"family": "inet", "name": table}}}]
    ips: List[Any] = []
    ports: List[Any] = []
    for i in range(count):
        key = {"concat": ["tcp", 40001 + i]}
        comment = f"floor forward[0].ports[{i}] {40001 + i}:80/tcp"
        ips.append([{"elem": {"val": key, "comment": comment}}, "192.168.150.10"])
        ports.append([{"elem": {"val": key, "comment": comment}}, 80])
    for name, value_type, elems in (("any4_ip", "ipv4_addr", ips), ("any4_port", "inet_service", ports)):
        cmds.append({"add": {"map": {"family": "inet", "table": table, "name": name,
                                     "type": key_type, "map": value_type}}})
        cmds.append({"add": {"element": {"family": "inet", "table": table, "name": name,
                                         "elem": elems}}})
    return {"nftables": cmds}


def main() -> int:
    import nftables

    count, table = int(sys.argv[1]), sys.argv[2]
    nft = nftables.Nftables()
    nft.set_json_output(True)
    rc, _, err = nft.json_cmd(batch(count, table))
    if rc != 0:
        sys.stderr.write(f"floor_nft: nftables refused the batch: {err}\n")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
