"""Shared fixtures. Tests marked ``kernel`` need root, nftables and ``ip netns``."""

from __future__ import annotations

import os
import sys
from typing import Iterator

import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from netlab import Lab  # noqa: E402
from pfhost import PortfwdHost  # noqa: E402


def pytest_configure(config: pytest.Config) -> None:
    """The tests test this checkout: a portfwd installed elsewhere (the Debian package in
    /usr/lib/python3/dist-packages, a pip install) must not stand in for it."""
    import portfwd

    src = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "src")
    if not os.path.abspath(portfwd.__file__).startswith(src + os.sep):
        raise pytest.UsageError(f"portfwd is imported from {portfwd.__file__}, not from {src}:"
                                " run the tests with tests/run (an editable install of this"
                                " checkout in .venv)")


def pytest_collection_modifyitems(config: pytest.Config, items: "list[pytest.Item]") -> None:
    """Kernel tests run as root (tests/run refuses to start otherwise); without root
    they are reported as skipped, with the reason, never as passed."""
    if os.geteuid() != 0:
        skip = pytest.mark.skip(reason="needs root: network namespaces and nftables"
                                       " (run `sudo tests/run`)")
        for item in items:
            if item.get_closest_marker("kernel"):
                item.add_marker(skip)


@pytest.fixture
def lab() -> Iterator[Lab]:
    lab = Lab()
    try:
        yield lab
    finally:
        lab.close()


@pytest.fixture
def etc(tmp_path: "os.PathLike[str]") -> str:
    """A root-only directory for a forward.toml."""
    path = os.path.join(str(tmp_path), "etc")
    os.mkdir(path, 0o755)
    return path


@pytest.fixture
def pf(lab: Lab, tmp_path: "os.PathLike[str]", request: pytest.FixtureRequest) -> PortfwdHost:
    """portfwd in the lab; ``parametrize("pf", ["sh"], indirect=True)``: its hook run
    through the hook's sh lines (``PortfwdHost.via_sh``)."""
    host = PortfwdHost(lab, str(tmp_path))
    host.via_sh = getattr(request, "param", "python") == "sh"
    return host


@pytest.fixture(scope="session")
def linked_deb(tmp_path_factory: pytest.TempPathFactory) -> str:
    """portfwd 0.1.0's .deb, whose hooks were links into /usr/lib, built from git."""
    from deblab import build_linked

    return build_linked(str(tmp_path_factory.mktemp("linked")))
