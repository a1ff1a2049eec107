from __future__ import annotations

import glob
import os
import subprocess
import sys

import pytest

from planfmt import plan_text
from portfwd import config
from portfwd.commands import installpaths
from portfwd.rundir import state
from portfwd.errors import ConfigError

DATA = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data")
VALID = sorted(glob.glob(os.path.join(DATA, "valid", "*.toml")))
INVALID = sorted(glob.glob(os.path.join(DATA, "invalid", "*.toml")))


def _read(path: str) -> str:
    with open(path, encoding="utf-8") as f:
        return f.read()


@pytest.mark.parametrize("path", VALID, ids=os.path.basename)
def test_valid_file_gives_expected_plan(path: str) -> None:
    name = os.path.basename(path)
    parsed = config.parse(_read(path), name)
    assert plan_text(parsed) == _read(path[:-5] + ".plan")


@pytest.mark.parametrize("path", INVALID, ids=os.path.basename)
def test_invalid_file_gives_exact_messages(path: str) -> None:
    name = os.path.basename(path)
    with pytest.raises(ConfigError) as e:
        config.parse(_read(path), name)
    assert "\n".join(e.value.lines) + "\n" == _read(path[:-5] + ".err")


def test_data_sets_are_not_empty() -> None:
    assert len(VALID) >= 3 and len(INVALID) >= 10


def test_example_config_shipped_with_portfwd_is_valid() -> None:
    example = os.path.join(DATA, "..", "..", "config", "forward.toml")
    parsed = config.load(example)
    assert parsed.forwards and parsed.forwards[0].guest == "web1"


def test_every_error_is_one_located_line() -> None:
    text = '[[forward]]\nguest = "a"\nipv4 = "10.0.0.1"\nports = ["99999", "1/x"]\nbogus = 1\n'
    with pytest.raises(ConfigError) as e:
        config.parse(text, "f.toml")
    assert e.value.lines == [
        "f.toml:4:10: forward[0].ports[0]: '99999': port 99999 not in 1..65535",
        "f.toml:4:19: forward[0].ports[1]: '1/x': unknown protocol 'x'; use tcp, udp or sctp",
        "f.toml:5:1: forward[0].bogus: unknown key 'bogus'; known keys: guest, uuid, interface, ipv4, ipv6,"
        " ports, listen, from, localhost",
    ]


def test_syntax_error_at_end_of_document_is_located() -> None:
    with pytest.raises(ConfigError) as e:
        config.parse('[[forward]]\nports = ["80"', "f.toml")
    assert len(e.value.lines) == 1
    assert e.value.lines[0].startswith("f.toml:2:")
    assert "TOML syntax" in e.value.lines[0]


def test_uuid_is_normalised_and_matches_case_insensitively() -> None:
    parsed = config.parse('[[forward]]\nuuid = "1B4E28BA-2FA1-11D2-883F-0016D3CCA427"\n'
                          'ipv4 = "10.0.0.1"\nports = [80]\n', "f.toml")
    assert parsed.forwards_for("any", "1b4e28ba-2fa1-11d2-883f-0016d3cca427")
    assert parsed.forwards_for("any", "1B4E28BA-2FA1-11D2-883F-0016D3CCA427")
    assert not parsed.forwards_for("any", None)


@pytest.mark.parametrize("mode, owner, group, fragment", [
    (0o666, 0, 0, "writable by group gid 0 and everyone (mode 0666)"),
    (0o660, 0, 0, "writable by group gid 0 (mode 0660)"),  # root's group is not root
    (0o620, 0, 1234, "writable by group gid 1234 (mode 0620)"),
    (0o644, 1000, 0, "writable by its owner, uid 1000 (mode 0644)"),
])
def test_file_writable_by_others_is_refused(etc: str, mode: int, owner: int, group: int,
                                            fragment: str) -> None:
    path = os.path.join(etc, "forward.toml")
    with open(path, "w") as f:
        f.write('[[forward]]\nguest = "a"\nipv4 = "10.0.0.1"\nports = [80]\n')
    os.chown(path, owner, group)
    os.chmod(path, mode)
    with pytest.raises(ConfigError) as e:
        config.load(path)
    assert len(e.value.lines) == 1
    line = e.value.lines[0]
    assert line.startswith(f"{path}:1:1: refused: this file is {fragment}")
    assert f"fix: chown root:root {path} && chmod go-w {path}" in line


def test_directory_writable_by_others_is_refused(etc: str) -> None:
    path = os.path.join(etc, "forward.toml")
    with open(path, "w") as f:
        f.write("")
    os.chmod(etc, 0o777)
    with pytest.raises(ConfigError) as e:
        config.load(path)
    assert e.value.lines[0].startswith(
        f"{etc}:1:1: refused: this directory is writable by group gid 0 and everyone (mode 0777)")


def test_missing_file_says_what_to_do(etc: str) -> None:
    with pytest.raises(ConfigError) as e:
        config.load(os.path.join(etc, "nope.toml"))
    assert "no such file" in e.value.lines[0] and "--config" in e.value.lines[0]


def test_missing_file_points_at_the_example(etc: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """The Debian package's example when it is there, else the one beside the code."""
    shipped = os.path.join(etc, "example.toml")
    with open(shipped, "w") as f:
        f.write("")
    for example, named in ((shipped, shipped),
                           (os.path.join(etc, "absent.toml"),
                            os.path.join(installpaths.DATA_DIR, "forward.toml"))):
        monkeypatch.setattr(installpaths, "DEB_EXAMPLE", example)
        with pytest.raises(ConfigError) as e:
            config.load(os.path.join(etc, "nope.toml"))
        assert f"no such file; create it (see {named})" in e.value.lines[0]
        assert os.path.isfile(named)


def test_config_path_precedence(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(state.ENV_CONFIG, raising=False)
    assert state.config_path() == "/etc/portfwd/forward.toml"
    monkeypatch.setenv(state.ENV_CONFIG, "/x/env.toml")
    assert state.config_path() == "/x/env.toml"
    assert state.config_path("/x/cli.toml") == "/x/cli.toml"


def _check(*args: str, env_path: "str | None" = None) -> "subprocess.CompletedProcess[str]":
    env = dict(os.environ)
    env.pop(state.ENV_CONFIG, None)
    if env_path:
        env[state.ENV_CONFIG] = env_path
    return subprocess.run([sys.executable, "-m", "portfwd.cli", "check", *args], env=env,
                          capture_output=True, text=True)


def test_check_command_reports_all_errors_without_traceback() -> None:
    path = os.path.join(DATA, "invalid", "bad_ports.toml")
    r = _check("--config", path)
    assert r.returncode == 1
    assert "Traceback" not in r.stderr
    lines = r.stderr.splitlines()
    assert len(lines) == 8 and all(line.startswith(f"{path}:") for line in lines)


def test_check_command_uses_environment_and_accepts_valid(etc: str) -> None:
    path = os.path.join(DATA, "valid", "several.toml")
    r = _check(env_path=path)
    assert r.returncode == 0, r.stderr
    # what the host lacks (these listen addresses) adds warnings: test_check_live.py
    assert r.stdout.startswith(f"{path}: OK: 4 port forwards for 2 guests, table inet fwd_test")
    assert r.stderr.splitlines()[0] == (
        f"{path}:4:11: warning: options.listen[0]: listen address 203.0.113.5"
        " is unused by forward[2] (uuid 1b4e28ba-2fa1-11d2-883f-0016d3cca427): it has no ipv4"
        " guest address")


def test_check_help_and_usage_exit_codes() -> None:
    assert _check("--help").returncode == 0
    assert _check("--nope").returncode == 2
