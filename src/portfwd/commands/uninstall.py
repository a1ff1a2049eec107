"""``portfwd uninstall``: undo ``portfwd install`` and every rule portfwd made.

It removes what ``installpaths`` lists; the configuration stays unless the admin
asks for ``--purge``.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
from typing import List, Optional, Tuple

from portfwd.commands import installpaths
from portfwd.host import proc
from portfwd.errors import HostError
from portfwd.host.pathwalk import at
# seconds systemctl gets: stopping the daemon may wait for systemd's own stop timeout (90 s)
SYSTEMCTL_WAIT = 150.0


def systemctl(args: List[str]) -> None:
    """Run ``systemctl ARGS``, passing on what it says; a failure, or a systemctl that
    does not answer within SYSTEMCTL_WAIT, is a warning (the files are what counts)."""
    try:
        r = proc.run(["systemctl"] + args, SYSTEMCTL_WAIT)
    except HostError as e:
        print(f"portfwd: warning: {e}", file=sys.stderr)
        return
    sys.stdout.write(r.stdout)
    sys.stderr.write(r.stderr)


def units(data_dir: str) -> List[str]:
    """The unit names install copies (every ``*.service`` it ships)."""
    return sorted(name for name in os.listdir(data_dir) if name.endswith(".service"))


def installed_paths(root: str, data_dir: str) -> List[str]:
    """Every file install writes, below ``root``, but the configuration."""
    return [at(root, path) for path in installpaths.installed(units(data_dir))]


def stop_units(root: str, data_dir: str) -> Optional[str]:
    """Stop and disable the units first (the daemon would re-create rules); says
    what it ran, or None without a running systemd."""
    if root != "/" or not os.path.isdir("/run/systemd/system") or not shutil.which("systemctl"):
        return None
    names = units(data_dir)
    systemctl(["disable", "--now"] + names)
    return "stopped and disabled " + ", ".join(names)


def remove_files(root: str, data_dir: str, config: str, purge: bool) -> Tuple[List[str], List[str]]:
    """Remove what install wrote; (removed, kept) for the report. The link is
    removed only while it is a symlink (a file of that name is someone else's)."""
    removed, kept = [], []
    for path in installed_paths(root, data_dir):
        if path == at(root, installpaths.COMMAND) and os.path.lexists(path) \
                and not os.path.islink(path):
            kept.append(f"{path} (not a symlink portfwd made)")
            continue
        if os.path.lexists(path):
            os.unlink(path)
            removed.append(path)
    config_path = at(root, config)
    if purge:
        if os.path.lexists(config_path):
            os.unlink(config_path)
            removed.append(config_path)
        directory = os.path.dirname(config_path)
        if os.path.isdir(directory) and not os.listdir(directory):
            os.rmdir(directory)
            removed.append(directory)
    elif os.path.lexists(config_path):
        kept.append(f"{config_path} (remove it too with --purge)")
    if root == "/" and os.path.isdir("/run/systemd/system") and shutil.which("systemctl"):
        systemctl(["daemon-reload"])
    return removed, kept


def remove_run_dir(run_dir: str) -> bool:
    """Drop portfwd's state directory (flush emptied it); True when removed."""
    if not os.path.isdir(run_dir):
        return False
    shutil.rmtree(run_dir, ignore_errors=True)
    return not os.path.exists(run_dir)


def cmd_uninstall(args: argparse.Namespace) -> int:
    from portfwd.rundir import state
    from portfwd.console import say
    from portfwd.errors import EXIT_OK
    from portfwd.commands.flush import flush
    from portfwd.commands.installpaths import DATA_DIR

    stopped = stop_units(args.root, DATA_DIR)
    if stopped:
        say(stopped)
    for t in flush(state.config_path(args.config)):
        say(f"removed: table inet {t} and portfwd's accepts in libvirt's chains")
    removed, kept = remove_files(args.root, DATA_DIR,
                                           args.config or state.DEFAULT_CONFIG, args.purge)
    if remove_run_dir(state.run_dir()):
        removed.append(state.run_dir())
    for path in removed:
        say(f"removed: {path}")
    for path in kept:
        say(f"kept: {path}")
    say("next: restart libvirtd once (systemctl restart libvirtd) so that it forgets the hooks")
    return EXIT_OK
