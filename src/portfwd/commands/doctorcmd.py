"""``portfwd doctor``: print ``doctor``'s checks of every layer, as text or JSON."""

from __future__ import annotations

import argparse
import json

from portfwd.rundir import state
from portfwd.console import say, unknown_asked, usage_error
from portfwd.errors import EXIT_OK


def cmd_doctor(args: argparse.Namespace) -> int:
    from portfwd.commands import doctor, doctorfacts

    unknown = unknown_asked([args.guest] if args.guest else [], None, args.config)
    if unknown:
        return usage_error("doctor", unknown)
    checks = doctorfacts.diagnose(state.config_path(args.config), args.guest, args.connect,
                                  args.libvirt_status)
    if args.json:
        print(json.dumps([c.to_json() for c in checks], indent=2))
    else:
        say(*doctor.render(checks))
    return EXIT_OK if all(c.ok for c in checks) else doctor.EXIT_BROKEN
