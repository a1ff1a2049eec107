"""A libvirt hook call as the hooks' Python part receives it, and its hand-over
to ``portfwd daemon``: which calls may change something (the phases), reading
the call (the domain XML on stdin; stdout pointed at stderr), asking the daemon
(``hooksocket``), and ending the process with the daemon's answer.

Imports only os, sys, ``runpaths`` and ``hooksocket`` (os, stat and
``_socket``): a call the daemon answers imports nothing else of portfwd; the
hook's own run (``hook``, which imports state, the engine, nftables) only
follows when the daemon does not answer.
"""

# no ``from __future__ import annotations`` (0.1 ms): the hooks import this module
# before every call they hand over; the annotations that name typing are strings
import os
import sys

from portfwd import hooksocket, runpaths

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import List, Optional

APPLY = frozenset({"started", "reconnect", "restore", "attach", "migrate"})
REMOVE = frozenset({"stopped", "release"})
CHECK = frozenset({"prepare", "start"})  # strict: a bad config stops the start here
MAY_FAIL = frozenset({"prepare", "start", "started"})
# a network (re)start or update rebuilds libvirt's rules: put our accepts back
NETWORK_REASSERT = frozenset({"started", "updated", "port-created"})


def may_work(kind: str, args: "List[str]") -> bool:
    """Whether the call may change forwards or accepts (else it is cheap in the hook)."""
    if len(args) < 3:
        return False
    if kind == "network":
        return args[1] in NETWORK_REASSERT and args[2] == "begin"
    return kind == "qemu" and args[2] == ("end" if args[1] in REMOVE else "begin") and (
        args[1] in APPLY or args[1] in REMOVE)


def read_call() -> bytes:
    """The call's XML (libvirt writes all of it: read all of it); from then on stdout
    is stderr, so that nothing portfwd or a library prints reaches libvirt's stdout
    (for migrate and restore it is the domain XML)."""
    try:
        xml = sys.stdin.buffer.read()
    except (OSError, ValueError):
        xml = b""
    try:
        os.dup2(2, 1)
    except OSError:  # no stderr either
        os.dup2(os.open(os.devnull, os.O_WRONLY), 1)
    return xml


def handed_over(kind: str, args: "List[str]", xml: bytes) -> "Optional[int]":
    """The exit status of the call as ``portfwd daemon`` ran it, its stderr lines
    written here; None: this process runs it (a call that changes nothing, no daemon,
    or any doubt: ``hooksocket.ask``)."""
    if not may_work(kind, args):
        return None
    try:
        said = hooksocket.ask(runpaths.run_dir(), runpaths.config_path(), kind, args, xml)
    except Exception:  # a bug here must not lose the call: the hook runs it itself
        return None
    if said is None:
        return None
    try:
        os.write(2, said[1])
    except OSError:
        pass
    return said[0]


def handover(kind: str, args: "List[str]") -> bytes:
    """The hooks' entry: the call's XML when this process must run the call itself
    (``hook.exit_now``); a call the daemon ran ends the process here, with its status."""
    xml = read_call()
    status = handed_over(kind, args, xml)
    if status is not None:
        os._exit(status)  # nothing is buffered: the answer went out with os.write
    return xml
