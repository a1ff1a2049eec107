"""A hook call handed to ``portfwd daemon`` over RUN_DIR/hook.sock, and the
daemon's side of it.

The hook sends (configuration path, hook kind, argv, domain XML); the daemon runs
the same function the hook would (``hook.run``) with its modules already
imported, under the same lock, and sends back the exit status and the stderr
text the hook would have had. The hook falls back to doing the work itself on
any doubt: no socket, a socket or run directory not root's alone (socket 0600
in a 0700 directory, root on the other end: SO_PEERCRED), no complete answer
within CLIENT_WAIT (a daemon killed meanwhile closes the connection: at once),
or an answer that the daemon declined (another configuration, busy for longer
than BUSY_WAIT). A daemon that gives up answers "declined" before it has done
anything, so the hook's own run never races a late one: both take the lock.

Cheap to import (os, stat, and the C module ``_socket``: ``socket``
itself costs 5 ms, half a Python start-up): the hooks import it (``hookcall``)
for every call that may need work. The daemon's side uses ``socket``.

    request  MAGIC NUL config NUL kind NUL N NUL arg1 NUL … argN NUL xml
    answer   MAGIC NUL status NUL stderr      (status DECLINED: do it yourself)
"""

# no ``from __future__ import annotations`` (0.1 ms): the hooks import this module
# before every call they hand over; the annotations that name typing are strings
import _socket
import os
import stat
import sys

TYPE_CHECKING = False
if TYPE_CHECKING:
    import socket
    from typing import List, Optional, Tuple

SOCKET = "hook.sock"
MAGIC = b"portfwd-hook 1"
DECLINED = -1
READ_LIMIT = 2.0  # seconds the daemon gives a hook to send its request
BUSY_WAIT = 5.0  # seconds a request waits for the daemon's other work before it is declined
# seconds the hook waits for an answer: BUSY_WAIT, the lock (hook.LOCK_WAIT) and the work
CLIENT_WAIT = 30.0
MAX_REQUEST = 64 << 20  # bytes


def socket_path(root: str) -> str:
    return os.path.join(root, SOCKET)


def trusted(root: str) -> bool:
    """The run directory is this user's (root's) with mode 0700, the socket its, 0600."""
    try:
        folder = os.lstat(root)
        sock = os.lstat(socket_path(root))
    except OSError:
        return False
    me = os.geteuid()
    return (stat.S_ISDIR(folder.st_mode) and folder.st_uid == me
            and not folder.st_mode & 0o077 and stat.S_ISSOCK(sock.st_mode)
            and sock.st_uid == me and stat.S_IMODE(sock.st_mode) == 0o600)


def ask(root: str, config: str, kind: str, args: "List[str]", xml: bytes,
        wait: float = CLIENT_WAIT) -> "Optional[Tuple[int, bytes]]":
    """(exit status, stderr) of the call as the daemon ran it; None: run it here."""
    import time

    if not trusted(root):
        return None
    deadline = time.monotonic() + wait
    try:
        fields = [MAGIC, _encode(config), _encode(kind), str(len(args)).encode()]
        request = b"\0".join(fields + [_encode(a) for a in args]) + b"\0" + xml
    except UnicodeError:  # not from an argv: nothing to hand over
        return None
    chunks: List[bytes] = []
    s = _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM | _socket.SOCK_CLOEXEC)
    try:
        s.settimeout(wait)
        s.connect(socket_path(root))
        # struct ucred {pid, uid, gid}, 32 bits each in the host's byte order
        creds = s.getsockopt(_socket.SOL_SOCKET, _socket.SO_PEERCRED, 12)
        if int.from_bytes(creds[4:8], sys.byteorder) != os.geteuid():
            return None
        s.sendall(request)
        s.shutdown(_socket.SHUT_WR)
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                return None
            s.settimeout(left)
            chunk = s.recv(65536)
            if not chunk:
                break
            chunks.append(chunk)
    except OSError:  # no daemon, refused, timed out
        return None
    finally:
        s.close()
    parts = b"".join(chunks).split(b"\0", 2)
    if len(parts) != 3 or parts[0] != MAGIC:
        return None  # closed before it answered (killed), or not portfwd's
    try:
        status = int(parts[1])
    except ValueError:
        return None
    return None if status == DECLINED else (status, parts[2])


# -- the daemon's side ------------------------------------------------------------

def parse(request: bytes) -> "Optional[Tuple[str, str, List[str], bytes]]":
    """(config, kind, args, xml) of a request; None if it is not one."""
    head = request.split(b"\0", 4)
    if len(head) != 5 or head[0] != MAGIC or not head[3].isdigit():
        return None
    count = int(head[3])
    rest = head[4].split(b"\0", count)
    if len(rest) != count + 1:
        return None
    return (_decode(head[1]), head[2].decode("ascii", "replace"),
            [_decode(a) for a in rest[:count]], rest[count])


# argv as the hook's Python has it (libvirt runs hooks with LC_ALL=C: UTF-8 mode),
# whatever the daemon's locale: a guest name is the same str on both sides
def _encode(text: str) -> bytes:
    return text.encode("utf-8", "surrogateescape")


def _decode(data: bytes) -> str:
    return data.decode("utf-8", "surrogateescape")


def answer(status: int, text: str) -> bytes:
    return b"\0".join([MAGIC, str(status).encode(), text.encode("utf-8", "surrogateescape")])


def listen(root: str) -> "Optional[socket.socket]":
    """The daemon's listening socket (0600, root's, in the run directory); None when
    another live daemon answers there already or the run directory is not root's
    alone. A socket file left by a daemon that died is replaced."""
    import socket

    path = socket_path(root)
    try:
        folder = os.lstat(root)
    except OSError:
        return None
    if not stat.S_ISDIR(folder.st_mode) or folder.st_uid != os.geteuid() or folder.st_mode & 0o077:
        return None
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
            probe.settimeout(1.0)
            probe.connect(path)
            return None  # someone answers
    except OSError:
        pass
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    old = os.umask(0o177)
    try:
        s.bind(path)
    except OSError:
        s.close()
        raise
    finally:
        os.umask(old)
    os.chmod(path, 0o600)
    s.listen(64)
    return s


def read_request(conn: "socket.socket") -> "Optional[bytes]":
    """The whole request (the hook shuts its side down after it), within READ_LIMIT."""
    import time

    deadline = time.monotonic() + READ_LIMIT
    chunks: List[bytes] = []
    size = 0
    try:
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                return None
            conn.settimeout(left)
            chunk = conn.recv(1 << 16)
            if not chunk:
                return b"".join(chunks)
            size += len(chunk)
            if size > MAX_REQUEST:
                return None
            chunks.append(chunk)
    except OSError:
        return None
