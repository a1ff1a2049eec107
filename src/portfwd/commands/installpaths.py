"""Where portfwd's files are installed, listed once: ``portfwd install`` writes
them, ``portfwd uninstall`` removes them, doctor and the AppArmor check look at the
hooks, and the Debian package build reads its own places here
(``python3 -m portfwd.commands.installpaths make``, see debian/rules).

``portfwd install`` (pip) puts its files beside the admin's own (/usr/local,
/etc/systemd/system); the Debian package in the distribution's places. The hooks
are the same files in both: libvirt looks for them in HOOK_DIR alone.
"""

from __future__ import annotations

import os
import sys
from typing import Dict, List, Optional

# the package's own data: the hook templates, the units, the example configuration
PACKAGE_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # portfwd/
DATA_DIR = os.path.join(PACKAGE_DIR, "data")

HOOK_DIR = "/etc/libvirt/hooks"
HOOK_KINDS = ("qemu", "network")

# portfwd install
COMMAND = "/usr/local/sbin/portfwd"  # a link to the console script pip made
MAN_PAGE = "/usr/local/share/man/man8/portfwd.8"
CONFIG_MAN_PAGE = "/usr/local/share/man/man5/forward.toml.5"
COMPLETION = "/usr/local/share/bash-completion/completions/portfwd"
UNIT_DIR = "/etc/systemd/system"

# the Debian package (dh_installman places the manual page)
DEB_COMMAND = "/usr/sbin/portfwd"
DEB_COMPLETION = "/usr/share/bash-completion/completions/portfwd"
DEB_UNIT_DIR = "/lib/systemd/system"
# the hooks themselves: the files in HOOK_DIR hand them to /bin/sh (libvirt's AppArmor
# profile lets it execute nothing under /usr/lib)
DEB_HOOK_LIB = "/usr/lib/portfwd/hooks"
# the commented example configuration, beside the README and docs/ (dh_installdocs)
DEB_EXAMPLE = "/usr/share/doc/portfwd/examples/forward.toml"


DPKG_STATUS = "/var/lib/dpkg/status"
PACKAGE = "portfwd"


def packaged(root: str = "/") -> Optional[str]:
    """Why the Debian package owns portfwd's installation below ``root`` (dpkg's status
    says it is installed, or its hooks' directory is there), or None."""
    from portfwd.host.pathwalk import at

    try:
        with open(at(root, DPKG_STATUS), encoding="utf-8", errors="replace") as f:
            stanzas = f.read().split("\n\n")
    except OSError:
        stanzas = []
    for stanza in stanzas:
        fields = dict(line.split(": ", 1) for line in stanza.splitlines() if ": " in line
                      and not line.startswith(" "))
        status = fields.get("Status", "").split()
        if fields.get("Package") == PACKAGE and status[-1:] not in (["not-installed"],
                                                                     ["config-files"]):
            return f"the Debian package {PACKAGE} is installed (dpkg: {' '.join(status)})"
    if os.path.isdir(at(root, DEB_HOOK_LIB)):
        return f"{DEB_HOOK_LIB} exists (the Debian package's hooks)"
    return None


def hook(kind: str) -> str:
    """The file libvirt runs as portfwd's hook of ``kind`` (qemu or network)."""
    return f"{HOOK_DIR}/{kind}.d/portfwd"


def installed(units: List[str]) -> List[str]:
    """Every file ``portfwd install`` writes (but the configuration), ``units`` the
    names of the systemd units it ships."""
    return ([hook(kind) for kind in HOOK_KINDS]
            + [COMMAND, MAN_PAGE, CONFIG_MAN_PAGE, COMPLETION]
            + [f"{UNIT_DIR}/{unit}" for unit in units])


def package() -> Dict[str, str]:
    """The Debian package's places, as debian/rules names them."""
    return {"DEB_COMMAND": DEB_COMMAND, "DEB_COMPLETION": DEB_COMPLETION,
            "DEB_UNIT_DIR": DEB_UNIT_DIR, "DEB_HOOK_LIB": DEB_HOOK_LIB,
            "DEB_EXAMPLE": DEB_EXAMPLE,
            **{f"HOOK_{kind.upper()}": hook(kind) for kind in HOOK_KINDS}}


def main(argv: Optional[List[str]] = None) -> int:
    """``make``: the package's places as ``NAME=VALUE`` words, for make's eval."""
    args = sys.argv[1:] if argv is None else argv
    if args != ["make"]:
        print("usage: python3 -m portfwd.commands.installpaths make", file=sys.stderr)
        return 2
    print(" ".join(f"{name}={value}" for name, value in package().items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
