"""The Debian package: built from the checkout with Debian's tools, clean for lintian,
installed with apt into a Debian 12 root and into a Debian 13 root (Python 3.11 and
3.13: the same .deb survives a Python minor upgrade), where its hook makes the
forward's rules; removed (table gone, configuration kept) and purged (configuration
gone); installed over an earlier pip install without a conffile prompt.

The roots are cached mmdebstrap roots (trixielab.cached_root; the Debian 13 one is the
one test_trixie.py uses) mounted as overlays, each in a network namespace of its own.
"""

from __future__ import annotations

import json
import os
import re
import stat
import subprocess
import time
from typing import Iterator, List, Tuple

import pytest

from portfwd.commands import installpaths

from deblab import APT, CHECKOUT, DebRoot, build, git_status, version
from netlab import GUEST4, run
from pfhost import domain_xml
from trixielab import SUITE

pytestmark = [pytest.mark.kernel, pytest.mark.deb]

CONFIG = f"""
[[forward]]
guest = "pfdeb"
ipv4  = "{GUEST4}"
ports = ["8080:80"]
"""
HOOKS = ("/etc/libvirt/hooks/qemu.d/portfwd", "/etc/libvirt/hooks/network.d/portfwd")


def hook(root: DebRoot, guest: str, op: str, sub: str = "begin"
         ) -> "subprocess.CompletedProcess[bytes]":
    """The installed qemu hook run as libvirt runs it: argv and the domain on stdin."""
    return run(*root.argv("/etc/libvirt/hooks/qemu.d/portfwd", guest, op, sub, "-"),
               input=domain_xml(guest), check=False)


def tables(root: DebRoot) -> List[str]:
    return root.sh("nft list tables").stdout.decode().split("\n")


@pytest.fixture(scope="module")
def deb(tmp_path_factory: pytest.TempPathFactory) -> Tuple[str, str]:
    """(the built .deb, the checkout's git status before the build)."""
    before = git_status()
    started = time.monotonic()
    path = build(str(tmp_path_factory.mktemp("deb")))
    print(f"\nbuilt {os.path.basename(path)} ({os.path.getsize(path)} bytes)"
          f" in {time.monotonic() - started:.1f} s")
    return path, before


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
                 "./usr/lib/portfwd/hooks/qemu", "./usr/lib/portfwd/hooks/network"):
        assert path in listing
    assert "/usr/bin/" not in listing and "/usr/local/" not in listing
    # the second manual page, the README with docs/ and the commented example beside them
    # (dh_compress gzips what is larger than 4 kB)
    names = {line.split()[-1] for line in listing.splitlines()}
    for path in ["./usr/share/man/man5/forward.toml.5", "./usr/share/doc/portfwd/README.md",
                 "." + installpaths.DEB_EXAMPLE] + [
                     f"./usr/share/doc/portfwd/docs/{name}"
                     for name in os.listdir(os.path.join(CHECKOUT, "docs"))]:
        assert path in names or path + ".gz" in names, path
    # what libvirt executes is a file in /etc (its AppArmor profile refuses /usr/lib)
    entries = {line.split()[-1]: line.split()[0] for line in listing.splitlines()}
    for path in HOOKS:
        assert entries["." + path] == "-rwxr-xr-x", listing
    conffiles = run("dpkg-deb", "-I", deb[0], "conffiles").stdout.decode().split()
    assert sorted(conffiles) == sorted(HOOKS + ("/etc/portfwd/forward.toml",))
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
    for kind, path in zip(("qemu", "network"), HOOKS):
        assert_hook_file(root, path, 0o755)
        with open(root.file(path)) as f:
            assert f'\nhook=/usr/lib/portfwd/hooks/{kind}\n' in f.read()
        with open(root.file(f"/usr/lib/portfwd/hooks/{kind}")) as f:
            assert "\npy=/usr/bin/python3\n" in f.read()
    for unit in ("portfwd.service", "portfwd-sync.service", "portfwd-reapply.service"):
        with open(root.file(f"/lib/systemd/system/{unit}")) as f:
            assert "ExecStart=/usr/sbin/portfwd " in f.read()
        assert os.path.lexists(root.file(f"/etc/systemd/system/multi-user.target.wants/{unit}"))
    # the conffile forwards nothing until the admin says so
    r = root.sh("portfwd check")
    assert r.returncode == 0, r.stderr
    assert b"OK: 0 port forwards for 0 guests" in r.stdout
    for path in ("/usr/share/man/man8/portfwd.8.gz", "/usr/share/man/man5/forward.toml.5.gz",
                 "/usr/share/bash-completion/completions/portfwd", installpaths.DEB_EXAMPLE):
        assert os.path.isfile(root.file(path))
    # a missing configuration points at the example the package ships
    r = root.sh("portfwd check -c /etc/portfwd/missing.toml", check=False)
    assert r.returncode == 1
    assert f"no such file; create it (see {installpaths.DEB_EXAMPLE})".encode() in r.stderr


def test_installed_hook_makes_the_forward(root: DebRoot) -> None:
    root.write("/etc/portfwd/forward.toml", CONFIG)
    r = root.sh("portfwd check")
    assert r.returncode == 0, r.stderr
    assert b"OK: 1 port forward for 1 guest" in r.stdout
    for op in ("prepare", "start", "started"):
        r = hook(root, "pfdeb", op)
        assert (r.returncode, r.stdout) == (0, b""), r.stderr
    assert b"guest pfdeb started: 1 forward(s) in table inet portfwd" in r.stderr
    table = root.sh("nft -j list table inet portfwd").stdout.decode()
    assert GUEST4 in table and "8080" in table
    r = root.sh("portfwd status --json")
    assert r.returncode == 0, r.stderr
    rows = json.loads(r.stdout)["forwards"]
    assert [(row["guest"], row["target"]) for row in rows] == [("pfdeb", f"{GUEST4}:80")]
    assert hook(root, "pfdeb", "stopped", "end").returncode == 0
    assert GUEST4 not in root.sh("nft -j list table inet portfwd").stdout.decode()
    assert hook(root, "pfdeb", "started").returncode == 0  # running again, for remove


def test_installed_hook_fails_a_start_only_when_strict(root: DebRoot) -> None:
    """Through the file in /etc, the hook under /usr/lib and its sh lines: a strict
    failure fails prepare (libvirt sees 1); reconnect never fails."""
    root.write("/etc/portfwd/forward.toml",
               "[options]\nstrict = true\n" + CONFIG.replace(GUEST4, "192.0.2.300"))
    for op, code in (("prepare", 1), ("start", 1), ("reconnect", 0)):
        r = hook(root, "pfdeb", op)
        assert (r.returncode, r.stdout) == (code, b""), (op, r.stderr)
        assert (b"strict = true: failing the start" in r.stderr) == (code == 1), r.stderr
    root.write("/etc/portfwd/forward.toml", CONFIG)
    assert hook(root, "pfdeb", "started").returncode == 0


# a stand-in for /usr/sbin/portfwd (prerm runs `portfwd flush`): says whether libvirt
# could still run a hook, and whether a hook is still running, when the flush starts
FLUSH_WITNESS = """#!/bin/sh
if [ "$1" = flush ]; then
    for hook in /etc/libvirt/hooks/qemu.d/portfwd /etc/libvirt/hooks/network.d/portfwd; do
        if [ -x "$hook" ]; then echo "$hook executable"; fi
    done
    case $(cut -d ' ' -f 3 "/proc/$(cat /tmp/hook.pid)/stat" 2>/dev/null) in
        "" | Z) ;;  # gone, or a zombie its parent (the test) has not reaped yet
        *) echo "hook running" ;;
    esac
fi >>/tmp/flush.log
exec python3 -m portfwd.cli "$@"
"""
# a hook libvirt started before the removal, still running (until /tmp/release exists)
RUNNING_HOOK = ("echo $$ >/tmp/hook.pid; while [ ! -e /tmp/release ]; do sleep 0.1; done",
                "/usr/lib/portfwd/hooks/qemu")


def test_remove_disables_the_hooks_then_takes_the_table_away(root: DebRoot) -> None:
    """prerm takes the hooks' execute permission away (libvirt runs only executable
    hooks), waits for a hook that is still running, then flushes; the configuration
    stays, and the hooks stay as disabled conffiles until purge."""
    assert "table inet portfwd" in tables(root)
    os.unlink(root.file("/usr/sbin/portfwd"))
    root.write("/usr/sbin/portfwd", FLUSH_WITNESS, 0o755)
    running = subprocess.Popen(root.argv("sh", "-c", *RUNNING_HOOK))
    removal = subprocess.Popen(root.argv("sh", "-c", f"{APT} remove portfwd </dev/null"),
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 120
        while any(os.stat(root.file(h)).st_mode & 0o111 for h in HOOKS):
            assert removal.poll() is None and time.monotonic() < deadline, "hooks still enabled"
            time.sleep(0.1)
        root.write("/tmp/release", "")
        output = removal.communicate(timeout=120)[0].decode()
        assert removal.returncode == 0, output[-3000:]
    finally:
        root.write("/tmp/release", "")
        running.wait(timeout=30)
        if removal.poll() is None:
            removal.kill()
            removal.wait()
    with open(root.file("/tmp/flush.log")) as f:
        assert f.read() == ""  # no hook libvirt could run, none running
    assert "table inet portfwd" not in tables(root)
    with open(root.file("/etc/portfwd/forward.toml")) as f:
        assert f.read() == CONFIG
    for gone in ("/usr/sbin/portfwd", "/usr/lib/portfwd", "/usr/lib/python3/dist-packages/portfwd"):
        assert not os.path.lexists(root.file(gone))
    for path in HOOKS:  # conffiles: kept until purge, not executable, and inert anyway
        assert_hook_file(root, path, 0o644)
        r = run(*root.argv("sh", path, "pfdeb", "started", "begin", "-"),
                input=domain_xml("pfdeb"), check=False)
        assert (r.returncode, r.stdout, r.stderr) == (0, b"", b"")
    assert "table inet portfwd" not in tables(root)


def test_install_after_remove_enables_the_hooks_again(root: DebRoot) -> None:
    r = root.apt(f"install {root.deb}")
    assert r.returncode == 0, r.stdout.decode()[-3000:] + r.stderr.decode()
    for path in HOOKS:
        assert_hook_file(root, path, 0o755)
    assert hook(root, "pfdeb", "started").returncode == 0
    assert "table inet portfwd" in tables(root)
    r = root.apt("remove portfwd")
    assert r.returncode == 0, r.stdout.decode()[-3000:] + r.stderr.decode()
    assert "table inet portfwd" not in tables(root)


def test_purge_takes_the_configuration_and_the_hooks_away(root: DebRoot) -> None:
    assert os.path.isdir(root.file("/run/portfwd"))
    r = root.apt("purge portfwd")
    assert r.returncode == 0, r.stdout.decode()[-3000:] + r.stderr.decode()
    for gone in ("/etc/portfwd", "/run/portfwd") + HOOKS:
        assert not os.path.lexists(root.file(gone))
    assert root.sh("dpkg -s portfwd", check=False).returncode != 0


def assert_hook_file(root: DebRoot, path: str, mode: int) -> None:
    """``path`` is a regular file with ``mode``, alone in its directory (no link, no
    .dpkg-new or set-aside copy beside it)."""
    st = os.lstat(root.file(path))
    assert stat.S_ISREG(st.st_mode) and stat.S_IMODE(st.st_mode) == mode, (path, oct(st.st_mode))
    assert os.listdir(os.path.dirname(root.file(path))) == ["portfwd"]


# -- over an earlier install with pip ----------------------------------------------------

def test_install_over_a_pip_install_keeps_its_configuration(
        deb: Tuple[str, str], tmp_path_factory: pytest.TempPathFactory) -> None:
    """`portfwd install` left a forward.toml and hook files no package owns: apt installs
    without a conffile prompt, keeps the admin's file, and puts its hooks in place."""
    lab = DebRoot(str(tmp_path_factory.mktemp("pip")), "bookworm", deb[0])
    try:
        lab.write("/etc/portfwd/forward.toml", CONFIG)
        for kind, path in zip(("qemu", "network"), HOOKS):
            with open(os.path.join(CHECKOUT, "hook", kind)) as f:  # as `portfwd install` writes it
                lab.write(path, f.read().replace("\npy=/usr/bin/python3\n",
                                                 "\npy=/opt/portfwd/bin/python3\n"), 0o755)
        r = lab.apt(f"install {lab.deb}")
        assert r.returncode == 0, r.stdout.decode()[-3000:] + r.stderr.decode()
        with open(lab.file("/etc/portfwd/forward.toml")) as f:
            assert f.read() == CONFIG
        assert os.listdir(lab.file("/etc/portfwd")) == ["forward.toml"]
        for kind, path in zip(("qemu", "network"), HOOKS):  # the package's, nothing beside
            assert_hook_file(lab, path, 0o755)
            with open(lab.file(path)) as f:
                assert f'\nhook=/usr/lib/portfwd/hooks/{kind}\n' in f.read()
        # dpkg knows the file as the admin's changed conffile: upgrades ask, never overwrite
        r = lab.sh("dpkg-query -W -f='${Conffiles}' portfwd")
        assert "/etc/portfwd/forward.toml" in r.stdout.decode().split()
        r = lab.sh("portfwd check")
        assert r.returncode == 0 and b"OK: 1 port forward" in r.stdout, r.stderr
        # and a second install (reinstall) asks nothing either
        r = lab.apt(f"install --reinstall {lab.deb}")
        assert r.returncode == 0, r.stdout.decode()[-3000:] + r.stderr.decode()
    finally:
        lab.close()


# -- over portfwd 0.1.0, whose hooks were links into /usr/lib ------------------------------

def installed_with_a_forward(lab: DebRoot, deb: str) -> None:
    """``deb`` installed into ``lab`` and a forward of pfdeb applied by its hook."""
    r = lab.apt(f"install {lab.copy_in(deb)}")
    assert r.returncode == 0, r.stdout.decode()[-3000:] + r.stderr.decode()
    lab.write("/etc/portfwd/forward.toml", CONFIG)
    r = hook(lab, "pfdeb", "started")
    assert r.returncode == 0 and "table inet portfwd" in tables(lab), r.stderr


def test_upgrade_replaces_the_links_by_files(deb: Tuple[str, str], linked_deb: str,
                                             tmp_path_factory: pytest.TempPathFactory) -> None:
    """apt-get install of this .deb over 0.1.0 asks nothing and leaves files where the
    links were; a later upgrade whose old prerm fails (prerm failed-upgrade) keeps the
    hooks enabled and the forwards in place."""
    lab = DebRoot(str(tmp_path_factory.mktemp("upgrade")), "bookworm", deb[0])
    try:
        installed_with_a_forward(lab, linked_deb)
        for kind, path in zip(("qemu", "network"), HOOKS):
            assert os.readlink(lab.file(path)) == f"/usr/lib/portfwd/hooks/{kind}"
        r = lab.apt(f"install {lab.deb}")
        output = r.stdout.decode() + r.stderr.decode()
        assert r.returncode == 0, output[-3000:]
        assert "Configuration file" not in output and "dpkg-new" not in output, output
        for path in HOOKS:
            assert_hook_file(lab, path, 0o755)
        assert "table inet portfwd" in tables(lab)  # an upgrade removes no forward
        assert hook(lab, "pfdeb", "started").returncode == 0
        lab.write("/var/lib/dpkg/info/portfwd.prerm", "#!/bin/sh\nexit 1\n", 0o755)
        r = lab.apt(f"install --reinstall {lab.deb}")  # the old prerm fails: dpkg runs
        output = r.stdout.decode() + r.stderr.decode()  # the new one with failed-upgrade
        assert r.returncode == 0, output[-3000:]
        assert "trying script from the new package instead" in output, output[-3000:]
        for path in HOOKS:
            assert_hook_file(lab, path, 0o755)
        assert "table inet portfwd" in tables(lab)
    finally:
        lab.close()


def test_failed_upgrade_puts_the_links_back(deb: Tuple[str, str], linked_deb: str,
                                            tmp_path_factory: pytest.TempPathFactory) -> None:
    """An upgrade from 0.1.0 that dpkg aborts after preinst removed the links (here: a
    file of the new version belongs to another package) leaves 0.1.0 as it was."""
    lab = DebRoot(str(tmp_path_factory.mktemp("abort")), "bookworm", deb[0])
    try:
        installed_with_a_forward(lab, linked_deb)
        taken = "/usr/lib/python3/dist-packages/portfwd/host/apparmor.py"  # new since 0.1.0
        blocker = os.path.join(lab.base, "blocker")
        os.makedirs(os.path.join(blocker, "DEBIAN"))
        os.makedirs(os.path.dirname(blocker + taken))
        with open(blocker + taken, "w") as f:
            f.write("# someone else's\n")
        with open(os.path.join(blocker, "DEBIAN", "control"), "w") as f:
            f.write("Package: pfblocker\nVersion: 1\nArchitecture: all\n"
                    "Maintainer: tests <tests@example.org>\nDescription: owns a file\n")
        run("dpkg-deb", "--root-owner-group", "-b", blocker, blocker + ".deb")
        r = lab.apt(f"install {lab.copy_in(blocker + '.deb')}")
        assert r.returncode == 0, r.stdout.decode()[-3000:] + r.stderr.decode()
        r = lab.apt(f"install {lab.deb}")
        output = r.stdout.decode() + r.stderr.decode()
        assert r.returncode != 0 and "which is also in package pfblocker" in output, output
        assert lab.sh("dpkg-query -W -f='${Version} ${Status}' portfwd").stdout == \
            b"0.1.0 install ok installed"
        for kind, path in zip(("qemu", "network"), HOOKS):
            assert os.readlink(lab.file(path)) == f"/usr/lib/portfwd/hooks/{kind}"
        assert hook(lab, "pfdeb", "started").returncode == 0
        assert "table inet portfwd" in tables(lab)
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
