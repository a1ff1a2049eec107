"""Install paths listed once (``installpaths``): debian/rules takes the package's
places from there and names none of them itself (no root needed)."""

from __future__ import annotations

import os
import re
import subprocess
import sys

from portfwd.commands import installpaths

CHECKOUT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_make_words() -> None:
    r = subprocess.run([sys.executable, "-m", "portfwd.commands.installpaths", "make"],
                       capture_output=True, text=True, check=True)
    words = dict(word.split("=", 1) for word in r.stdout.split())
    assert words == installpaths.package()
    assert words["HOOK_QEMU"] == "/etc/libvirt/hooks/qemu.d/portfwd"
    assert all(value.startswith("/") and " " not in value for value in words.values())
    r = subprocess.run([sys.executable, "-m", "portfwd.commands.installpaths"], capture_output=True,
                       text=True)
    assert r.returncode == 2 and "usage:" in r.stderr


def test_debian_rules_use_every_place_and_name_none() -> None:
    with open(os.path.join(CHECKOUT, "debian", "rules"), encoding="utf-8") as f:
        rules = f.read()
    for name, path in installpaths.package().items():
        assert f"$({name})" in rules, name
        assert path not in rules, path
    assert re.search(r"\$\(error ", rules)  # no paths: no build

