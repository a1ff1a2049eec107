"""``portfwd import``: read an old hooks.json, write ``importer``'s forward.toml and
say how to retire the old hook."""

from __future__ import annotations

import argparse
import sys
from typing import Optional

from . import atomicfile
from .console import say
from .errors import EXIT_OK, EXIT_USAGE, ConfigError, HostError
from .suggest import count


def cmd_import(args: argparse.Namespace) -> int:
    from . import importer

    try:
        with open(args.hooks_json, "rb") as source:
            data = source.read()
    except OSError as e:
        raise ConfigError([f"{args.hooks_json}: cannot read: {e.strerror}"]) from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        row = data[:e.start].count(b"\n") + 1
        col = e.start - data.rfind(b"\n", 0, e.start)
        raise ConfigError([f"{args.hooks_json}:{row}:{col}: not UTF-8 text"]) from None
    listen = args.listen
    if listen is None:  # the old hook's default: the interface of the default IPv4 route
        listen = _default_route_interface()
    result = importer.convert(text, args.hooks_json, None if listen == "all" else listen)
    for warning in result.warnings:
        say(warning, err=True)
    if result.errors:
        raise ConfigError(result.errors)
    data = result.toml.encode("utf-8")  # forward.toml is UTF-8, whatever the locale
    if args.output is None:
        sys.stdout.flush()
        sys.stdout.buffer.write(data)
        sys.stdout.flush()
    else:
        try:  # a new file beside the output, renamed (--force) or linked into place
            atomicfile.write_atomic(args.output, data, mode=0o644, replace=args.force, durable=True)
        except FileExistsError:
            say(f"{args.output}: exists; not overwritten (use --force to replace it)", err=True)
            return EXIT_USAGE
        except OSError as e:
            raise HostError(f"{args.output}: cannot write: {e.strerror or e}") from None
        say(f"wrote {args.output}: {count(len(result.guests), 'guest')}", err=True)
    from .installpaths import packaged

    for step in importer.retire_steps(result.guests, args.output, args.hooks_json,
                                      packaged() is not None):
        say(step, err=True)
    return EXIT_OK


def _default_route_interface() -> Optional[str]:
    """The interface of the default IPv4 route with the lowest metric, or None."""
    from .hostnet import RouteTable

    return RouteTable().default_interface(4)
