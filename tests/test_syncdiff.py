"""The dry-run diff and the journal detection, without root."""

from __future__ import annotations

import os
import subprocess
import sys

from portfwd.plan import syncdiff
from portfwd.plan import Binding
from portfwd.values import PortSpan


def _b(port: int, guest_port: int, entry: str = "forward[0].ports[0]",
       target: str = "192.168.122.10") -> Binding:
    return Binding("any", 4, ("tcp", PortSpan(port)), target, guest_port, "web1", f"web1 {entry}", entry)


def test_shifted_ports_fold_into_one_item_and_gaps_split_it() -> None:
    run = [_b(p, p + 1000) for p in (7000, 7001, 7002, 7005)]
    items = syncdiff.fold(run)
    assert [(i["listen"], i["target"], i["bindings"]) for i in items] == [
        ("*:7000-7002", "192.168.122.10:8000-8002", 3), ("*:7005", "192.168.122.10:8005", 1)]


def test_diff_counts_forwards_not_elements() -> None:
    before = [_b(p, p + 1000) for p in range(7000, 7010)] + [_b(22, 22, "forward[0].ports[1]")]
    after = [_b(p, p + 1000) for p in range(7000, 7010)] + [_b(2222, 22, "forward[0].ports[1]")]
    diff = syncdiff.diff(before, after)
    assert diff.counts() == {"added": 1, "removed": 1, "unchanged": 1}
    assert syncdiff.line("+", diff.added[0]) == (
        "+ web1\ttcp\t*:2222 -> 192.168.122.10:22\tfrom *\t# web1 forward[0].ports[1]")
    moved = syncdiff.diff(before[:1], [before[0].with_target("192.168.122.11")])
    assert moved.counts() == {"added": 1, "removed": 1, "unchanged": 0}


def test_log_lines_go_to_the_journal_once_with_their_priority() -> None:
    """With stderr as the journal stream ($JOURNAL_STREAM names it), a line goes
    there once, prefixed with its syslog priority, and not to syslog too."""
    code = ("import os, sys\n"
            "st = os.fstat(2)\n"
            "os.environ['JOURNAL_STREAM'] = f'{st.st_dev}:{st.st_ino}'\n"
            "from portfwd import log\n"
            "log.use_syslog()\n"
            "assert not log._syslog\n"
            "log.warning('a'); log.error('b'); log.info('c')\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert (r.returncode, r.stderr) == (0, "<4>warning: a\n<3>error: b\n<6>c\n")
    env = dict(os.environ, JOURNAL_STREAM="1:2")  # someone else's stream: stderr as before
    r = subprocess.run([sys.executable, "-c", "from portfwd import log; log.warning('a')"],
                       capture_output=True, text=True, env=env)
    assert r.stderr == "portfwd: warning: a\n"
