"""The Debian package in the tests: built from this checkout with ``debian/build-deb``
(and portfwd 0.1.0, the last version whose hooks were links into /usr/lib, from git),
and Debian roots to install it into: cached mmdebstrap roots (trixielab.cached_root)
mounted as overlays, each in a network namespace of its own. Also the apparmor package's
abstractions and tunables of a suite, which libvirt's profiles include and the roots
lack (the apparmor package is not installed there).
"""

from __future__ import annotations

import glob
import itertools
import os
import re
import shutil
import subprocess
import tempfile
from typing import Optional

from netlab import run
from trixielab import ROOT_PACKAGES, ROOTS, SUITE, RootLab, cached_root, mirror

CHECKOUT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# what the package needs from Debian 12, plus libvirt (which it recommends)
BOOKWORM_PACKAGES = ["libvirt-daemon-system", "nftables", "python3-nftables", "python3-libvirt",
                     "iproute2"]
PACKAGES = {"bookworm": BOOKWORM_PACKAGES, SUITE: ROOT_PACKAGES}
APT = "DEBIAN_FRONTEND=noninteractive apt-get -q -y -o Dpkg::Use-Pty=0"
# the last commit of portfwd 0.1.0, whose package linked the hooks into /usr/lib
LINKED_HOOKS_COMMIT = "0e7b98528a88736a5c5a3762aa718a7add7799b4"


def version() -> str:
    with open(os.path.join(CHECKOUT, "debian", "changelog")) as f:
        m = re.match(r"portfwd \(([^)]+)\)", f.readline())
    assert m, "debian/changelog: no version on its first line"
    return m.group(1)


def git_status() -> str:
    return run("git", "-C", CHECKOUT, "status", "--porcelain", "--ignored").stdout.decode()


def build(out: str, source: str = CHECKOUT) -> str:
    """The .deb that ``source``'s debian/build-deb makes in ``out``."""
    r = run(os.path.join(source, "debian", "build-deb"), out, check=False)
    assert r.returncode == 0, r.stderr.decode()
    return r.stdout.decode().strip()


def build_linked(work: str) -> str:
    """portfwd 0.1.0's .deb (hooks linked into /usr/lib), built from git in ``work``."""
    source = os.path.join(work, "src")
    os.makedirs(source)
    archive = run("git", "-C", CHECKOUT, "archive", LINKED_HOOKS_COMMIT).stdout
    subprocess.run(["tar", "-x", "-C", source], input=archive, check=True)
    return build(os.path.join(work, "out"), source)


_roots = itertools.count()


class DebRoot(RootLab):
    """A Debian root of ``suite`` in its own network namespace, with the .deb at /tmp."""

    def __init__(self, base: str, suite: str, deb: str) -> None:
        tag = f"pfd{os.getpid() % 100000}x{next(_roots)}"  # one per root alive at once
        super().__init__(base, f"/mnt/{tag}")
        self.suite = suite
        self.netns = tag
        self.deb = f"/tmp/{os.path.basename(deb)}"
        self.installed: "Optional[subprocess.CompletedProcess[bytes]]" = None
        try:
            lower = cached_root(suite, PACKAGES[suite])
            run("ip", "netns", "add", self.netns)
            self.mount(lower, self.netns)
            self.copy_in(deb)
        except BaseException:
            self.close()
            raise

    def copy_in(self, deb: str) -> str:
        """Put ``deb`` at /tmp in the root; its path there."""
        shutil.copy(deb, self.file(f"/tmp/{os.path.basename(deb)}"))
        return f"/tmp/{os.path.basename(deb)}"

    def apt(self, args: str) -> "subprocess.CompletedProcess[bytes]":
        """apt-get as an admin runs it, without a terminal (a prompt would fail it)."""
        return run(*self.argv("sh", "-c", f"{APT} {args} </dev/null"), check=False)

    def write(self, path: str, text: str, mode: int = 0o644) -> None:
        os.makedirs(os.path.dirname(self.file(path)), exist_ok=True)
        with open(self.file(path), "w") as f:
            f.write(text)
        os.chmod(self.file(path), mode)

    @property
    def tree(self) -> str:
        """The root's file system as seen from here (for reading it)."""
        return self.file("/")

    def close(self) -> None:
        self.unmount()
        run("ip", "netns", "del", self.netns, check=False)


def apparmor_dir(suite: str) -> str:
    """/etc/apparmor.d of Debian ``suite``'s apparmor package (abstractions, tunables),
    fetched once with apt-get (an index of its own, Debian's mirror from this machine's
    sources, the root's keyring) and cached in ROOTS."""
    cache = os.path.join(ROOTS, f"apparmor-{suite}")
    found = os.path.join(cache, "etc", "apparmor.d")
    if os.path.isfile(os.path.join(found, "tunables", "global")):
        return found
    root = cached_root(suite, PACKAGES[suite])
    work = tempfile.mkdtemp(prefix=f"apparmor-{suite}.", dir=ROOTS)
    try:
        os.chmod(work, 0o755)  # apt's download user writes here
        keyring = os.path.join(root, "usr/share/keyrings/debian-archive-keyring.gpg")
        with open(os.path.join(work, "sources.list"), "w") as f:
            f.write(f"deb [signed-by={keyring}] {mirror()} {suite} main\n")
        options = ["-q", "-o", f"Dir::Etc::SourceList={work}/sources.list",
                   "-o", "Dir::Etc::SourceParts=/nonexistent", "-o", f"Dir::State={work}/state",
                   "-o", f"Dir::Cache={work}/cache", "-o", "Acquire::Languages=none",
                   "-o", f"Dir::State::status={root}/var/lib/dpkg/status"]
        os.makedirs(os.path.join(work, "state", "lists", "partial"))
        os.makedirs(os.path.join(work, "cache", "archives", "partial"))
        for args in (["update"], ["download", "apparmor"]):
            r = subprocess.run(["apt-get", *options, *args], cwd=work, capture_output=True)
            assert r.returncode == 0, r.stderr.decode()
        deb, = glob.glob(os.path.join(work, "apparmor_*.deb"))
        subprocess.run(["dpkg-deb", "-x", deb, os.path.join(work, "x")], check=True)
        try:
            os.rename(os.path.join(work, "x"), cache)
        except OSError:
            if not os.path.isfile(os.path.join(found, "tunables", "global")):
                raise  # not another run that cached it meanwhile
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return found
