"""libvirt's qemu and network hooks: argv + XML on stdin → the engine.

Never calls libvirt (libvirt waits for us: deadlock), never writes to stdout
(for migrate/restore stdout is the domain XML), and exits non-zero only when
``strict = true`` asks a failed start to stop the guest, with ``STRICT_FAILURE``
(the hook's sh lines turn that status alone into libvirt's failure): whatever goes
wrong otherwise, also a bug, ends in a message and exit 0. Never waits more than
LOCK_WAIT seconds for a lock that one other portfwd run keeps. A guest with no
forwards and no state leaves before anything heavy is imported; once the hook
index is current (``hookindex``), the hook's sh lines answer it without Python.
A call that may change something goes to ``portfwd daemon`` when it runs
(``hookcall``, before this module is imported), which answers it with ``answer``:
the same ``run``. ``exit_now`` (the hooks' own run, when the daemon did not answer)
ends the process as soon as the records are written and the lock released,
leaving the release of the nftables socket to a child.
"""

from __future__ import annotations

import os
import sys

from portfwd import hookcall, hookindex
from portfwd.rundir import state
from portfwd.libvirt.domainxml import FORWARDS_MARK, domain_uuid
from portfwd.hookcall import APPLY, CHECK, MAY_FAIL, NETWORK_REASSERT, REMOVE

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import List, Optional, Tuple

    from portfwd.host.nft import NftLike

# seconds a hook waits while one other process (sync, the daemon, a hung run) holds the
# lock; libvirt is blocked meanwhile, and the daemon or the next sync catches up
LOCK_WAIT = 5.0
# the exit status asking the hook's sh lines to fail a start (they exit 1 then): not 1,
# which an interpreter that dies at start-up exits with, nor 2 (Python's usage error)
STRICT_FAILURE = 3


def exit_now(kind: str, args: List[str], xml: bytes) -> None:
    """``run`` of a call ``hookcall.handover`` has read and not handed over, then the
    process ends at once: libvirt waits for it and for its output, not for the kernel
    to release the nftables socket it used. After a batch that deleted elements that
    release takes 5-11 ms (an RCU grace period); a child that holds the socket, with
    stdin, stdout and stderr on /dev/null and no lock, waits until this process has
    exited and then releases it."""
    keep: List[object] = []
    code = run(kind, args, xml, keep=keep)
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    if keep:
        try:
            r, w = os.pipe()
            pid = os.fork()
        except OSError:
            pid = -1
        if pid == 0:  # the child: never returns into Python's shutdown
            try:
                os.close(w)
                null = os.open(os.devnull, os.O_RDWR)
                for fd in (0, 1, 2):
                    os.dup2(null, fd)
                os.read(r, 1)  # end of file once the parent has exited
            finally:
                os._exit(0)
    os._exit(code)


def main(kind: str = "qemu", argv: Optional[List[str]] = None) -> int:
    """One hook call in this process (the hooks run ``hookcall.handover`` and
    ``exit_now`` instead): handed to the daemon when it runs, else ``run``."""
    args = sys.argv[1:] if argv is None else argv
    xml = hookcall.read_call()
    status = hookcall.handed_over(kind, args, xml)
    return run(kind, args, xml) if status is None else status


def answer(kind: str, args: List[str], xml: bytes, nft: Optional[NftLike] = None
           ) -> Tuple[int, str]:
    """``run`` for a hook that handed its call over (``portfwd daemon``, with its
    nftables context ``nft``): the exit status and what the hook would have written
    to stderr."""
    from portfwd import log

    lines = log.capture()
    try:
        status = run(kind, args, xml, nft)
    finally:
        log.end_capture()
    return status, "".join(lines)


def run(kind: str, args: List[str], xml: bytes, nft: Optional[NftLike] = None,
        keep: Optional[List[object]] = None) -> int:
    """The hook call: its exit status (only STRICT_FAILURE fails anything)."""
    what = f"{'network' if kind == 'network' else 'guest'} {' '.join(args[:2])}"
    try:
        if kind == "network":
            return network_hook(args, nft)
        if kind != "qemu":
            return 0
        return qemu_hook(args, xml, nft, keep)
    except state.LockTimeout as e:
        holder = f" (pid {e.holder})" if e.holder else ""
        _report(f"{what}: lock held by another portfwd run{holder} for {e.waited:g} s;"
                " the daemon or the next `portfwd sync` will apply it", error=False)
        return 0
    except BaseException as e:  # a bug must not stop or kill a guest unless strict asks
        _report(f"{what}: internal error {type(e).__name__}: {e}")
        if (kind == "qemu" and len(args) > 1 and args[1] in MAY_FAIL
                and _strict_despite_error(state.config_path())):
            return STRICT_FAILURE
        return 0


def qemu_hook(args: List[str], xml: bytes, nft: Optional[NftLike] = None,
              keep: Optional[List[object]] = None) -> int:
    """``GUEST OP SUBOP EXTRA``: apply, remove or check the guest's forwards."""
    if len(args) < 2:
        return 0
    name, op = args[0], args[1]
    sub = args[2] if len(args) > 2 else "-"
    if sub != ("end" if op in REMOVE else "begin"):
        return 0
    if op not in APPLY and op not in REMOVE and op not in CHECK:
        return 0
    config = state.config_path()
    uuid = domain_uuid(xml)
    try:
        with state.locked(timeout=LOCK_WAIT):
            known = state.has_guest_state(name)
            if op in REMOVE and not known:
                return 0
            if op not in REMOVE and state.cached_signature() == state.config_signature(config):
                if op in CHECK or (not known and not state.cached_guest_files(name, uuid) and not (
                        FORWARDS_MARK in xml and state.cached_domain_forwards())):
                    # CHECK: the cached configuration is valid; else: nothing for this guest
                    hookindex.refresh(state.run_dir(), config)  # so that sh answers next time
                    return 0
            return _run(name, uuid, op, config, xml, nft, keep)
    except OSError as e:  # the run directory itself is unusable
        _report(f"guest {name} {op}: {e}")
        return 0


def network_hook(args: List[str], nft: Optional[NftLike] = None) -> int:
    """``NET started|updated|port-created begin -``: re-assert portfwd's accepts in
    libvirt's chains, which libvirt has just rebuilt. Never fails the network."""
    if len(args) < 3 or args[1] not in NETWORK_REASSERT or args[2] != "begin":
        return 0
    try:
        with state.locked(timeout=LOCK_WAIT):
            if not state.has_forwards():
                return 0
            from portfwd.engine import bridgeupkeep
            from portfwd import log
            from portfwd.engine import Engine

            log.use_syslog()
            try:
                engine = Engine(state.config_path(), nft=nft)
                # a (re)started or updated network may have a new bridge: ask the routes
                # again; a new port (every guest start) changes no bridge
                bridgeupkeep.ensure_compat(engine, bridgeupkeep.wanted_bridges(
                    engine, recompute=args[1] != "port-created"))
            except Exception as e:  # the network must come up whatever happens here
                log.error(f"network {args[0]} {args[1]}: {type(e).__name__}: {e}")
    except OSError as e:
        _report(f"network {args[0]} {args[1]}: {e}")
    return 0


def _report(message: str, error: bool = True) -> None:
    """One line on stderr (and in syslog), whatever state the process is in."""
    line = message.replace("\r", " ").replace("\n", " ")
    try:
        from portfwd import log

        try:
            log.use_syslog()
        except Exception:
            pass
        (log.error if error else log.warning)(line)
    except BaseException:
        pass


def _run(name: str, uuid: Optional[str], op: str, config_path: str, xml: bytes,
         nft: Optional[NftLike] = None, keep: Optional[List[object]] = None) -> int:
    """The managed path: plan and apply; decide the exit code (``keep``: see ``exit_now``)."""
    from portfwd.engine import guestpass
    from portfwd import log
    from portfwd.engine import Engine
    from portfwd.errors import ConfigError, PortfwdError

    log.use_syslog()
    engine = Engine(config_path, nft=nft)
    if keep is not None:
        keep.append(engine)
    strict = False
    try:
        if op in REMOVE:
            count = guestpass.remove_guest(engine, name)
            log.info(f"guest {name} {op}: removed {count} forward(s)")
            return 0
        had_state = state.has_guest_state(name)
        config = engine.guest_config(name, uuid)
        strict = config.strict
        templates = config.templates
        if FORWARDS_MARK in xml and state.cached_domain_forwards():
            from portfwd.libvirt.domainforwards import hook_templates

            templates = templates + hook_templates(xml, name, uuid, config_path,
                                                   engine.all_states())
        if op in CHECK:
            return 0
        from portfwd.plan import bind
        from portfwd.values import Selector

        planned = bind(templates, name)
        resolver = None
        if any(isinstance(b.target, Selector) for b in planned):  # addresses to discover
            from portfwd.libvirt.discover import Resolver

            resolver = Resolver(name, xml)
        from portfwd.libvirt.domainxml import taps

        applied = guestpass.apply_guest(engine, name, uuid, config, planned, resolver,
                                        taps(xml), look=op == "reconnect")
        if not applied.empty or had_state:
            waiting = f", {len(applied.pending)} waiting for an address" if applied.pending else ""
            log.info(f"guest {name} {op}: {len(applied.bindings)} forward(s) in table inet"
                     f" {config.table}{waiting}")
        for _, why in applied.pending[:1]:
            log.info(f"guest {name}: pending: {why}")
        return 0
    except ConfigError as e:
        strict = _strict_despite_error(config_path)
        for line in e.lines:
            log.error(line)
        log.error(f"guest {name} {op}: configuration invalid; rules left as they were")
    except PortfwdError as e:
        log.error(f"guest {name} {op}: {e}")
    except Exception as e:  # a bug must not take a guest down unless strict
        log.error(f"guest {name} {op}: internal error {type(e).__name__}: {e}")
    if strict and op in MAY_FAIL:
        log.error(f"guest {name} {op}: strict = true: failing the start")
        return STRICT_FAILURE
    return 0


def _strict_despite_error(path: str) -> bool:
    """``strict`` as the broken file still says it (if portfwd may trust that file: a
    FIFO or a file others can write is not even opened), else as last compiled."""
    try:
        from portfwd.config import strict_setting

        value = strict_setting(path)
        if value is not None:
            return value
    except Exception:
        pass
    try:
        from portfwd.rundir import run_compiled

        return run_compiled.strict()
    except Exception:
        return False
