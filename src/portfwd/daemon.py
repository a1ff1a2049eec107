"""``portfwd daemon``: the same engine, driven by events instead of hook calls.

It reconciles (a ``sync``) whenever something that decides the forwards
changes: a libvirt lifecycle event, a (re)connection to libvirtd, a change to
libvirt's dnsmasq lease files, a valid edit of forward.toml, or, while
discovered addresses wait for evidence that they are their NIC's, that evidence
appearing (``evidence.Recheck``). An invalid edit is logged with its location and changes nothing. SIGHUP (``systemctl reload``)
reconciles at once. It shares the hook's lock, so the two never interleave; the
hook keeps working without it.

Bounded: a reconcile whose forwards equal the recorded ones sends nftables
nothing; a lease change reconciles at most once per ``interval`` (and no sooner
after a reconcile than that reconcile took), so a guest churning its DHCP lease
cannot keep the host rebuilding; each reconcile runs in a child that is killed
after RECONCILE_LIMIT seconds. Between reconciles, every turn of the loop
checks that portfwd's tables and their drop rule for outside packets to
127.0.0.0/8 are in the kernel (``guard``), rebuilds them from the records when
they are gone, and turns ``route_localnet`` off when it cannot.

The loop is a list of duties (``duties``), each run once per turn.

Hook calls: a thread answers the calls the hooks hand over on RUN_DIR/hook.sock
(``hooksocket``) with ``hook.answer``, one at a time, with one nftables context
kept for them; no fork happens meanwhile (``FORK_LOCK``).

A little over ~450 lines: its loop, its duties between reconciles (the guard,
the evidence rechecks, the rate limit) and the hooks' socket share the one state
of a running daemon.
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import threading
import time
from typing import Any, Callable, Dict, List, Optional, Tuple

from portfwd.engine import bridgeupkeep, wholehost
from portfwd import hook, hooksocket, log
from portfwd.host import hostnet
from portfwd.libvirt import libvirtapi
from portfwd.rundir import run_host, state
from portfwd.libvirt.discover import LEASE_DIR, Resolver
from portfwd.libvirt.domainxml import status_files_tell
from portfwd.engine import Engine
from portfwd.errors import ConfigError, HostError
from portfwd.host.evidence import Recheck
from portfwd.config.model import Config, Guest
from portfwd.host.nft import Nft

RECONCILE_LIMIT = 120.0  # seconds a reconcile or repair may run before its child is killed
LOCK_WAIT = 30.0  # seconds the daemon waits for portfwd's lock while one other run holds it
GUARD_PERIOD = 1.0  # seconds between two looks at the tables, at most
REPAIR_RETRY = 10.0  # seconds before a failed rebuild of a vanished table is tried again
SETTLE = 0.1  # seconds a burst of events or file writes gets to settle before a reconcile


def lease_signature(lease_dir: str = LEASE_DIR) -> Tuple[Tuple[str, int, int], ...]:
    """Changes whenever dnsmasq (through libvirt's helper) rewrites a lease file."""
    out = []
    try:
        names = sorted(os.listdir(lease_dir))
    except OSError:
        return ()
    for name in names:
        if name.endswith(".status"):
            try:
                st = os.stat(os.path.join(lease_dir, name))
            except OSError:
                continue
            out.append((name, st.st_mtime_ns, st.st_size))
    return tuple(out)


class Daemon:
    def __init__(self, config_path: str, uri: str, interval: float = 0.5) -> None:
        self.engine = Engine(config_path)
        self.uri = uri
        self.interval = interval
        self.wake = threading.Event()  # set by libvirt events and signals
        self.stopping = False
        self.conn: Any = None
        self.libvirt = libvirtapi.bindings()
        self.seen: Optional[Tuple[Any, ...]] = None  # what the last reconcile looked at
        self.bad_config: Optional[str] = None  # signature of a config known to be invalid
        self.config: Optional[Tuple[str, Config]] = None  # (signature, the valid config read)
        self.full = True  # the next reconcile rebuilds whatever the records say (a repair)
        self.next_poll = 0.0  # monotonic time of the next look at config and lease files
        self.next_lease = 0.0  # … before which a lease change does not reconcile
        self.repair_at = 0.0  # … before which a vanished table is not rebuilt again
        self.limit = RECONCILE_LIMIT
        self.counts: Dict[str, int] = {"reconciles": 0, "rebuilds": 0, "repairs": 0}
        self.recheck = Recheck()  # addresses waiting for evidence, and when to look again
        # what one turn of the loop does, in order
        self.duties: List[Callable[[], None]] = [self.keep_guard, self.recheck_evidence,
                                                 self.follow_changes]
        self.listener: Optional[socket.socket] = None  # hook.sock (``serve_hooks``)
        self.listening: Optional[int] = None  # its inode, to remove only ours
        self.hook_nft: Optional[Nft] = None  # the hook calls' nftables context, kept warm

    # -- libvirt -----------------------------------------------------------
    def start_event_loop(self) -> None:
        self.libvirt.virEventRegisterDefaultImpl()

        def run() -> None:
            while True:
                self.libvirt.virEventRunDefaultImpl()

        threading.Thread(target=run, name="libvirt-events", daemon=True).start()

    def connect(self) -> bool:
        if self.conn is not None:
            try:
                if self.conn.isAlive():
                    return True
            except self.libvirt.libvirtError:
                pass
            self.conn = None
        try:
            conn = self.libvirt.open(self.uri)
        except self.libvirt.libvirtError as e:
            log.warning(f"libvirt at {self.uri} not reachable ({e.get_error_message()});"
                        " retrying")
            return False
        for event in (self.libvirt.VIR_DOMAIN_EVENT_ID_LIFECYCLE,
                      self.libvirt.VIR_DOMAIN_EVENT_ID_METADATA_CHANGE):  # <pf:forwards>
            conn.domainEventRegisterAny(None, event, lambda *_: self.wake.set(), None)
        conn.registerCloseCallback(lambda *_: self.wake.set(), None)
        self.conn = conn
        self.seen = None  # everything may have changed while we were away
        self.full = True  # a restarted libvirtd has rebuilt its chains without our accepts
        log.info(f"connected to libvirt at {self.uri}")
        return True

    # -- the loop ----------------------------------------------------------
    def run(self) -> int:
        self.start_event_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._stop)
        signal.signal(signal.SIGHUP, self._reload)
        self.serve_hooks()
        try:
            return self._loop()
        finally:
            self.stop_serving()

    def _loop(self) -> int:
        while not self.stopping:
            connected = self.connect()
            try:
                for duty in self.duties:
                    duty()
            except (HostError, state.LockTimeout) as e:
                log.error(str(e))
                self.seen = None
                self.wake.wait(2.0)
                continue
            if connected:
                self.wake.wait(min(self.interval, GUARD_PERIOD))
            else:  # the tables are still looked at, every 2 s
                self.wake.wait(2.0)
                self.wake.clear()
        c = self.counts
        log.info(f"stopped after {c['reconciles']} reconcile(s), {c['rebuilds']} of them sent"
                 f" to nftables, and {c['repairs']} rebuild(s) of a vanished table")
        return 0

    # -- hook calls handed over (hooksocket) -----------------------------------
    def serve_hooks(self) -> None:
        """Answer the hooks' calls on RUN_DIR/hook.sock, in a thread of its own."""
        path = hooksocket.socket_path(self.engine.root)
        try:
            run_host.ensure_dir(self.engine.root)
            self.listener = hooksocket.listen(self.engine.root)
        except OSError as e:
            log.warning(f"{path}: {e}; the hooks do their work themselves")
            return
        if self.listener is None:
            log.warning(f"{path}: another daemon answers there, or {self.engine.root} is not"
                        " root's alone (mode 0700); the hooks do their work themselves")
            return
        self.listening = os.lstat(path).st_ino
        threading.Thread(target=self._answer_hooks, args=(self.listener,), name="hooks",
                         daemon=True).start()

    def _answer_hooks(self, listener: socket.socket) -> None:
        while not self.stopping:
            try:
                conn, _ = listener.accept()
            except OSError:
                if self.stopping or listener.fileno() < 0:
                    return
                time.sleep(0.1)
                continue
            with conn:
                request = hooksocket.read_request(conn)
                call = hooksocket.parse(request) if request is not None else None
                if call is None:
                    continue  # closed without an answer: the hook does the work itself
                status, text = self.hook_call(*call)
                try:
                    conn.sendall(hooksocket.answer(status, text))
                except OSError:
                    pass

    def hook_call(self, config: str, kind: str, args: List[str], xml: bytes) -> Tuple[int, str]:
        """What the hook would do, done here; DECLINED (before anything is done) for
        another configuration, or when a fork keeps FORK_LOCK longer than BUSY_WAIT."""
        if config != self.engine.config_path or state.config_path() != config:
            return hooksocket.DECLINED, ""
        if not FORK_LOCK.acquire(timeout=hooksocket.BUSY_WAIT):
            return hooksocket.DECLINED, ""
        try:
            if self.hook_nft is None:
                self.hook_nft = Nft()
            return hook.answer(kind, args, xml, self.hook_nft)
        except HostError as e:  # no nftables bindings: the hook says so itself
            log.warning(f"hook call {' '.join(args[:2])}: {e}")
            return hooksocket.DECLINED, ""
        finally:
            FORK_LOCK.release()

    def stop_serving(self) -> None:
        listener, self.listener = self.listener, None
        if listener is None:
            return
        path = hooksocket.socket_path(self.engine.root)
        try:
            mine = os.lstat(path).st_ino == self.listening
        except OSError:
            mine = False
        try:
            listener.shutdown(socket.SHUT_RDWR)  # wakes the thread in accept()
        except OSError:
            pass
        listener.close()
        if mine:
            try:
                os.unlink(path)
            except OSError:
                pass

    def follow_changes(self) -> None:
        """Reconcile at once when libvirt, SIGHUP or an edit of the configuration asks;
        on a change of the lease files, no sooner than ``next_lease``."""
        if self.conn is None:
            return
        now = time.monotonic()
        if not self.wake.is_set() and self.seen is not None and now < self.next_poll:
            return
        self.next_poll = now + self.interval
        looked = (state.config_signature(self.engine.config_path), lease_signature())
        urgent = self.wake.is_set() or self.seen is None or looked[0] != self.seen[0]
        if not urgent and (looked == self.seen or now < self.next_lease):
            return
        self.wake.clear()
        time.sleep(SETTLE)
        self.seen = (state.config_signature(self.engine.config_path), lease_signature())
        started = time.monotonic()
        try:
            self.reconcile()
        finally:
            took = time.monotonic() - started
            self.next_lease = started + max(self.interval, 2 * took)

    def reconcile(self) -> None:
        """Validate the configuration, then sync with the running guests."""
        signature = state.config_signature(self.engine.config_path)
        if signature == self.bad_config:
            return
        if self.config is None or self.config[0] != signature:  # else: a lease or guest change
            try:
                with self.locked():
                    self.config = (signature, self.engine.compile())
            except ConfigError as e:
                self.bad_config = signature
                for line in e.lines:
                    log.error(line)
                log.error("configuration invalid: forwards left as they were")
                return
        self.bad_config = None
        config = self.config[1]
        self.engine.forget_owned_tables()  # a table seen before may have been flushed away since
        # everything libvirt knows is asked now, never under the lock (see running_guests)
        guests, resolvers = libvirtapi.running_guests(self.conn, config)
        full, self.full = self.full, False
        self.counts["reconciles"] += 1
        try:
            said = in_child(lambda: self._sync(config, guests, resolvers, full), self.limit)
        except HostError:
            self.full = True
            raise
        if said == REBUILT:
            self.counts["rebuilds"] += 1
        self.recheck.arm(self.engine.store.awaiting())

    def recheck_evidence(self) -> None:
        """Reconcile when an address that waits for evidence now shows up as its NIC's."""
        proven = self.recheck.due()
        if proven:
            log.info(f"guest {proven[0]}: {proven[1]} shows up as NIC {proven[2]}'s: reconciling")
            self.seen = None

    def _sync(self, config: Config, guests: List[Guest], resolvers: Dict[str, Resolver],
              full: bool) -> str:
        with self.locked():
            synced = wholehost.sync(self.engine, config, guests, resolvers=resolvers,
                                    settle=status_files_tell(self.uri), rebuild=full)
        if not synced.rebuilt:
            return UNCHANGED
        bindings, pending = synced.applied, len(synced.pending)
        log.info(f"synced: {len(bindings)} forward(s) for {len({b.guest for b in bindings})}"
                 f" guest(s)" + (f", {pending} waiting for an address" if pending else ""))
        return REBUILT

    def keep_guard(self) -> None:
        """While guests have forwards, portfwd's tables and the drop rule for outside
        packets to 127.0.0.0/8 in each (what keeps route_localnet safe) are in the
        kernel. Gone (an ``nft -f`` that starts with ``flush ruleset``): route_localnet
        goes off at once where portfwd turned it on (no lock needed, and the forwards
        from 127.0.0.1 are gone with the table anyway), then the tables are rebuilt
        from the records, which turns it on again. When the rebuild fails, it stays
        off, recorded so, and the rebuild is tried again REPAIR_RETRY later."""
        missing = bridgeupkeep.unguarded(self.engine)
        if not missing or time.monotonic() < self.repair_at:
            return
        tables = ", ".join(f"table inet {t}" for t in missing)
        log.warning(f"{tables}: gone, or without the drop rule for outside packets to"
                    " 127.0.0.0/8; rebuilding from the records")
        bridges = self._localnet_off()
        try:
            in_child(self._reapply, self.limit, "rebuild")
        except (HostError, state.LockTimeout) as e:
            self.repair_at = time.monotonic() + REPAIR_RETRY
            log.error(f"{tables}: cannot rebuild ({e}); trying again in {REPAIR_RETRY:g} s")
            if bridges:
                log.warning(f"route_localnet turned off on {', '.join(bridges)} until the drop"
                            " rule is back (forwards from 127.0.0.1 stop meanwhile)")
            try:
                with self.locked():
                    bridgeupkeep.localnet_off(self.engine)  # records it (the sysctls are off already)
            except state.LockTimeout:
                pass  # the next run that finds the guard turns it on again; the record says so
            return
        self.counts["repairs"] += 1
        self.repair_at = 0.0

    def _reapply(self) -> str:
        with self.locked():
            self.engine.forget_owned_tables()
            bindings = wholehost.reapply(self.engine)
        log.info(f"rebuilt: {len(bindings)} forward(s) from the records")
        return REBUILT

    def _localnet_off(self) -> List[str]:
        """route_localnet off on the bridges where portfwd turned it on; those it was on."""
        off = []
        for bridge in self.engine.store.localnet():
            try:
                if hostnet.set_route_localnet(bridge, False):
                    off.append(bridge)
            except OSError as e:  # the bridge went meanwhile
                log.warning(f"route_localnet of {bridge}: {e}")
        return off

    def locked(self) -> state.locked:
        """portfwd's lock, waiting at most LOCK_WAIT for one other holder."""
        return state.locked(self.engine.root, timeout=LOCK_WAIT)

    def _reload(self, *_: Any) -> None:
        """SIGHUP (``systemctl reload portfwd``): read the configuration again and
        rebuild now, even if its file looks unchanged."""
        self.seen = None
        self.bad_config = None
        self.full = True
        self.wake.set()

    def _stop(self, *_: Any) -> None:
        self.stopping = True
        self.wake.set()


REBUILT, UNCHANGED = "rebuilt", "unchanged"  # what a child's work reports
# held by a hook call being answered (``Daemon.hook_call``), and around each fork: a
# child must not inherit the descriptor of portfwd's lock that a hook call holds (it
# would keep the lock, and wait for it itself)
FORK_LOCK = threading.Lock()


def in_child(work: Callable[[], str], limit: float, what: str = "reconcile") -> str:
    """Run ``work`` in a forked child and return what it returned; its HostError (or
    LockTimeout) is raised here as a HostError, and so is its running longer than
    ``limit`` seconds: it is then killed (SIGKILL: the kernel keeps the old
    transaction or the new one, and every record file is replaced whole).

    Building and parsing one transaction of 10,000 forwards takes some 90 MB that
    the C allocator keeps once freed: done in a child, it is given back when the
    child ends, and the daemon stays at what it needs between events. The child
    asks libvirt nothing (what it needs was asked before) and ends with ``_exit``.
    """
    import traceback

    read_end, write_end = os.pipe()
    with FORK_LOCK:
        pid = os.fork()
    if pid == 0:  # the child
        status = 0
        try:
            os.close(read_end)
            os.write(write_end, work().encode())
        except (HostError, state.LockTimeout) as e:
            os.write(write_end, str(e).encode())
            status = 1
        except BaseException:
            os.write(write_end, traceback.format_exc().encode())
            status = 2
        finally:
            os._exit(status)
    os.close(write_end)
    deadline = time.monotonic() + limit
    try:
        said, finished = _read_until(read_end, deadline)
    finally:
        os.close(read_end)
    # the child closed the pipe as it ended (a few seconds to exit); else: killed now
    code = _reap(pid, time.monotonic() + (5.0 if finished else 0.0))
    if not finished or code is None:
        raise HostError(f"the {what} (pid {pid}) did not finish within {limit:g} s:"
                        " killed; the next reconcile rebuilds the table")
    if code == 1:
        raise HostError(said)
    if code != 0:
        raise HostError(f"the {what} ended with {code}: {said or 'no message'}")
    return said


def _read_until(fd: int, deadline: float) -> Tuple[str, bool]:
    """Everything written to pipe ``fd`` until its writer closed it, and whether it
    did before ``deadline`` (monotonic)."""
    import select

    chunks: List[bytes] = []
    while True:
        left = deadline - time.monotonic()
        if left <= 0 or not select.select([fd], [], [], left)[0]:
            return b"".join(chunks).decode(errors="replace").strip(), False
        chunk = os.read(fd, 65536)
        if not chunk:
            return b"".join(chunks).decode(errors="replace").strip(), True
        chunks.append(chunk)


def _reap(pid: int, deadline: float) -> Optional[int]:
    """The exit code of child ``pid``, waited for until ``deadline``; past it, the
    child is killed and reaped, and None returned."""
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return os.waitstatus_to_exitcode(status)
        if time.monotonic() >= deadline:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            return None
        time.sleep(0.01)


def run(config_path: str, uri: str, interval: float = 0.5) -> int:
    log.use_syslog()
    return Daemon(config_path, uri, interval).run()


def cmd_daemon(args: argparse.Namespace) -> int:
    return run(state.config_path(args.config), args.connect, args.interval)
