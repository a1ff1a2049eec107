"""Where portfwd's configuration and run directory are: the defaults and the
environment variables that move them (libvirt runs the hooks with an empty
environment: ``portfwd install`` writes non-default paths into the hooks).

Imports only os: the hooks' hand-over to ``portfwd daemon`` (``hookcall``) needs
these two paths before anything else of portfwd is imported; ``state`` uses them
for everything else.
"""

# no ``from __future__ import annotations`` (0.1 ms): the hooks import this module
# before every call they hand over; the annotations that name typing are strings
import os

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Optional

DEFAULT_CONFIG = "/etc/portfwd/forward.toml"
ENV_CONFIG = "PORTFWD_CONFIG"
DEFAULT_RUN_DIR = "/run/portfwd"
ENV_RUN_DIR = "PORTFWD_RUNDIR"


def config_path(given: "Optional[str]" = None) -> str:
    """--config, else $PORTFWD_CONFIG, else /etc/portfwd/forward.toml."""
    return given or os.environ.get(ENV_CONFIG) or DEFAULT_CONFIG


def run_dir() -> str:
    """$PORTFWD_RUNDIR, else /run/portfwd."""
    return os.environ.get(ENV_RUN_DIR) or DEFAULT_RUN_DIR
