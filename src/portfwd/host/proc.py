"""Running other programs: each run is bounded in time, and a program that is
missing or does not finish in time is a HostError that says which and what to
do, never a traceback. Cheap to import (``subprocess`` loads on the first run).
"""

from __future__ import annotations

import os

from portfwd.errors import HostError

TYPE_CHECKING = False
if TYPE_CHECKING:
    import subprocess
    from typing import Dict, List, Optional


def run(argv: List[str], timeout: float, package: str = "",
        env: Optional[Dict[str, str]] = None,
        input: Optional[str] = None) -> subprocess.CompletedProcess[str]:
    """``argv`` with its output captured (text, ``LC_ALL=C``; bytes that are not UTF-8,
    such as in an interface name, kept as ``hostnet.ifname`` keeps them), killed after ``timeout``
    seconds; HostError when it is missing (``package`` installs it) or was killed."""
    import subprocess

    try:
        return subprocess.run(argv, input=input, capture_output=True, encoding="utf-8",
                              errors="surrogateescape",
                              timeout=timeout,
                              env=dict(os.environ if env is None else env, LC_ALL="C"))
    except FileNotFoundError:
        hint = f": apt-get install {package}" if package else ""
        raise HostError(f"{argv[0]} not found{hint}") from None
    except subprocess.TimeoutExpired:
        raise HostError(f"`{' '.join(argv)}` did not finish within {timeout:g} s and was"
                        " stopped") from None
