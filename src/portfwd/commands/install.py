"""``portfwd install``: put hooks, units, manuals and an example config in place (pip)."""

from __future__ import annotations

import argparse
import os
import shutil
import sys
from typing import List

from portfwd.rundir import atomicfile, state
from portfwd import log
from portfwd.cmdline import parser
from portfwd.console import say
from portfwd.errors import EXIT_OK, EXIT_USAGE, BugError, HostError
from portfwd.commands.installpaths import DATA_DIR


def cmd_install(args: argparse.Namespace) -> int:
    import shlex

    from portfwd.commands import installpaths
    from portfwd.host.pathwalk import at

    root = args.root
    owner = installpaths.packaged(root)
    if owner is not None and not args.force:
        log.error(f"not installing: {owner}; it put the hooks, units, manual page and"
                  " completion in place, and `portfwd install` would add a second set beside"
                  f" them. Edit {state.DEFAULT_CONFIG}, run `portfwd check`, then"
                  " `portfwd sync`; or remove the package first (apt remove portfwd);"
                  " `portfwd install --force` installs anyway")
        return EXIT_USAGE
    done: List[str] = []
    # libvirt runs hooks with an empty environment: a non-default path goes into the hook
    settings = "".join(f"import os; os.environ[{name!r}] = {value!r}\n" for name, value in (
        (state.ENV_CONFIG, args.config), (state.ENV_RUN_DIR, args.run_dir)) if value)
    # … and into its sh lines, which look at the same files (the hook index)
    for value in (args.config, args.run_dir):
        if value and ("\\" in value or "'''" in value or "\n" in value):
            raise HostError(f"cannot name {value!r} in the hook: choose a path without"
                            " backslashes, newlines or '''")
    exports = "".join(f"{name}={shlex.quote(value)}; export {name}\n" for name, value in (
        (state.ENV_CONFIG, args.config), (state.ENV_RUN_DIR, args.run_dir)) if value)
    # the hook is `#!/bin/sh` starting `py=INTERPRETER` on itself (a missing interpreter
    # must not fail the guest); sh's lines sit in a Python string: no backslash there
    python = sys.executable
    if not python or "\\" in python or "\n" in python:
        raise HostError(f"cannot name the interpreter {python!r} in the hook: install portfwd"
                        " for a Python with a plain path")
    import site

    from portfwd.commands import codetrust

    # the hooks run this Python and this package as root: root alone may change them
    refused = codetrust.problems(python, installpaths.PACKAGE_DIR,
                                 site.getsitepackages())
    if refused:
        for line in refused:
            log.error(line)
        raise HostError("nothing installed")

    for kind in installpaths.HOOK_KINDS:
        hook_dst = at(root, installpaths.hook(kind))
        with open(os.path.join(DATA_DIR, kind), encoding="utf-8") as f:
            template = f.read()
        head, sep, body = template.partition("\n'''\n")  # the end of the sh lines
        if not sep or "\npy=/usr/bin/python3\n" not in head:
            raise BugError(f"{f.name}: no `py=/usr/bin/python3` line before the closing '''")
        head = head.replace("\npy=/usr/bin/python3\n", f"\npy={shlex.quote(python)}\n{exports}", 1)
        os.makedirs(os.path.dirname(hook_dst), mode=0o755, exist_ok=True)
        atomicfile.write_atomic(hook_dst, f"{head}{sep}{settings}{body}".encode(), mode=0o755)
        done.append(f"hook {hook_dst}")

    config_dst = at(root, args.config or state.DEFAULT_CONFIG)
    os.makedirs(os.path.dirname(config_dst), mode=0o755, exist_ok=True)
    if not os.path.exists(config_dst):
        with open(os.path.join(DATA_DIR, "forward.toml"), encoding="utf-8") as f:
            example = f.read()
        atomicfile.write_atomic(config_dst, commented_out_forwards(example).encode())
        os.chmod(config_dst, 0o644)
        done.append(f"example configuration {config_dst} (its forwards commented out)")
    else:
        done.append(f"kept existing {config_dst}")

    # the console script beside this interpreter (the venv's bin), else one on PATH
    beside = os.path.join(os.path.dirname(sys.executable), "portfwd")
    exe = beside if os.access(beside, os.X_OK) else shutil.which("portfwd")
    link = at(root, installpaths.COMMAND)
    if exe is None:
        done.append("no portfwd command found to link (install the package with pip first)")
        exe = link
    elif os.path.abspath(exe) != os.path.abspath(link):
        os.makedirs(os.path.dirname(link), exist_ok=True)
        if os.path.islink(link) or not os.path.exists(link):
            if os.path.lexists(link):
                os.unlink(link)
            os.symlink(exe, link)
            done.append(f"command {link} -> {exe}")

    unit_dir = at(root, installpaths.UNIT_DIR)
    for unit in sorted(os.listdir(DATA_DIR)):
        if not unit.endswith(".service"):
            continue
        with open(os.path.join(DATA_DIR, unit), encoding="utf-8") as f:
            text = f.read().replace("@PORTFWD@", link)
        os.makedirs(unit_dir, exist_ok=True)
        atomicfile.write_atomic(os.path.join(unit_dir, unit), text.encode())
        done.append(f"unit {os.path.join(unit_dir, unit)}")
    from portfwd.commands import docs

    for what, path, text in (
            ("manual page", installpaths.MAN_PAGE, docs.man_page(parser())),
            ("manual page", installpaths.CONFIG_MAN_PAGE, docs.config_page()),
            ("bash completion", installpaths.COMPLETION, docs.bash_completion(parser()))):
        path = at(root, path)
        os.makedirs(os.path.dirname(path), mode=0o755, exist_ok=True)
        atomicfile.write_atomic(path, text.encode(), mode=0o644)
        done.append(f"{what} {path}")
    for line in done:
        say(f"installed: {line}")
    if root == "/" and os.path.isdir("/run/systemd/system") and shutil.which("systemctl"):
        from portfwd.commands.uninstall import systemctl

        systemctl(["daemon-reload"])
        systemctl(["enable", "portfwd-sync.service", "portfwd-reapply.service",
                   "portfwd.service"])
    say("next: edit the configuration, run `portfwd check`, then restart libvirtd once"
        " (systemctl restart libvirtd) so it finds the hook")
    return EXIT_OK


def commented_out_forwards(example: str) -> str:
    """The example with every line from the first [[forward]] on commented out,
    so that installing forwards nothing until the admin says so."""
    head, sep, tail = example.partition("\n[[forward]]")
    if not sep:
        return example
    lines = (sep.lstrip("\n") + tail).splitlines()
    return head + "\n" + "\n".join(("# " + line) if line else line for line in lines) + "\n"
