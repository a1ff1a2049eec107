"""Messages to stderr and, for the hook and the daemon, to syslog as ``portfwd``.

Under systemd (``portfwd.service``) stderr already is the journal: each line
then goes there once, with its priority as a ``<N>`` prefix, and not to syslog
as well (which would put it in the journal twice). A message is one line, through
``escape.printable``: names from guests, processes and interfaces are shown,
not obeyed (a newline in one cannot forge a second message), and syslog never
meets a character it cannot encode.
"""

from __future__ import annotations

import _thread
import os
import sys

from portfwd.escape import printable

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Dict, List

_syslog = False
_journal = False
# thread → the lines it writes as a hook would, for the hook that handed it its call
_captured: Dict[int, List[str]] = {}


def capture() -> List[str]:
    """From now on this thread's messages also go, as the hook writes them, to the
    list returned (``portfwd daemon`` answering a hook), until ``end_capture``."""
    lines: List[str] = []
    _captured[_thread.get_ident()] = lines
    return lines


def end_capture() -> None:
    _captured.pop(_thread.get_ident(), None)


def use_syslog() -> None:
    """Also send every message to syslog (identifier ``portfwd``), unless stderr
    is the journal's stream (``$JOURNAL_STREAM`` names it)."""
    global _syslog, _journal
    if stderr_is_journal():
        _journal = True
        return
    import syslog

    syslog.openlog("portfwd", syslog.LOG_PID, syslog.LOG_DAEMON)
    _syslog = True


def stderr_is_journal() -> bool:
    """Whether stderr is the journal stream systemd connected (sd_journal_stream_fd)."""
    stream = os.environ.get("JOURNAL_STREAM", "")
    try:
        st = os.fstat(2)
    except OSError:
        return False
    return bool(stream) and stream == f"{st.st_dev}:{st.st_ino}"


def _emit(level: str, priority: int, message: str) -> None:
    line = printable(message)
    if _captured and _thread.get_ident() in _captured:
        _captured[_thread.get_ident()].append(f"portfwd: {level}{line}\n")
    if _journal:
        sys.stderr.write(f"<{priority}>{level}{line}\n")
    else:
        sys.stderr.write(f"portfwd: {level}{line}\n")
        if _syslog:
            import syslog

            syslog.syslog(priority, f"{level}{line}")
    sys.stderr.flush()


def info(message: str) -> None:
    _emit("", 6, message)


def warning(message: str) -> None:
    _emit("warning: ", 4, message)


def error(message: str) -> None:
    _emit("error: ", 3, message)
