"""portfwd add / remove on a real file: atomic, owner, mode and ACL kept, a symlink
stays a symlink, untrusted paths refused as check refuses them, a refused edit
touches nothing, concurrent adds all land; then the guest's forwards applied
(libvirt's test driver, real nftables) and shown as status shows them."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from typing import Dict, List

import pytest

from netlab import GUEST4
from pfhost import PortfwdHost

pytestmark = pytest.mark.kernel  # root: chown, ACLs, nftables

BEFORE = """# the admin's own words
[options]
strict = false   # aligned comment

[[forward]]
guest = "web1"
ipv4  = "192.168.122.10"
ports = [
  "8080:80",   # http
  "2222:22",
]
"""


def env_for(config: str, base: str) -> Dict[str, str]:
    return {"PATH": os.environ["PATH"], "LC_ALL": "C", "PORTFWD_CONFIG": config,
            "PORTFWD_RUNDIR": os.path.join(base, "run")}


def portfwd(env: Dict[str, str], *args: str) -> "subprocess.CompletedProcess[str]":
    return subprocess.run([sys.executable, "-m", "portfwd.cli", *args], env=env,
                          capture_output=True, text=True)


@pytest.fixture
def etc(tmp_path: "os.PathLike[str]") -> str:
    folder = os.path.join(str(tmp_path), "etc")
    os.mkdir(folder, 0o755)
    path = os.path.join(folder, "forward.toml")
    with open(path, "w") as f:
        f.write(BEFORE)
    return path


def read(path: str) -> str:
    with open(path) as f:
        return f.read()


def test_add_then_remove_keeps_owner_mode_acl_and_every_byte(etc: str) -> None:
    os.chown(etc, 0, 4)  # group adm may read, nobody but root may write
    os.chmod(etc, 0o640)
    subprocess.run(["setfacl", "-m", "u:nobody:r", etc], check=True)
    acl = subprocess.run(["getfacl", "-n", etc], capture_output=True, text=True).stdout
    inode = os.stat(etc).st_ino
    env = env_for(etc, os.path.dirname(os.path.dirname(etc)))
    r = portfwd(env, "add", "db", "5432", "--ipv4", "192.168.122.20", "--no-apply")
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines()[0] == f"{etc}:13: added [[forward]] for guest db: 5432"
    assert read(etc) == BEFORE + '\n[[forward]]\nguest = "db"\nipv4 = "192.168.122.20"\nports = ["5432"]\n'
    st = os.stat(etc)
    assert (st.st_uid, st.st_gid, st.st_mode & 0o7777) == (0, 4, 0o640)
    assert st.st_ino != inode  # a new file renamed into place
    assert subprocess.run(["getfacl", "-n", etc], capture_output=True, text=True).stdout == acl
    assert portfwd(env, "check").returncode == 0
    r = portfwd(env, "remove", "db", "--no-apply")
    assert r.returncode == 0, r.stderr
    assert read(etc) == BEFORE
    r = portfwd(env, "remove", "web1", "2222", "--no-apply")
    assert (r.returncode, r.stdout.splitlines()[0]) == (
        0, f"{etc}:5: removed from the ports of guest web1: 2222:22")
    assert read(etc) == BEFORE.replace('  "2222:22",\n', "")
    assert sorted(os.listdir(os.path.dirname(etc))) == ["forward.toml"]  # no temporary file left


def test_a_refused_edit_touches_nothing_and_says_where(etc: str) -> None:
    env = env_for(etc, os.path.dirname(os.path.dirname(etc)))
    before = os.stat(etc)
    r = portfwd(env, "add", "web2", "8080", "--from", "198.51.100.1/24", "--no-apply")
    assert r.returncode == 1
    assert r.stderr.splitlines() == [
        f"{etc}:15:9: forward[1].from[0]: '198.51.100.1/24' has host bits set; did you mean"
        ' "198.51.100.0/24"?',
        f"{etc}: not changed: lines 13-16 would hold the new [[forward]]"]
    after = os.stat(etc)
    assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)
    assert read(etc) == BEFORE
    r = portfwd(env, "add", "web2", "8080:80", "--no-apply")
    assert r.returncode == 1 and "claimed twice" in r.stderr
    r = portfwd(env, "remove", "web1", "9999", "--no-apply")
    assert (r.returncode, r.stderr) == (1, f"{etc}: guest web1 forwards no port 9999; it forwards"
                                           " 8080:80, 2222:22; nothing changed\n")
    assert read(etc) == BEFORE and os.stat(etc).st_ino == before.st_ino


def test_a_symlink_stays_a_symlink_and_untrusted_paths_are_refused(etc: str) -> None:
    base = os.path.dirname(os.path.dirname(etc))
    link = os.path.join(base, "link.toml")
    os.symlink(etc, link)
    env = env_for(link, base)
    r = portfwd(env, "add", "db", "5432", "--no-apply")
    assert r.returncode == 0, r.stderr
    assert os.path.islink(link) and read(etc).endswith('ports = ["5432"]\n')
    os.chmod(os.path.dirname(etc), 0o777)  # anyone could replace the file
    try:
        r = portfwd(env, "remove", "db", "--no-apply")
        check = portfwd(env, "check")
    finally:
        os.chmod(os.path.dirname(etc), 0o755)
    assert r.returncode == check.returncode == 1
    assert r.stderr == check.stderr and "refused: this directory is writable by" in r.stderr
    assert read(etc).endswith('ports = ["5432"]\n')


def test_concurrent_adds_all_land(etc: str) -> None:
    env = env_for(etc, os.path.dirname(os.path.dirname(etc)))
    procs = [subprocess.Popen([sys.executable, "-m", "portfwd.cli", "add", f"g{n}",
                               str(10000 + n), "--no-apply"], env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
             for n in range(8)]
    codes = [(p.wait(), p.stderr.read() if p.stderr else b"") for p in procs]
    for p in procs:
        if p.stderr:
            p.stderr.close()
    assert codes == [(0, b"")] * 8
    text = read(etc)
    assert text.startswith(BEFORE)
    assert sorted(line for line in text.splitlines() if line.startswith("guest = \"g")) == \
        [f'guest = "g{n}"' for n in range(8)]
    assert portfwd(env, "check").returncode == 0


def rows(pf: PortfwdHost) -> List[List[str]]:
    r = pf.cli("status", "--json", "--connect", "test:///default")  # "test" runs, web1 does not
    return sorted([row["guest"], row["target"], row["state"]]
                  for row in json.loads(r.stdout)["forwards"])


def test_add_applies_the_running_guest_and_remove_takes_it_away(pf: PortfwdHost) -> None:
    pf.write_config(BEFORE)
    uri = "test:///default"  # libvirt's test driver: domain "test" runs
    r = pf.cli("add", "test", "18080:80", "--ipv4", GUEST4, "--connect", uri)
    out = r.stdout.decode()
    assert r.returncode == 0, r.stderr
    assert out.splitlines()[1].split() == ["GUEST", "PROTO", "LISTEN", "TARGET", "FROM", "CONNS",
                                           "STATE"]
    assert out.splitlines()[2].split()[:5] == ["test", "tcp", "*:18080", "->", f"{GUEST4}:80"]
    assert out.splitlines()[2].endswith("active")
    assert ["test", f"{GUEST4}:80", "active"] in rows(pf)
    assert GUEST4 in {str(addr) for pairs in pf.targets().values() for _, addr in pairs}
    assert ["web1", "192.168.122.10:80", "guest not running"] in rows(pf)
    # a guest that does not run: the file changes, nothing is applied
    r = pf.cli("add", "web1", "18081:81", "--connect", uri)
    assert r.returncode == 0, r.stderr
    assert r.stdout.decode().splitlines()[-1] == \
        "guest web1 is not running: its forwards apply when it starts"
    r = pf.cli("remove", "test", "--connect", uri)
    assert r.returncode == 0, r.stderr
    assert r.stdout.decode().splitlines()[-1] == "guest test: no forwards"
    assert not [row for row in rows(pf) if row[0] == "test"]
    assert not pf.targets()
    with open(pf.config) as f:
        assert f.read() == BEFORE + '\n[[forward]]\nguest = "web1"\nports = ["18081:81"]\n'


def test_a_file_changed_during_the_edit_is_left_alone(etc: str) -> None:
    from portfwd.config.editfile import edit
    from portfwd.errors import ConfigError

    def meanwhile(text: str) -> str:  # an editor saves while portfwd computes
        with open(etc, "a") as f:
            f.write("# saved by hand\n")
        return text + "# portfwd's edit\n"

    with pytest.raises(ConfigError) as e:
        edit(etc, meanwhile, lambda new: new)
    assert e.value.lines == [f"{etc}: changed while portfwd edited it; nothing written: run the"
                             " command again"]
    assert read(etc) == BEFORE + "# saved by hand\n"
