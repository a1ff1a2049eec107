"""``portfwd daemon``: the same engine, driven by events instead of hook calls.

It reconciles (a ``sync``: one transaction) whenever something that decides
the forwards changes: a libvirt lifecycle event, a (re)connection to
libvirtd, a change to libvirt's dnsmasq lease files, a valid edit of
forward.toml, or, while discovered addresses wait for evidence that they are
their NIC's, that evidence appearing (``evidence.Recheck``). An invalid edit
is logged with its location and changes nothing. SIGHUP (``systemctl reload``) reconciles at once. It shares the
hook's lock, so the two never interleave; the hook keeps working without it.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from typing import Any, Callable, Dict, List, Optional, Tuple

from . import libvirtapi, log, state
from .discover import LEASE_DIR, Resolver, status_files_tell
from .engine import Engine
from .errors import ConfigError, HostError
from .evidence import Recheck
from .model import Config, Guest


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
        self.recheck = Recheck()  # addresses waiting for evidence, and when to look again

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
        conn.domainEventRegisterAny(None, self.libvirt.VIR_DOMAIN_EVENT_ID_LIFECYCLE,
                                    lambda *_: self.wake.set(), None)
        conn.registerCloseCallback(lambda *_: self.wake.set(), None)
        self.conn = conn
        self.seen = None  # everything may have changed while we were away
        log.info(f"connected to libvirt at {self.uri}")
        return True

    # -- the loop ----------------------------------------------------------
    def reconcile(self) -> None:
        """Validate the configuration, then sync with the running guests."""
        signature = state.config_signature(self.engine.config_path)
        if signature == self.bad_config:
            return
        if self.config is None or self.config[0] != signature:  # else: a lease or guest change
            try:
                with state.locked(self.engine.root):
                    self.config = (signature, self.engine.compile())
            except ConfigError as e:
                self.bad_config = signature
                for line in e.lines:
                    log.error(line)
                log.error("configuration invalid: forwards left as they were")
                return
        self.bad_config = None
        config = self.config[1]
        self.engine.forget_claims()  # a table seen before may have been flushed away since
        # everything libvirt knows is asked now, never under the lock (see running_guests)
        guests, resolvers = libvirtapi.running_guests(self.conn, config)
        in_child(lambda: self._sync(config, guests, resolvers))
        self.recheck.arm(self.engine.store.awaiting())

    def _sync(self, config: Config, guests: List[Guest], resolvers: Dict[str, Resolver]) -> None:
        with state.locked(self.engine.root):
            bindings = self.engine.sync(config, guests, resolvers=resolvers,
                                        settle=status_files_tell(self.uri))
            pending = self.engine.waiting
        log.info(f"synced: {len(bindings)} forward(s) for {len({b.guest for b in bindings})}"
                 f" guest(s)" + (f", {pending} waiting for an address" if pending else ""))

    def run(self) -> int:
        self.start_event_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._stop)
        signal.signal(signal.SIGHUP, self._reload)
        while not self.stopping:
            if not self.connect():
                self.wake.wait(2.0)
                self.wake.clear()
                continue
            now = (state.config_signature(self.engine.config_path), lease_signature())
            proven = self.recheck.due()
            if proven:
                log.info(f"guest {proven[0]}: {proven[1]} shows up as NIC {proven[2]}'s: reconciling")
                self.seen = None
            if self.wake.is_set() or now != self.seen:
                self.wake.clear()
                time.sleep(0.1)  # let a burst of events or writes settle
                self.seen = (state.config_signature(self.engine.config_path), lease_signature())
                try:
                    self.reconcile()
                except HostError as e:
                    log.error(str(e))
                    self.seen = None
                    self.wake.wait(2.0)
                    continue
            self.wake.wait(self.interval)
        log.info("stopped")
        return 0

    def _reload(self, *_: Any) -> None:
        """SIGHUP (``systemctl reload portfwd``): read the configuration again and
        reconcile now, even if its file looks unchanged."""
        self.seen = None
        self.bad_config = None
        self.wake.set()

    def _stop(self, *_: Any) -> None:
        self.stopping = True
        self.wake.set()


def in_child(work: Callable[[], None]) -> None:
    """Run ``work`` in a forked child and wait for it; its HostError is raised here.

    Building and parsing one transaction of 10,000 forwards takes some 90 MB that
    the C allocator keeps once freed: done in a child, it is given back when the
    child ends, and the daemon stays at what it needs between events. The child
    asks libvirt nothing (what it needs was asked before) and ends with ``_exit``.
    """
    import traceback

    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child
        code = 0
        try:
            os.close(read_end)
            work()
        except HostError as e:
            os.write(write_end, str(e).encode())
            code = 1
        except BaseException:
            os.write(write_end, traceback.format_exc().encode())
            code = 2
        finally:
            os._exit(code)
    os.close(write_end)
    with os.fdopen(read_end, "rb") as pipe:
        said = pipe.read().decode(errors="replace").strip()
    _, status = os.waitpid(pid, 0)
    code = os.waitstatus_to_exitcode(status)
    if code == 1:
        raise HostError(said)
    if code != 0:
        raise HostError(f"the reconcile ended with {code}: {said or 'no message'}")


def run(config_path: str, uri: str, interval: float = 0.5) -> int:
    log.use_syslog()
    return Daemon(config_path, uri, interval).run()
