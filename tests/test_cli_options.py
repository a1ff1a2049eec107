"""The command line itself (no root needed): --version, -c before or after the
command, a bad --interval, config hints for habits from elsewhere."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

import portfwd
from portfwd import config
from portfwd.errors import ConfigError


def cli(*args: str, env_config: "str | None" = None) -> "subprocess.CompletedProcess[str]":
    env = dict(os.environ)
    env.pop("PORTFWD_CONFIG", None)
    if env_config:
        env["PORTFWD_CONFIG"] = env_config
    return subprocess.run([sys.executable, "-m", "portfwd.cli", *args], env=env,
                          capture_output=True, text=True)


def test_version() -> None:
    r = cli("--version")
    assert (r.returncode, r.stdout) == (0, f"portfwd {portfwd.__version__}\n")
    with open(os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                           "pyproject.toml"), encoding="utf-8") as f:
        assert f'\nversion = "{portfwd.__version__}"' in f.read()


@pytest.fixture
def valid(etc: str) -> str:
    path = os.path.join(etc, "forward.toml")
    with open(path, "w", encoding="utf-8") as f:
        f.write('[options]\ntable = "cli_c"\n')
    return path


@pytest.mark.parametrize("where", ["before", "after", "long"])
def test_config_option_before_or_after_the_command(valid: str, where: str) -> None:
    args = {"before": ("-c", valid, "check"), "after": ("check", "-c", valid),
            "long": ("--config", valid, "check")}[where]
    r = cli(*args)
    assert r.stdout.startswith(f"{valid}: OK: 0 port forwards for 0 guests, table inet cli_c")


def test_config_after_the_command_wins(valid: str) -> None:
    r = cli("-c", "/nonexistent/forward.toml", "check", "-c", valid)
    assert r.stdout.startswith(f"{valid}: OK")
    r = cli("check", env_config=valid)
    assert r.stdout.startswith(f"{valid}: OK")


@pytest.mark.parametrize("value,message", [
    ("0", "argument --interval: 0 seconds: use 0.05 to 3600 (default 0.5)"),
    ("-1", "argument --interval: -1 seconds: use 0.05 to 3600 (default 0.5)"),
    ("nan", "argument --interval: nan seconds: use 0.05 to 3600 (default 0.5)"),
    ("1e9", "argument --interval: 1e9 seconds: use 0.05 to 3600 (default 0.5)"),
    ("soon", "argument --interval: 'soon' is not a number of seconds"),
])
def test_bad_interval_is_a_usage_error(value: str, message: str) -> None:
    r = cli("daemon", "--interval", value)
    assert r.returncode == 2
    assert r.stderr.splitlines()[-1] == f"portfwd daemon: error: {message}"


@pytest.mark.parametrize("args,message", [
    (["--from", "garbage"], "argument --from: 'garbage' is not an IP address (write e.g."
                            " 198.51.100.7 or 2001:db8::7)"),
    (["--from", "192.0.2.1 tcp dport 1 drop;"], "argument --from: '192.0.2.1 tcp dport 1"
                                                " drop;' is not an IP address"),
    (["--from", "198.51.100.0/24"], "argument --from: '198.51.100.0/24' is not an IP address"),
    (["--from", "224.0.0.1"], "argument --from: 224.0.0.1 is not a unicast address"),
    (["--from", "::"], "argument --from: :: is not a unicast address"),
    (["--from", "255.255.255.255"], "argument --from: 255.255.255.255 is not a unicast address"),
    (["--from", "fe80::1%eth0"], "argument --from: fe80::1%eth0: a source address has no zone"),
    (["--from", "::ffff:192.0.2.1"], "argument --from: ::ffff:192.0.2.1: write the IPv4"),
    (["--from", "192.0.2.1", "-6"], "argument --from: 192.0.2.1 is an IPv4 address, and -6"),
    (["--timeout", "nan"], "argument --timeout: nan seconds: use 0.1 to 600 (default 2)"),
])
def test_trace_refuses_a_bad_probe_with_exit_2(args: "list[str]", message: str) -> None:
    """The probe's source goes into an nft rule and a packet header: only a unicast
    address, checked before anything is read or sent (no root needed to see it)."""
    r = cli("trace", "web1", "8080", *args)
    assert (r.returncode, r.stdout) == (2, "")
    assert r.stderr.splitlines()[-1].startswith(f"portfwd trace: error: {message}"), r.stderr
    assert "Traceback" not in r.stderr


def test_trace_refuses_a_port_out_of_range() -> None:
    r = cli("trace", "web1", "70000")
    assert r.returncode == 2
    assert r.stderr.splitlines()[-1] == "portfwd trace: error: argument PORT: 70000: a port is" \
        " 1 to 65535"


FWD = '[[forward]]\nguest = "web1"\nipv4 = "192.168.122.10"\n'


@pytest.mark.parametrize("text,expected", [
    (FWD + 'ports = ["127.0.0.1:8081:80"]\n',
     "f.toml:4:10: forward[0].ports[0]: '127.0.0.1:8081:80': an address in a port spec is"
     " Docker's way; portfwd forwards 127.0.0.1 with localhost = true: write { host = 8081,"
     " guest = 80 } and set localhost = true in this [[forward]] (listen then says which other"
     " addresses answer)"),
    (FWD + 'ports = ["203.0.113.5:8081:80/udp"]\n',
     "f.toml:4:10: forward[0].ports[0]: '203.0.113.5:8081:80/udp': an address in a port spec is"
     " Docker's way; portfwd takes it in listen: { host = 8081, guest = 80, proto = \"udp\","
     " listen = [\"203.0.113.5\"] } (or listen = [\"203.0.113.5\"] for the whole [[forward]])"),
    (FWD + 'ports = ["[2001:db8::5]:8081:80"]\n',
     "f.toml:4:10: forward[0].ports[0]: '[2001:db8::5]:8081:80': an address in a port spec is"
     " Docker's way; portfwd takes it in listen: { host = 8081, guest = 80,"
     " listen = [\"2001:db8::5\"] } (or listen = [\"2001:db8::5\"] for the whole [[forward]])"),
    (FWD + 'ports = ["80"]\nstrict = true\n',
     "f.toml:5:1: forward[0].strict: unknown key 'strict'; 'strict' is a key of [options], and"
     " every key below a [[forward]] header belongs to that forward: move it above the first"
     " [[forward]], under [options]; known keys: guest, uuid, interface, ipv4, ipv6, ports,"
     " listen, from, localhost"),
    (FWD + 'ports = ["8080:80/TCP"]\n',
     "f.toml:4:10: forward[0].ports[0]: '8080:80/TCP': unknown protocol 'TCP'; use tcp, udp or"
     " sctp (lower case: 'tcp')"),
    (FWD + 'ports = [{ guest = 80, proto = "UDP" }]\n',
     "f.toml:4:32: forward[0].ports[0].proto: 'UDP': unknown protocol 'UDP'; use tcp, udp or"
     " sctp (lower case: 'udp')"),
])
def test_habits_from_elsewhere_get_a_hint(text: str, expected: str) -> None:
    with pytest.raises(ConfigError) as e:
        config.parse(text, "f.toml")
    assert e.value.lines == [expected]
