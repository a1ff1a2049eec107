"""libvirt's AppArmor profile against what portfwd's hooks execute.

First the reader (``portfwd.host.apparmor``), on cases taken from apparmor.d(5): globs,
variables, includes, deny and owner rules, child profiles. Then the real thing: the
profile files of Debian 12's and Debian 13's libvirt (``usr.sbin.libvirtd``, and
``usr.sbin.virtqemud``/``usr.sbin.virtnetworkd`` where a root has them), read with
their includes (the apparmor package's abstractions and tunables, fetched with apt:
the roots do not have that package), against every file the hooks execute, each
symlink resolved inside the root: for this .deb installed by apt (over 0.1.0, whose
hooks were links into /usr/lib and are refused: the check can fail), and for a pip
install (a venv of the root's python3 and ``portfwd install``; one made with
``--copies`` is refused). ``portfwd doctor``'s layer is checked on the same roots.
"""

from __future__ import annotations

import glob
import os
import shutil
import subprocess
from typing import Dict, Iterator, List, Optional, Tuple

import pytest

from deblab import PACKAGES, DebRoot, apparmor_dir, build
from netlab import run
from pfhost import ROOT, domain_xml
from portfwd.host import apparmor, compat, hookchain, pathwalk
from portfwd.commands import doctor, doctorfacts, installpaths
from portfwd.values import FirewallBackend
from trixielab import SUITE, cached_root

SUITES = ["bookworm", pytest.param(SUITE, marks=pytest.mark.trixie)]
HOOKS = {"qemu": "/etc/libvirt/hooks/qemu.d/portfwd",
         "network": "/etc/libvirt/hooks/network.d/portfwd"}


# -- globs (apparmor.d(5), "Globbing") ------------------------------------------------

@pytest.mark.parametrize("pattern, path, hit", [
    ("/dir/file", "/dir/file", True),
    ("/dir/file", "/dir/files", False),
    # * : any characters but /; a whole component is never empty
    ("/dir/*", "/dir/file", True),
    ("/dir/*", "/dir/", False),
    ("/dir/*", "/dir/sub/file", False),
    ("/dir/*bar", "/dir/bar", True),
    ("/dir/*bar", "/dir/foobar", True),
    ("/*/foo", "//foo", False),
    # ** : any characters, / included
    ("/dir/**", "/dir/sub/file", True),
    ("/dir/**", "/dir/", False),
    ("/dir/**/", "/dir/a/b/", True),
    ("/dir/**/", "/dir/a/b", False),
    ("/dir/**[^/]", "/dir/a/b", True),
    ("/dir/**[^/]", "/dir/a/b/", False),
    ("/dir/*/", "/dir/a/", True),
    ("/dir/*/", "/dir/a", False),
    # ? : one character but /
    ("/dir/?", "/dir/a", True),
    ("/dir/?", "/dir/ab", False),
    ("/dir/?", "/dir//", False),
    # character classes
    ("/dir/[abc]", "/dir/b", True),
    ("/dir/[abc]", "/dir/d", False),
    ("/dir/[a-c]x", "/dir/bx", True),
    ("/dir/[^a-c]", "/dir/b", False),
    ("/dir/[^a-c]", "/dir/z", True),
    # alternation, nested and empty
    ("/{usr/,}lib/udev/scsi_id", "/lib/udev/scsi_id", True),
    ("/{usr/,}lib/udev/scsi_id", "/usr/lib/udev/scsi_id", True),
    ("/usr/{lib,lib64,libexec}/xen/bin/*", "/usr/lib64/xen/bin/x", True),
    ("/usr/{lib,lib64,libexec}/xen/bin/*", "/usr/share/xen/bin/x", False),
    ("/{a,{b,c}d}/x", "/cd/x", True),
    # what is not a glob is literal; \ escapes; repeated slashes count as one
    ("/usr/bin/python3.11", "/usr/bin/python3x11", False),
    ("/dir/\\*", "/dir/*", True),
    ("/dir/\\*", "/dir/a", False),
    ("/a//b", "/a/b", True),
    # the rules of libvirtd's profile that matter here
    ("/etc/libvirt/hooks/**", "/etc/libvirt/hooks/qemu.d/portfwd", True),
    ("/usr/bin/*", "/usr/bin/python3.11", True),
    ("/usr/bin/*", "/usr/lib/portfwd/hooks/qemu", False),
    ("/usr/lib/libvirt/*", "/usr/lib/portfwd/hooks/qemu", False),
])
def test_glob(pattern: str, path: str, hit: bool) -> None:
    assert (apparmor.glob_regex(pattern).fullmatch(path) is not None) == hit


@pytest.mark.parametrize("pattern", ["/dir/{a,b", "/dir/[ab"])
def test_glob_refuses_what_is_not_closed(pattern: str) -> None:
    with pytest.raises(ValueError):
        apparmor.glob_regex(pattern)


def test_variables_expand_to_alternatives_and_lose_the_slashes_around_them() -> None:
    variables = {"HOMEDIRS": ["/home/"], "HOME": ["@{HOMEDIRS}/*/", "/root/"],
                 "multiarch": ["*-linux-gnu*"], "loop": ["@{loop}x"]}
    pattern = apparmor.expand("@{HOME}/.Private/**", variables)
    regex = apparmor.glob_regex(pattern)
    assert regex.fullmatch("/root/.Private/key") and regex.fullmatch("/home/ann/.Private/key")
    assert not regex.fullmatch("/home/.Private/key")
    lib = apparmor.glob_regex(apparmor.expand("/usr/lib/@{multiarch}/ld-*.so", variables))
    assert lib.fullmatch("/usr/lib/x86_64-linux-gnu/ld-2.36.so")
    for unknown in ("/x/@{nothing}/y", "/x/@{loop}"):
        with pytest.raises(KeyError):
            apparmor.expand(unknown, variables)
    assert apparmor.expand("/x/\\@{HOME}", variables) == "/x/\\@{HOME}"  # escaped: literal


# -- profiles ---------------------------------------------------------------------------

PROFILE = """#include <tunables/global>
# a comment, and a commented-out rule: /opt/** rix,
@{LIBEXEC} = /usr/libexec /usr/lib
@{LIBEXEC} += /usr/lib64
$debug = false

profile demo /usr/sbin/demo flags=(attach_disconnected) {
  #include <abstractions/base>
  include if exists <local/demo>
  include if exists <abstractions/missing>
  capability net_admin,
  network inet stream,
  signal (send) set=("kill", "term") peer=unconfined,
  mount options=(rw, nosuid) -> /{var/,}run/demo/*.dev/,
  dbus send
       bus=system
       member={Hello,AddMatch}
       peer=(name=org.freedesktop.DBus),
  /** rwmkl,
  /usr/bin/* PUx,
  @{LIBEXEC}/demo/* ix,
  ix /opt/first/*,
  file /opt/file/** Px -> other,
  audit deny /usr/bin/forbidden rwxl,
  owner /home/*/bin/* ix,
  /etc/demo/hooks/** rmix,  # a comment after a rule
  "/opt/with space/run" Ux,
  /usr/{lib,lib64}/helper Cx -> helper,
  profile helper {
    /usr/sbin/* ix,
  }
  ^hat {
    /usr/local/bin/* ix,
  }
}
"""
INCLUDED = {"tunables/global": "@{HOMEDIRS}=/home/\n",
            "abstractions/base": "  /usr/lib/ld-*.so mrix,\n  include <abstractions/nested>\n",
            "abstractions/nested": "  deny /usr/bin/nested x,\n"}


def include_from(files: Dict[str, str]) -> apparmor.Include:
    def include(name: str, quoted: bool, source: str) -> Optional[List[Tuple[str, str]]]:
        return [(name, files[name])] if name in files else None
    return include


def test_parse_keeps_the_profiles_own_exec_rules() -> None:
    profiles, problems = apparmor.parse(PROFILE, "demo", include_from(INCLUDED))
    assert problems == []  # `include if exists` may find nothing
    assert [(p.name, p.attachment) for p in profiles] == [("demo", "/usr/sbin/demo")]
    rules = {r.text: (r.mode, r.deny, r.owner) for r in profiles[0].rules}
    assert rules == {
        "/usr/lib/ld-*.so mrix": ("mrix", False, False),
        "deny /usr/bin/nested x": ("x", True, False),
        "/usr/bin/* PUx": ("PUx", False, False),
        "@{LIBEXEC}/demo/* ix": ("ix", False, False),
        "ix /opt/first/*": ("ix", False, False),
        "file /opt/file/** Px -> other": ("Px", False, False),
        "audit deny /usr/bin/forbidden rwxl": ("rwxl", True, False),
        "owner /home/*/bin/* ix": ("ix", False, True),
        "/etc/demo/hooks/** rmix": ("rmix", False, False),
        '"/opt/with space/run" Ux': ("Ux", False, False),
        "/usr/{lib,lib64}/helper Cx -> helper": ("Cx", False, False),
    }


def test_verdicts() -> None:
    (profile,), _ = apparmor.parse(PROFILE, "demo", include_from(INCLUDED))

    def verdict(path: str, owner: bool = True) -> Tuple[bool, Optional[str], Optional[str]]:
        v = apparmor.exec_verdict(profile, path, owner)
        return (v.allowed, v.allowed_by.text if v.allowed_by else None,
                v.denied_by.text if v.denied_by else None)

    assert verdict("/usr/bin/python3.11") == (True, "/usr/bin/* PUx", None)
    assert verdict("/etc/demo/hooks/qemu.d/x") == (True, "/etc/demo/hooks/** rmix", None)
    for path in ("/usr/libexec/demo/a", "/usr/lib/demo/a", "/usr/lib64/demo/a",
                 "/opt/first/a", "/opt/file/a/b", "/opt/with space/run", "/usr/lib64/helper"):
        assert verdict(path)[0], path
    # deny wins, from the profile or an abstraction
    assert verdict("/usr/bin/forbidden") == (False, "/usr/bin/* PUx",
                                             "audit deny /usr/bin/forbidden rwxl")
    assert verdict("/usr/bin/nested") == (False, "/usr/bin/* PUx", "deny /usr/bin/nested x")
    # owner rules hold only for the task's own files
    assert verdict("/home/ann/bin/tool") == (True, "owner /home/*/bin/* ix", None)
    assert verdict("/home/ann/bin/tool", owner=False) == (False, None, None)
    # reading (/** rwmkl) is not executing; a child profile's or hat's rules are not ours
    for path in ("/usr/lib/portfwd/hooks/qemu", "/usr/sbin/helper", "/usr/local/bin/x"):
        assert verdict(path) == (False, None, None), path


def test_parse_names_what_it_could_not_read() -> None:
    text = ("#include <tunables/global>\nprofile p {\n  include <abstractions/none>\n"
            "  @{UNKNOWN}/bin/* ix,\n  /usr/bin/{a,b ix,\n")
    profiles, problems = apparmor.parse(text, "p", include_from({}))
    assert [p.name for p in profiles] == ["p"] and profiles[0].rules == []
    assert problems == [
        "p:1: include <tunables/global>: no such file",
        "p:3: include <abstractions/none>: no such file",
        "p:4: unknown variable @{UNKNOWN} in: @{UNKNOWN}/bin/* ix",
        "p: unclosed { (a profile or block without its })",
    ]


# -- what a hook executes, inside a root ------------------------------------------------

def test_resolve_stays_inside_the_root(tmp_path: "os.PathLike[str]") -> None:
    root = str(tmp_path)
    os.makedirs(os.path.join(root, "usr/bin"))
    os.makedirs(os.path.join(root, "etc/alternatives"))
    os.symlink("usr/bin", os.path.join(root, "bin"))
    with open(os.path.join(root, "usr/bin/python3.11"), "w"):
        pass
    os.symlink("python3.11", os.path.join(root, "usr/bin/python3"))
    os.symlink("/usr/bin/python3", os.path.join(root, "etc/alternatives/py"))  # absolute
    os.symlink("../../bin/python3", os.path.join(root, "etc/alternatives/rel"))
    os.symlink("loop", os.path.join(root, "etc/loop"))
    assert pathwalk.resolve(root, "/bin/python3") == "/usr/bin/python3.11"
    assert pathwalk.resolve(root, "/etc/alternatives/py") == "/usr/bin/python3.11"
    assert pathwalk.resolve(root, "/etc/alternatives/rel") == "/usr/bin/python3.11"
    # .. after a symlink leaves where the link led, as the kernel does: /bin/.. is /usr
    assert pathwalk.resolve(root, "/bin/../bin/python3") == "/usr/bin/python3.11"
    for missing in ("/usr/bin/python3.13", "/bin/../etc/alternatives/py"):
        with pytest.raises(FileNotFoundError):
            pathwalk.resolve(root, missing)
    with pytest.raises(OSError):
        pathwalk.resolve(root, "/etc/loop")


def shell_tools_only(tmp: str) -> Dict[str, str]:
    """libvirt's environment for ``bash``, with a PATH holding only stand-ins for the
    tools ``SH_TOOLS`` names (each logs its name to tmp/ran, then runs the real one),
    and a command_not_found_handle that logs any other command (even one whose
    stderr goes to /dev/null)."""
    folder = os.path.join(tmp, "bin")
    os.makedirs(folder)
    log = os.path.join(tmp, "ran")
    for tool in hookchain.SH_TOOLS:
        with open(os.path.join(folder, tool), "w") as f:
            f.write(f'#!/bin/sh\necho {tool} >>{log}\nexec /usr/bin/{tool} "$@"\n')
        os.chmod(os.path.join(folder, tool), 0o755)
    bash_env = os.path.join(tmp, "bash_env")
    with open(bash_env, "w") as f:
        f.write(f'command_not_found_handle() {{ echo "missing $1" >>{log}; return 127; }}\n')
    return {"PATH": folder, "BASH_ENV": bash_env, "LC_ALL": "C", "HOME": "/root"}


def ran(tmp: str) -> List[str]:
    try:
        with open(os.path.join(tmp, "ran")) as f:
            return f.read().split("\n")[:-1]
    except FileNotFoundError:
        return []


@pytest.mark.parametrize("python, tools", [("missing", ["cat", "logger"]), ("fails", ["logger"])])
@pytest.mark.parametrize("kind", ["qemu", "network"])
def test_the_sh_lines_run_nothing_but_the_tools_hook_chain_checks(
        tmp_path: "os.PathLike[str]", kind: str, python: str, tools: List[str]) -> None:
    """hookchain.SH_TOOLS is all the hooks' sh lines run besides their interpreter: with
    nothing else on PATH, both of their error paths run them and nothing else."""
    tmp = str(tmp_path)
    env = shell_tools_only(tmp)
    # a guest with a record: the network hook's sh lines hand the call to Python
    env["PORTFWD_RUNDIR"] = os.path.join(tmp, "run")
    os.makedirs(os.path.join(tmp, "run", "guests"), mode=0o700)
    open(os.path.join(tmp, "run", "guests", "web1.json"), "w").close()
    py = os.path.join(tmp, "python")
    if python == "fails":
        with open(py, "w") as f:
            f.write("#!/bin/sh\nexit 1\n")
        os.chmod(py, 0o755)
    with open(os.path.join(ROOT, "hook", kind)) as f:
        text = f.read().replace("\npy=/usr/bin/python3\n", f"\npy={py}\n")
    hook = os.path.join(tmp, kind)
    with open(hook, "w") as f:
        f.write(text)
    r = subprocess.run(["/bin/bash", hook, "web1", "started", "begin", "-"], input=domain_xml("web1"),
                       env=env, capture_output=True)
    assert (r.returncode, r.stdout) == (0, b""), r.stderr
    assert r.stderr.decode().startswith("portfwd: error: ") and r.stderr.count(b"\n") == 1
    assert ran(tmp) == tools


def test_the_package_wrapper_runs_nothing_but_sh_and_cat(tmp_path: "os.PathLike[str]") -> None:
    """debian/libvirt-hook: with the hook under /usr/lib gone (package removed, not
    purged) it reads its input with cat and exits 0; else it hands over to /bin/sh."""
    tmp = str(tmp_path)
    with open(os.path.join(ROOT, "debian", "libvirt-hook")) as f:  # as debian/rules fills it in
        text = f.read().replace("@HOOK@", f"{installpaths.DEB_HOOK_LIB}/qemu").replace(
            "@KIND@", "qemu")
    assert '\nhook=/usr/lib/portfwd/hooks/qemu\n' in text
    assert text.endswith('\nexec /bin/sh "$hook" "$@"\n')
    hook = os.path.join(tmp, "portfwd")
    with open(hook, "w") as f:
        f.write(text.replace("/usr/lib/portfwd/hooks/qemu", os.path.join(tmp, "gone")))
    r = subprocess.run(["/bin/bash", hook, "web1", "started", "begin", "-"],
                       input=domain_xml("web1") * 10000, env=shell_tools_only(tmp),
                       capture_output=True)
    assert (r.returncode, r.stdout, r.stderr) == (0, b"", b"")
    assert ran(tmp) == ["cat"]


def test_hook_tools_are_the_iptables_tools_compat_runs(monkeypatch: pytest.MonkeyPatch) -> None:
    """hookchain.HOOK_TOOLS holds every program compat.py looks up (on PATH) and runs."""
    asked: List[str] = []
    for found in (True, False):
        def which(name: str, found: bool = found) -> Optional[str]:
            asked.append(name)
            return f"/usr/sbin/{name}" if found else None

        monkeypatch.setattr(compat, "which", which)
        asked += [compat._tool(fam, xt) for fam in (4, 6) for xt in (
            FirewallBackend.IPTABLES_LEGACY, FirewallBackend.IPTABLES_NFT)]
    assert set(asked) == set(hookchain.HOOK_TOOLS)


# -- Debian 12 and 13: the real profiles, the real installs ---------------------------

def read_libvirt_profiles(tree: str, suite: str) -> List[Tuple[str, apparmor.Profile, Tuple[str, ...]]]:
    """Every libvirt daemon profile of the root ``tree``, asserted to read completely."""
    out: List[Tuple[str, apparmor.Profile, Tuple[str, ...]]] = []
    for name, kinds in apparmor.LIBVIRT_PROFILES:
        read = apparmor.read_profiles(tree, name, [apparmor_dir(suite)])
        if read is None:
            continue
        assert read.problems == [], read.problems
        out += [(read.path, p, kinds) for p in read.profiles]
    return out


@pytest.mark.kernel
@pytest.mark.deb
@pytest.mark.parametrize("suite", SUITES)
def test_the_libvirt_profiles_of_debian(suite: str) -> None:
    """The profile files as Debian ships them read without a gap, and say what the
    exec chain of a hook is held against."""
    tree = cached_root(suite, PACKAGES[suite])
    profiles = read_libvirt_profiles(tree, suite)
    present = sorted(os.path.basename(p) for p in glob.glob(os.path.join(
        tree, "etc/apparmor.d/usr.sbin.*")) if "virt" in p)
    assert sorted({os.path.basename(path) for path, _, _ in profiles}) == present
    assert "usr.sbin.libvirtd" in present
    libvirtd = next(p for path, p, _ in profiles if path.endswith("usr.sbin.libvirtd"))
    assert libvirtd.name == "libvirtd" and libvirtd.attachment == "/usr/sbin/libvirtd"
    texts = {r.text for r in libvirtd.rules}
    assert {"/etc/libvirt/hooks/** rmix", "/usr/bin/* PUx", "/bin/* PUx",
            "/usr/sbin/* PUx"} <= texts
    for path, allowed in (("/etc/libvirt/hooks/qemu.d/portfwd", True),
                          ("/usr/bin/python3", True), ("/usr/sbin/xtables-nft-multi", True),
                          ("/usr/lib/portfwd/hooks/qemu", False),
                          ("/opt/portfwd/bin/python3", False),
                          ("/usr/local/sbin/iptables", False),
                          ("/usr/sbin/apparmor_parser", False)):  # denied outright
        assert apparmor.exec_verdict(libvirtd, path).allowed == allowed, path


def check_chains(root: DebRoot, method: str) -> Dict[str, List[hookchain.Step]]:
    """Every file the two hooks execute, each allowed by every libvirt profile of the
    root that runs hooks of that kind; the chains, for more checks."""
    profiles = read_libvirt_profiles(root.tree, root.suite)
    chains = {kind: hookchain.hook_chain(root.tree, path) for kind, path in HOOKS.items()}
    for kind, steps in chains.items():
        assert [s for s in steps if s.real is None] == [], [s.named for s in steps]
        for source, profile, kinds in profiles:
            if kind in kinds:
                for step in steps:
                    v = apparmor.exec_verdict(profile, str(step.real), owner=step.uid == 0)
                    assert v.allowed, (f"{method}: {source} refuses {step.role} {step.named}"
                                       f" ({step.real})")
    return chains


def roles(steps: List[hookchain.Step]) -> List[Tuple[str, str]]:
    return [(s.role, str(s.real)) for s in steps]


def python_of(root: DebRoot) -> str:
    """/usr/bin/python3.X of the root."""
    return pathwalk.resolve(root.tree, "/usr/bin/python3")


def assert_tools(root: DebRoot, steps: List[hookchain.Step]) -> None:
    tools = {str(s.real) for s in steps if s.role == "tool"}
    assert {"/usr/bin/cat", "/usr/bin/logger", "/usr/sbin/xtables-nft-multi",
            "/usr/sbin/xtables-legacy-multi"} <= tools, tools


def doctor_layer(root: DebRoot) -> doctor.Check:
    confinement = doctorfacts.confinement(root.tree, enforcing=True,
                                          extra_dirs=[apparmor_dir(root.suite)])
    assert confinement is not None
    return doctor.hooks_check(confinement)


def assert_doctor_refuses(root: DebRoot, detail: str, fix: str) -> None:
    """doctor's hooks layer fails, its detail starting with ``detail``, its fix
    holding ``fix``."""
    layer = doctor_layer(root)
    assert not layer.ok and layer.detail.startswith(detail), layer.detail
    assert fix in layer.fix, layer.fix


def assert_hook_runs_quietly(root: DebRoot) -> None:
    """The qemu hook, run as libvirt runs it, works (and has nothing to say)."""
    r = run(*root.argv(HOOKS["qemu"], "web1", "prepare", "begin", "-"),
            input=domain_xml("web1"), check=False)
    assert (r.returncode, r.stdout, r.stderr) == (0, b"", b"")


@pytest.fixture(scope="module")
def deb(tmp_path_factory: pytest.TempPathFactory) -> str:
    return build(str(tmp_path_factory.mktemp("deb")))


@pytest.mark.kernel
@pytest.mark.deb
@pytest.mark.parametrize("suite", SUITES)
def test_package_hooks(suite: str, deb: str, linked_deb: str,
                       tmp_path_factory: pytest.TempPathFactory) -> None:
    """0.1.0's links into /usr/lib are refused (libvirtd may not execute the target,
    and doctor says so); this package, installed over it, is allowed throughout."""
    root = DebRoot(str(tmp_path_factory.mktemp(suite)), suite, deb)
    try:
        r = root.apt(f"install {root.copy_in(linked_deb)}")
        assert r.returncode == 0, r.stdout.decode()[-3000:] + r.stderr.decode()
        libvirtd = read_libvirt_profiles(root.tree, suite)[0][1]
        for kind, path in HOOKS.items():
            steps = hookchain.hook_chain(root.tree, path)
            refused = apparmor.refusal(libvirtd, steps)
            assert refused is not None
            step, verdict = refused
            assert (step.role, step.named, step.real, step.via_symlink) == (
                "hook", path, f"/usr/lib/portfwd/hooks/{kind}", True)
            assert verdict.allowed_by is None and verdict.denied_by is None
        assert_doctor_refuses(root, f"{HOOKS['qemu']} is a symlink to /usr/lib/portfwd/hooks/qemu,"
                                    " and libvirt's AppArmor profile usr.sbin.libvirtd refuses it",
                              "upgrade portfwd's Debian package")

        r = root.apt(f"install {root.deb}")
        assert r.returncode == 0, r.stdout.decode()[-3000:] + r.stderr.decode()
        chains = check_chains(root, "deb")
        dash, python = pathwalk.resolve(root.tree, "/bin/sh"), python_of(root)
        for kind, path in HOOKS.items():
            assert roles(chains[kind])[:4] == [("hook", path), ("interpreter", dash),
                                               ("shell", dash), ("python", python)]
            assert_tools(root, chains[kind])
        assert doctor_layer(root).ok
        assert_hook_runs_quietly(root)
    finally:
        root.close()


def pip_install(root: DebRoot, copies: bool) -> str:
    """portfwd of this checkout in a venv of the root's python3 (on its path by a .pth
    file, as an editable pip install does), then ``portfwd install``; the venv's python."""
    src = root.file("/opt/portfwd-src")
    if not os.path.isdir(src):
        os.makedirs(src)
        for part in ("pyproject.toml", "src", "hook", "config", "systemd"):
            if os.path.isdir(os.path.join(ROOT, part)):
                shutil.copytree(os.path.join(ROOT, part), os.path.join(src, part), symlinks=True,
                                ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
            else:
                shutil.copy2(os.path.join(ROOT, part), os.path.join(src, part))
    venv = "/opt/portfwd-copies" if copies else "/opt/portfwd"
    root.sh(f"python3 -m venv --without-pip --system-site-packages {'--copies' if copies else ''}"
            f" {venv}")
    site, = glob.glob(root.file(f"{venv}/lib/python3*/site-packages"))
    with open(os.path.join(site, "portfwd-src.pth"), "w") as f:
        f.write("/opt/portfwd-src/src\n")
    r = root.sh(f"{venv}/bin/python3 -m portfwd.cli install", check=False)
    assert r.returncode == 0, r.stderr.decode()
    return f"{venv}/bin/python3"


@pytest.mark.kernel
@pytest.mark.deb
@pytest.mark.parametrize("suite", SUITES)
def test_pip_install_hooks(suite: str, deb: str, tmp_path_factory: pytest.TempPathFactory) -> None:
    """The hooks `portfwd install` writes name the venv's python, a link to the root's
    /usr/bin/python3: allowed throughout. A venv made with --copies has its own python
    binary in /opt, which the profile refuses, and doctor says what to do."""
    root = DebRoot(str(tmp_path_factory.mktemp(suite)), suite, deb)
    try:
        venv_python = pip_install(root, copies=False)
        chains = check_chains(root, "pip")
        dash, python = pathwalk.resolve(root.tree, "/bin/sh"), python_of(root)
        for kind, path in HOOKS.items():
            assert roles(chains[kind])[:3] == [("hook", path), ("interpreter", dash),
                                               ("python", python)]
            assert chains[kind][2].named == venv_python and chains[kind][2].via_symlink
            assert_tools(root, chains[kind])
        assert doctor_layer(root).ok
        assert_hook_runs_quietly(root)

        copied = pip_install(root, copies=True)
        steps = hookchain.hook_chain(root.tree, HOOKS["qemu"])
        refused = apparmor.refusal(read_libvirt_profiles(root.tree, suite)[0][1], steps)
        assert refused is not None and (refused[0].role, refused[0].real) == ("python", copied)
        assert_doctor_refuses(root, f"{HOOKS['qemu']} runs {copied}, the python, and libvirt's"
                                    " AppArmor profile usr.sbin.libvirtd refuses it: no exec"
                                    " rule allows it",
                              "a venv made by /usr/bin/python3 -m venv")
        assert f"`{copied} PUx,`" in doctor_layer(root).fix
    finally:
        root.close()


# -- doctor, pure ----------------------------------------------------------------------

def test_doctor_says_nothing_when_libvirt_is_not_confined(tmp_path: "os.PathLike[str]") -> None:
    root = str(tmp_path)
    assert doctorfacts.confinement(root, enforcing=False) is None
    assert doctorfacts.confinement(root, enforcing=True) is None  # no profile, no hook
    host = doctor.HostFacts("1", "1", None, None)
    assert [c.layer for c in doctor.host_checks(host, [4])] == ["ipv4 forwarding"]


def test_doctor_names_a_refusing_deny_rule_and_stops_there() -> None:
    (profile,), _ = apparmor.parse(PROFILE, "/etc/apparmor.d/usr.sbin.demo",
                                   include_from(INCLUDED))
    steps = [hookchain.Step("hook", "/etc/demo/hooks/qemu.d/portfwd",
                           "/etc/demo/hooks/qemu.d/portfwd"),
             hookchain.Step("tool", "/usr/bin/forbidden", "/usr/bin/forbidden")]
    confinement = doctor.Confinement([("/etc/apparmor.d/usr.sbin.demo", profile, ("qemu",))],
                                     [("qemu", "/etc/demo/hooks/qemu.d/portfwd", steps)])
    host = doctor.HostFacts("1", "1", None, None, confinement)
    checks = doctor.walk(host, [])
    assert [(c.layer, c.ok) for c in checks] == [("hooks", False)]
    assert checks[0].detail == (
        "/etc/demo/hooks/qemu.d/portfwd runs /usr/bin/forbidden, the tool, and libvirt's"
        " AppArmor profile usr.sbin.demo refuses it: `audit deny /usr/bin/forbidden rwxl`"
        " denies executing it; every guest start fails")
    # a network hook is not held against a profile that runs only qemu hooks
    confinement.hooks = [("network", "/etc/demo/hooks/network.d/portfwd", steps)]
    checks = doctor.walk(host, [])
    assert [(c.layer, c.ok) for c in checks] == [("hooks", True), ("ipv4 forwarding", True)]
