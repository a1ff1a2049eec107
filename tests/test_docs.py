"""The man page and the bash completion follow the parser: every subcommand and option
of portfwd's parser (whatever it holds today) appears in both; groff renders the page
without a warning; bash accepts the completion and completes what the parser accepts."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from typing import Dict, Iterator, List, Tuple

import pytest

from portfwd import docs
from portfwd.cmdline import parser as _parser


def commands(parser: argparse.ArgumentParser,
             path: Tuple[str, ...] = ()) -> Iterator[Tuple[Tuple[str, ...], argparse.ArgumentParser]]:
    """Every parser level, walked here independently of portfwd.docs."""
    yield path, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            hidden = {a.dest for a in action._choices_actions if a.help == argparse.SUPPRESS}
            for name, sub in action.choices.items():
                if name not in hidden:
                    yield from commands(sub, path + (name,))


def options(parser: argparse.ArgumentParser) -> List[str]:
    return [s for a in parser._actions if a.help != argparse.SUPPRESS for s in a.option_strings]


def sections(page: str) -> Dict[str, str]:
    """The man page's subsections (.SS NAME) and their text, by name."""
    found: Dict[str, str] = {}
    for chunk in page.split("\n.SS ")[1:]:
        name, _, body = chunk.partition("\n")
        found[name.replace("\\-", "-")] = body.split("\n.SH ")[0]
    return found


def a_parser() -> argparse.ArgumentParser:
    """A parser with what portfwd's may grow: nested subcommands, choices, a version,
    a short option, %(default)s, and help text that roff would take for requests."""
    parser = argparse.ArgumentParser(prog="demo", description="Demo tool.",
                                     epilog="exit codes: 0 ok, 1 not ok")
    parser.add_argument("--version", action="version", version="demo 1")
    parser.add_argument("-c", "--config", metavar="PATH", help=".starts with a dot \\ backslash")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    p = sub.add_parser("trace", help="trace a packet")
    p.add_argument("--proto", choices=["tcp", "udp"], default="tcp",
                   help="protocol (default: %(default)s)")
    p.add_argument("guest", help="the guest")
    p = sub.add_parser("db", help="database")
    inner = p.add_subparsers(dest="what")
    q = inner.add_parser("dump", help="dump it")
    q.add_argument("--out-dir", metavar="DIR", help="where")
    sub.add_parser("hidden", help=argparse.SUPPRESS)
    sub.add_parser("plain").add_argument("--flag", action="store_true")  # no help at all
    return parser


@pytest.mark.parametrize("parser", [_parser(), a_parser()], ids=["portfwd", "demo"])
def test_man_page_names_every_command_and_option(parser: argparse.ArgumentParser) -> None:
    page = docs.man_page(parser)
    assert page.startswith(f".TH {parser.prog.upper()} 8 ")
    found = sections(page)
    for path, sub in commands(parser):
        text = found[" ".join(path)] if path else page.split("\n.SH COMMANDS")[0]
        for option in options(sub):
            assert f"\\fB{option.replace('-', chr(92) + '-')}\\fR" in text, (path, option)
    assert set(found) == {" ".join(p) for p, _ in commands(parser) if p}


def test_man_page_expands_help_and_escapes_roff() -> None:
    page = docs.man_page(a_parser())
    assert "protocol (default: tcp)" in page
    assert "\n\\&.starts with a dot \\e backslash\n" in page
    assert ".SH EXIT STATUS\n0 ok, 1 not ok\n" in page


@pytest.mark.parametrize("parser", [_parser(), a_parser()], ids=["portfwd", "demo"])
def test_groff_renders_the_page_without_warnings(parser: argparse.ArgumentParser,
                                                 tmp_path: "os.PathLike[str]") -> None:
    page = os.path.join(str(tmp_path), f"{parser.prog}.8")
    with open(page, "w") as f:
        f.write(docs.man_page(parser))
    r = subprocess.run(["groff", "-man", "-Tutf8", "-ww", "-P-cbou", page], capture_output=True,
                       env={**os.environ, "LC_ALL": "C.UTF-8"})
    assert (r.returncode, r.stderr) == (0, b"")
    text = r.stdout.decode()
    for path, sub in commands(parser):
        for option in options(sub):
            assert option in text


def complete(script: str, *words: str) -> List[str]:
    """What bash completes for the command line ``words`` (the last one being typed)."""
    line = " ".join(f"'{w}'" for w in words)
    r = subprocess.run(["bash", "--norc", "--noprofile", "-c",
                        f'{script}\nCOMP_WORDS=({line}); COMP_CWORD={len(words) - 1}\n'
                        f'_{words[0]}; printf "%s\\n" "${{COMPREPLY[@]}}"'],
                       capture_output=True, text=True, cwd="/")
    assert r.returncode == 0, r.stderr
    return [w for w in r.stdout.splitlines() if w]


@pytest.mark.parametrize("parser", [_parser(), a_parser()], ids=["portfwd", "demo"])
def test_bash_accepts_and_completes_every_command_and_option(
        parser: argparse.ArgumentParser) -> None:
    script = docs.bash_completion(parser)
    assert subprocess.run(["bash", "-n"], input=script.encode()).returncode == 0
    for path, sub in commands(parser):
        names = {p[-1] for p, _ in commands(sub) if len(p) == 1}
        if names:
            assert set(complete(script, parser.prog, *path, "")) == names
        assert set(complete(script, parser.prog, *path, "-")) == set(options(sub))


def test_bash_completes_values() -> None:
    script = docs.bash_completion(a_parser())
    assert complete(script, "demo", "trace", "--proto", "") == ["tcp", "udp"]
    assert "usr" in complete(script, "demo", "db", "dump", "--out-dir", "us")
    assert "etc" in complete(script, "demo", "-c", "et")
    assert complete(script, "demo", "tr") == ["trace"]
    real = docs.bash_completion(_parser())
    assert complete(real, "portfwd", "sync", "--dry") == ["--dry-run"]
    assert "bin" in complete(real, "portfwd", "install", "--root", "bi")


def test_module_prints_both() -> None:
    for what, make in (("man", docs.man_page), ("bash-completion", docs.bash_completion)):
        r = subprocess.run([sys.executable, "-m", "portfwd.docs", what], capture_output=True,
                           text=True)
        assert (r.returncode, r.stdout) == (0, make(_parser()))
    r = subprocess.run([sys.executable, "-m", "portfwd.docs", "html"], capture_output=True,
                       text=True)
    assert r.returncode == 2 and "usage: python3 -m portfwd.docs man|bash-completion" in r.stderr


@pytest.mark.skipif(os.geteuid() != 0, reason="portfwd install writes files as root")
def test_install_writes_the_page_and_the_completion(tmp_path: "os.PathLike[str]") -> None:
    root = str(tmp_path)
    r = subprocess.run([sys.executable, "-m", "portfwd.cli", "install", "--root", root],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    for path, text in (("usr/local/share/man/man8/portfwd.8", docs.man_page(_parser())),
                       ("usr/local/share/bash-completion/completions/portfwd",
                        docs.bash_completion(_parser()))):
        with open(os.path.join(root, path)) as f:
            assert f.read() == text
        assert os.stat(os.path.join(root, path)).st_mode & 0o777 == 0o644
