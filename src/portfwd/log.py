"""Messages to stderr and, for the hook and the daemon, to syslog as ``portfwd``."""

from __future__ import annotations

import sys

_syslog = False


def use_syslog() -> None:
    """Also send every message to syslog (identifier ``portfwd``)."""
    global _syslog
    import syslog

    syslog.openlog("portfwd", syslog.LOG_PID, syslog.LOG_DAEMON)
    _syslog = True


def _emit(level: str, priority: int, message: str) -> None:
    for line in message.splitlines() or [""]:
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
