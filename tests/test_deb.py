"""The Debian package: built from the checkout with Debian's tools, clean for lintian,
installed with apt into a Debian 12 root and into a Debian 13 root (Python 3.11 and
3.13: the same .deb survives a Python minor upgrade), where its hook makes the
forward's rules; removed (table gone, configuration kept) and purged (configuration
gone); installed over an earlier pip install without a conffile prompt.

The roots are cached mmdebstrap roots (trixielab.cached_root; the Debian 13 one is the
one test_trixie.py uses) mounted as overlays, each in a network namespace of its own.
"""

from __future__ import annotations

import itertools
import json
import os
import re
import shutil
import subprocess
import time
from typing import Iterator, List, Optional, Tuple

import pytest

from netlab import GUEST4, run
from pfhost import domain_xml
from trixielab import ROOT_PACKAGES, SUITE, RootLab, cached_root

pytestmark = [pytest.mark.kernel, pytest.mark.deb]

CHECKOUT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# what the package needs from Debian 12, plus libvirt (which it recommends)
BOOKWORM_PACKAGES = ["libvirt-daemon-system", "nftables", "python3-nftables", "python3-libvirt",
                     "iproute2"]
ROOTS = {"bookworm": BOOKWORM_PACKAGES, SUITE: ROOT_PACKAGES}
CONFIG = f"""
[[forward]]
guest = "pfdeb"
ipv4  = "{GUEST4}"
ports = ["8080:80"]
"""
APT = "DEBIAN_FRONTEND=noninteractive apt-get -q -y -o Dpkg::Use-Pty=0"


def version() -> str:
    with open(os.path.join(CHECKOUT, "debian", "changelog")) as f:
        m = re.match(r"portfwd \(([^)]+)\)", f.readline())
    assert m, "debian/changelog: no version on its first line"
    return m.group(1)


def git_status() -> str:
    return run("git", "-C", CHECKOUT, "status", "--porcelain", "--ignored").stdout.decode()


@pytest.fixture(scope="module")
def deb(tmp_path_factory: pytest.TempPathFactory) -> Tuple[str, str]:
    """(the built .deb, the checkout's git status before the build)."""
    before = git_status()
    out = str(tmp_path_factory.mktemp("deb"))
    started = time.monotonic()
    r = run(os.path.join(CHECKOUT, "debian", "build-deb"), out, check=False)
    assert r.returncode == 0, r.stderr.decode()
    path = r.stdout.decode().strip()
    print(f"\nbuilt {os.path.basename(path)} ({os.path.getsize(path)} bytes)"
          f" in {time.monotonic() - started:.1f} s")
    return path, before


_roots = itertools.count()


class DebRoot(RootLab):
    """A Debian root of ``suite`` in its own network namespace, with the .deb at /tmp."""

    def __init__(self, base: str, suite: str, deb: str) -> None:
        tag = f"pfd{os.getpid() % 100000}x{next(_roots)}"  # one per root alive at once
        super().__init__(base, f"/mnt/{tag}")
        self.netns = tag
        self.deb = f"/tmp/{os.path.basename(deb)}"
        self.installed: "Optional[subprocess.CompletedProcess[bytes]]" = None
        try:
            lower = cached_root(suite, ROOTS[suite])
            run("ip", "netns", "add", self.netns)
            self.mount(lower, self.netns)
            shutil.copy(deb, self.file(self.deb))
        except BaseException:
            self.close()
            raise

    def apt(self, args: str) -> "subprocess.CompletedProcess[bytes]":
        """apt-get as an admin runs it, without a terminal (a prompt would fail it)."""
        return run(*self.argv("sh", "-c", f"{APT} {args} </dev/null"), check=False)

    def hook(self, guest: str, op: str, sub: str = "begin") -> "subprocess.CompletedProcess[bytes]":
        """The installed qemu hook run as libvirt runs it: argv and the domain on stdin."""
        return run(*self.argv("/etc/libvirt/hooks/qemu.d/portfwd", guest, op, sub, "-"),
                   input=domain_xml(guest), check=False)

    def tables(self) -> List[str]:
        return self.sh("nft list tables").stdout.decode().split("\n")

    def write(self, path: str, text: str, mode: int = 0o644) -> None:
        os.makedirs(os.path.dirname(self.file(path)), exist_ok=True)
        with open(self.file(path), "w") as f:
            f.write(text)
        os.chmod(self.file(path), mode)

    def close(self) -> None:
        self.unmount()
        run("ip", "netns", "del", self.netns, check=False)


@pytest.fixture(scope="module", params=["bookworm", pytest.param(SUITE, marks=pytest.mark.trixie)])
def root(request: pytest.FixtureRequest, deb: Tuple[str, str],
         tmp_path_factory: pytest.TempPathFactory) -> Iterator[DebRoot]:
    """A root with the .deb installed by apt (asserted by the first test)."""
    started = time.monotonic()
    lab = DebRoot(str(tmp_path_factory.mktemp(request.param)), request.param, deb[0])
    try:
        mounted = time.monotonic()
        lab.installed = lab.apt(f"install {lab.deb}")
        python = lab.sh("python3 --version").stdout.decode().strip()
        print(f"\n{request.param}: {python}; root ready in {mounted - started:.1f} s,"
              f" apt-get install in {time.monotonic() - mounted:.1f} s")
        yield lab
    finally:
        lab.close()


# -- the build ------------------------------------------------------------------------

def test_build_leaves_the_checkout_as_it_was(deb: Tuple[str, str]) -> None:
    path, before = deb
    assert os.path.basename(path) == f"portfwd_{version()}_all.deb"
    assert git_status() == before


def test_changelog_pyproject_and_readme_agree_on_the_version() -> None:
    with open(os.path.join(CHECKOUT, "pyproject.toml")) as f:
        assert f'\nversion = "{version()}"\n' in f.read()
    with open(os.path.join(CHECKOUT, "README.md")) as f:
        assert f"portfwd_{version()}_all.deb" in f.read()


def test_lintian_finds_no_errors(deb: Tuple[str, str]) -> None:
    r = run("lintian", "--fail-on", "error", deb[0], check=False)
    report = r.stdout.decode()
    print("\n" + report)
    assert r.returncode == 0, report + r.stderr.decode()
    assert not [line for line in report.splitlines() if line.startswith("E:")]


def test_package_contents(deb: Tuple[str, str]) -> None:
    listing = run("dpkg-deb", "-c", deb[0]).stdout.decode()
    for path in ("./usr/sbin/portfwd", "./usr/lib/python3/dist-packages/portfwd/hook.py",
                 "./usr/share/man/man8/portfwd.8.gz",
                 "./usr/share/bash-completion/completions/portfwd",
                 "./lib/systemd/system/portfwd.service",
                 "./lib/systemd/system/portfwd-sync.service",
                 "./lib/systemd/system/portfwd-reapply.service",
                 "./etc/libvirt/hooks/qemu.d/portfwd -> /usr/lib/portfwd/hooks/qemu",
                 "./etc/libvirt/hooks/network.d/portfwd -> /usr/lib/portfwd/hooks/network"):
        assert path in listing
    assert "/usr/bin/" not in listing and "/usr/local/" not in listing
    conffiles = run("dpkg-deb", "-I", deb[0], "conffiles").stdout.decode().split()
    assert conffiles == ["/etc/portfwd/forward.toml"]
    fields = run("dpkg-deb", "-f", deb[0], "Architecture", "Depends").stdout.decode()
    assert "Architecture: all" in fields
    for dep in ("python3-nftables", "python3-libvirt", "nftables", "python3:any (>= 3.11~)"):
        assert dep in fields


# -- installed into a Debian 12 and a Debian 13 root ---------------------------------

def test_apt_installs_it(root: DebRoot) -> None:
    r = root.installed
    assert r is not None
    assert r.returncode == 0, r.stdout.decode()[-3000:] + r.stderr.decode()
    where = root.sh("python3 -c 'import portfwd; print(portfwd.__file__)'").stdout.decode()
    assert where.strip() == "/usr/lib/python3/dist-packages/portfwd/__init__.py"
    for kind in ("qemu", "network"):
        target = os.readlink(root.file(f"/etc/libvirt/hooks/{kind}.d/portfwd"))
        assert target == f"/usr/lib/portfwd/hooks/{kind}"
        with open(root.file(target)) as f:
            assert "\npy=/usr/bin/python3\n" in f.read()
    for unit in ("portfwd.service", "portfwd-sync.service", "portfwd-reapply.service"):
        with open(root.file(f"/lib/systemd/system/{unit}")) as f:
            assert "ExecStart=/usr/sbin/portfwd " in f.read()
        assert os.path.lexists(root.file(f"/etc/systemd/system/multi-user.target.wants/{unit}"))
    # the conffile forwards nothing until the admin says so
    r = root.sh("portfwd check")
    assert r.returncode == 0, r.stderr
    assert b"OK: 0 port forward(s) for 0 guest(s)" in r.stdout
    for path in ("/usr/share/man/man8/portfwd.8.gz",
                 "/usr/share/bash-completion/completions/portfwd"):
        assert os.path.isfile(root.file(path))


def test_installed_hook_makes_the_forward(root: DebRoot) -> None:
    root.write("/etc/portfwd/forward.toml", CONFIG)
    r = root.sh("portfwd check")
    assert r.returncode == 0, r.stderr
    assert b"OK: 1 port forward(s) for 1 guest(s)" in r.stdout
    for op in ("prepare", "start", "started"):
        r = root.hook("pfdeb", op)
        assert (r.returncode, r.stdout) == (0, b""), r.stderr
    assert b"guest pfdeb started: 1 forward(s) in table inet portfwd" in r.stderr
    table = root.sh("nft -j list table inet portfwd").stdout.decode()
    assert GUEST4 in table and "8080" in table
    r = root.sh("portfwd status --json")
    assert r.returncode == 0, r.stderr
    rows = json.loads(r.stdout)["forwards"]
    assert [(row["guest"], row["target"]) for row in rows] == [("pfdeb", f"{GUEST4}:80")]
    assert root.hook("pfdeb", "stopped", "end").returncode == 0
    assert GUEST4 not in root.sh("nft -j list table inet portfwd").stdout.decode()
    assert root.hook("pfdeb", "started").returncode == 0  # running again, for remove


def test_remove_takes_the_table_away_and_keeps_the_configuration(root: DebRoot) -> None:
    assert "table inet portfwd" in root.tables()
    r = root.apt("remove portfwd")
    assert r.returncode == 0, r.stdout.decode()[-3000:] + r.stderr.decode()
    assert "table inet portfwd" not in root.tables()
    with open(root.file("/etc/portfwd/forward.toml")) as f:
        assert f.read() == CONFIG
    for gone in ("/usr/sbin/portfwd", "/etc/libvirt/hooks/qemu.d/portfwd",
                 "/etc/libvirt/hooks/network.d/portfwd", "/usr/lib/python3/dist-packages/portfwd"):
        assert not os.path.lexists(root.file(gone))


def test_purge_takes_the_configuration_away(root: DebRoot) -> None:
    assert os.path.isdir(root.file("/run/portfwd"))
    r = root.apt("purge portfwd")
    assert r.returncode == 0, r.stdout.decode()[-3000:] + r.stderr.decode()
    for gone in ("/etc/portfwd", "/run/portfwd"):
        assert not os.path.lexists(root.file(gone))
    assert root.sh("dpkg -s portfwd", check=False).returncode != 0


# -- over an earlier install with pip ----------------------------------------------------

def test_install_over_a_pip_install_keeps_its_configuration(
        deb: Tuple[str, str], tmp_path_factory: pytest.TempPathFactory) -> None:
    """`portfwd install` left a forward.toml and hook files no package owns: apt installs
    without a conffile prompt, keeps the admin's file, and puts its hooks in place."""
    lab = DebRoot(str(tmp_path_factory.mktemp("pip")), "bookworm", deb[0])
    try:
        lab.write("/etc/portfwd/forward.toml", CONFIG)
        for kind in ("qemu", "network"):
            lab.write(f"/etc/libvirt/hooks/{kind}.d/portfwd", "#!/bin/sh\nexit 0\n", 0o755)
        r = lab.apt(f"install {lab.deb}")
        assert r.returncode == 0, r.stdout.decode()[-3000:] + r.stderr.decode()
        with open(lab.file("/etc/portfwd/forward.toml")) as f:
            assert f.read() == CONFIG
        assert os.listdir(lab.file("/etc/portfwd")) == ["forward.toml"]
        assert os.readlink(lab.file("/etc/libvirt/hooks/qemu.d/portfwd")) == \
            "/usr/lib/portfwd/hooks/qemu"
        # dpkg knows the file as the admin's changed conffile: upgrades ask, never overwrite
        r = lab.sh("dpkg-query -W -f='${Conffiles}' portfwd")
        assert r.stdout.decode().split()[0] == "/etc/portfwd/forward.toml"
        r = lab.sh("portfwd check")
        assert r.returncode == 0 and b"OK: 1 port forward(s)" in r.stdout, r.stderr
        # and a second install (reinstall) asks nothing either
        r = lab.apt(f"install --reinstall {lab.deb}")
        assert r.returncode == 0, r.stdout.decode()[-3000:] + r.stderr.decode()
    finally:
        lab.close()


# -- libvirt learns of the hooks ---------------------------------------------------------

# systemd cannot run as PID 1 in these roots: a stand-in for /usr/bin/systemctl (in the
# overlay) says libvirtd is active and logs what it is asked
SYSTEMCTL = """#!/bin/sh
echo "$*" >> /tmp/systemctl.log
case "$*" in
    *is-enabled*) echo enabled ;;
    *is-active*libvirtd.service*) exit 0 ;;
    *is-active*) exit 3 ;;
esac
exit 0
"""


@pytest.mark.parametrize("opt_in", [False, True], ids=["default", "opted in"])
def test_first_install_tells_or_restarts_libvirtd(deb: Tuple[str, str], opt_in: bool,
                                                  tmp_path_factory: pytest.TempPathFactory) -> None:
    lab = DebRoot(str(tmp_path_factory.mktemp("restart")), "bookworm", deb[0])
    try:
        os.unlink(lab.file("/usr/bin/systemctl"))
        lab.write("/usr/bin/systemctl", SYSTEMCTL, 0o755)
        os.makedirs(lab.file("/run/systemd/system"))
        if opt_in:
            lab.sh("echo 'portfwd portfwd/restart-libvirt boolean true' | debconf-set-selections")
        r = lab.apt(f"install {lab.deb}")
        assert r.returncode == 0, r.stdout.decode()[-3000:] + r.stderr.decode()
        with open(lab.file("/tmp/systemctl.log")) as f:
            calls = f.read().splitlines()
        restarts = [c for c in calls if re.search(r"\brestart libvirtd\.service$", c)]
        told = ("portfwd: libvirt finds hooks only when it starts: run 'systemctl restart"
                " libvirtd.service' once (running guests keep running).")
        output = r.stdout.decode() + r.stderr.decode()
        assert (len(restarts), told in output) == ((1, False) if opt_in else (0, True)), calls
        assert [c for c in calls if re.search(r"\bstart portfwd\.service$", c)], calls
        # an upgrade (here: the same version again) neither restarts nor tells again
        os.unlink(lab.file("/tmp/systemctl.log"))
        r = lab.apt(f"install --reinstall {lab.deb}")
        assert r.returncode == 0, r.stderr.decode()
        with open(lab.file("/tmp/systemctl.log")) as f:
            assert not [c for c in f.read().splitlines() if "libvirtd.service" in c
                        and "is-active" not in c]
        assert told not in r.stdout.decode() + r.stderr.decode()
        # dpkg-reconfigure asks again; a yes restarts now
        lab.sh("echo 'portfwd portfwd/restart-libvirt boolean true' | debconf-set-selections")
        lab.sh("dpkg-reconfigure -f noninteractive portfwd </dev/null")
        with open(lab.file("/tmp/systemctl.log")) as f:
            calls = f.read().splitlines()
        assert len([c for c in calls if re.search(r"\brestart libvirtd\.service$", c)]) == 1
    finally:
        lab.close()
