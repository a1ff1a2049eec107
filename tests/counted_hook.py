"""Run portfwd's qemu hook as libvirt does, counting what it does to the host: every
call into the nftables bindings (a transaction or a listing), every subprocess, and
every write under the run directory (Python's audit events). The counts go to the
JSON file named by $COUNTS_OUT; the exit code is the hook's.

Usage: python counted_hook.py GUEST OP SUBOP EXTRA < domain.xml
"""

from __future__ import annotations

import json
import os
import sys
from typing import Any, Dict, List, Tuple

COUNTS: Dict[str, List[Any]] = {"transactions": [], "reads": [], "subprocesses": [],
                                "writes": [], "removals": []}
RUN_DIR = os.environ["PORTFWD_RUNDIR"].rstrip("/") + "/"
WRITE_FLAGS = os.O_WRONLY | os.O_RDWR


def audit(event: str, args: Tuple[Any, ...]) -> None:
    if event == "os.rename" or event == "os.replace":  # write_atomic's one rename
        if str(args[1]).startswith(RUN_DIR):
            COUNTS["writes"].append(str(args[1])[len(RUN_DIR):])
    elif event == "open" and isinstance(args[0], str) and args[0].startswith(RUN_DIR):
        path = args[0][len(RUN_DIR):]
        # a file written in place (not a temporary file renamed after, not the lock)
        if args[2] & WRITE_FLAGS and ".tmp." not in path and path != "lock":
            COUNTS["writes"].append(path)
    elif event == "os.remove" and str(args[0]).startswith(RUN_DIR):
        COUNTS["removals"].append(str(args[0])[len(RUN_DIR):])
    elif event == "subprocess.Popen":
        COUNTS["subprocesses"].append(str(args[1]))


def count_nftables() -> None:
    """Wrap the bindings' two entry points (json_cmd calls cmd: counted once)."""
    import nftables

    real_json, real_cmd = nftables.Nftables.json_cmd, nftables.Nftables.cmd
    depth: List[int] = []

    def classify(verbs: List[str]) -> None:
        kind = "reads" if verbs and all(v == "list" for v in verbs) else "transactions"
        COUNTS[kind].append(verbs)

    def json_cmd(self: Any, data: Dict[str, Any]) -> Any:
        classify([next(iter(c)) for c in data.get("nftables", [])])
        depth.append(1)
        try:
            return real_json(self, data)
        finally:
            depth.pop()

    def cmd(self: Any, text: str) -> Any:
        if not depth:
            classify(["list"] if text.lstrip().startswith("list") else ["text"])
        return real_cmd(self, text)

    nftables.Nftables.json_cmd = json_cmd
    nftables.Nftables.cmd = cmd


def main() -> int:
    count_nftables()
    sys.addaudithook(audit)
    from portfwd.hook import main as hook

    code = hook("qemu", sys.argv[1:])
    with open(os.environ["COUNTS_OUT"], "w", encoding="utf-8") as f:
        json.dump(COUNTS, f)
    return code


if __name__ == "__main__":
    sys.exit(main())
