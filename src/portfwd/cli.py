"""portfwd's command line: runs the command ``cmdline`` parsed (each in a module of
its own, imported when it runs) and turns an error into its exit code.

Exit codes:
  0  success
  1  the configuration is invalid (every problem printed as PATH:LINE:COL: message)
  2  the command line is wrong
  3  the host refused: nftables, libvirt or the file system said no
  4  internal error (a bug in portfwd; please report it)
  5  status: a forward is missing from the table, differs from it or is blocked
     (doctor and trace: a broken layer, an undelivered probe)
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from typing import Callable, Dict, List, Optional, Tuple, cast

from portfwd import log
from portfwd.cmdline import parser
from portfwd.console import say
from portfwd.errors import (EXIT_BUG, EXIT_CONFIG, EXIT_HOST, EXIT_OK, BugError, ConfigError,
                     HostError)

# command → (module below portfwd, function); a command imports its module alone, when
# it runs
COMMANDS: Dict[str, Tuple[str, str]] = {
    "check": ("commands.check", "cmd_check"), "sync": ("commands.sync", "cmd_sync"),
    "status": ("commands.statuscmd", "cmd_status"), "show": ("commands.show", "cmd_show"),
    "doctor": ("commands.doctorcmd", "cmd_doctor"), "trace": ("commands.trace", "cmd_trace"),
    "flush": ("commands.flush", "cmd_flush"), "daemon": ("daemon", "cmd_daemon"),
    "reapply": ("commands.reapply", "cmd_reapply"), "install": ("commands.install", "cmd_install"),
    "uninstall": ("commands.uninstall", "cmd_uninstall"), "import": ("commands.importcmd", "cmd_import"),
    "add": ("commands.editcmd", "cmd_edit"), "remove": ("commands.editcmd", "cmd_edit")}


def command(name: str) -> Callable[[argparse.Namespace], int]:
    """The function that runs the command ``name``."""
    module, function = COMMANDS[name]
    run = getattr(importlib.import_module(f"{__package__}.{module}"), function)
    return cast(Callable[[argparse.Namespace], int], run)


def main(argv: Optional[List[str]] = None) -> int:
    args = parser().parse_args(argv)
    try:
        return command(args.command)(args)
    except ConfigError as e:
        for line in e.lines:
            say(line, err=True)
        return EXIT_CONFIG
    except HostError as e:
        log.error(str(e))
        return EXIT_HOST
    except BrokenPipeError:  # the reader left (`| head`): nothing more to say
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_OK
    except PermissionError as e:
        log.error(f"{e.filename}: {e.strerror} (run portfwd as root)")
        return EXIT_HOST
    except OSError as e:
        log.error(f"{e.filename or ''}: {e.strerror or e}")
        return EXIT_HOST
    except BugError as e:
        log.error(f"internal error: {e}")
        return EXIT_BUG
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
