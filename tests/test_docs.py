"""The man page and the bash completion follow the parser: every subcommand and option
of portfwd's parser (whatever it holds today) appears in both; groff renders the page
without a warning; bash accepts the completion and completes what the parser accepts."""

from __future__ import annotations

import argparse
import os
import re
import shlex
import subprocess
import sys
from typing import Dict, Iterator, List, Tuple

import pytest

from portfwd import config, errors
from portfwd.commands import docs, doctor, trace
from portfwd.config import keys
from portfwd.cmdline import parser as _parser
from portfwd.errors import ConfigError
from portfwd.config.model import Options
from portfwd.config.toml import tomllib

SRC = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "src", "portfwd")


def commands(parser: argparse.ArgumentParser,
             path: Tuple[str, ...] = ()) -> Iterator[Tuple[Tuple[str, ...], argparse.ArgumentParser]]:
    """Every parser level, walked here independently of portfwd.commands.docs."""
    yield path, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            hidden = {a.dest for a in action._choices_actions if a.help == argparse.SUPPRESS}
            for name, sub in action.choices.items():
                if name not in hidden:
                    yield from commands(sub, path + (name,))


def options(parser: argparse.ArgumentParser) -> List[str]:
    return [s for a in parser._actions if a.help != argparse.SUPPRESS for s in a.option_strings]


def own_options(top: argparse.ArgumentParser, sub: argparse.ArgumentParser
                ) -> List[argparse.Action]:
    """The options of ``sub`` its section describes: not -h, not a copy of a top-level
    option (-c given after the command), which OPTIONS describes once."""
    shared = {(tuple(a.option_strings), a.help) for a in top._actions}
    return [a for a in sub._actions if a.option_strings and a.help != argparse.SUPPRESS
            and not isinstance(a, argparse._HelpAction)
            and (tuple(a.option_strings), a.help) not in shared]


def unroff(text: str) -> str:
    return re.sub(r"\\f[BIRP]", "", text).replace("\\-", "-").replace("\\e", "\\")


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
        for option in (options(sub) if not path else
                       [s for a in own_options(parser, sub) for s in a.option_strings]):
            assert f"\\fB{option.replace('-', chr(92) + '-')}\\fR" in text, (path, option)
    assert set(found) == {" ".join(p) for p, _ in commands(parser) if p}


@pytest.mark.parametrize("parser", [_parser(), a_parser()], ids=["portfwd", "demo"])
def test_man_page_describes_every_option_and_command_exactly_once(
        parser: argparse.ArgumentParser) -> None:
    page = docs.man_page(parser)
    found = sections(page)
    for path, sub in commands(parser):
        text = found[" ".join(path)] if path else page.split("\n.SH COMMANDS")[0]
        tags = [unroff(tag) for tag in re.findall(r"\n\.TP\n(.*)", text)]
        actions = [a for a in sub._actions if a.option_strings and a.help != argparse.SUPPRESS]
        for action in (actions if not path else own_options(parser, sub)):
            first = action.option_strings[0]
            assert len([t for t in tags if re.match(re.escape(first) + r"\b", t)]) == 1, \
                (path, first)
        for action in sub._actions:
            if not action.option_strings and action.help != argparse.SUPPRESS \
                    and not isinstance(action, argparse._SubParsersAction):
                assert tags.count(str(action.metavar or action.dest)) == 1, (path, action.dest)
        # nothing else: -h and a copy of a top-level option are described in OPTIONS alone
        flags = [t for t in tags if t.startswith("-")]
        assert len(flags) == len(actions if not path else own_options(parser, sub)), path
    options_part = page.split("\n.SH OPTIONS\n")[1].split("\n.SH ")[0]
    assert len(re.findall(r"\n\.TP\n", "\n" + options_part)) == len(
        [a for a in parser._actions if a.option_strings])
    heads = re.findall(r"\n\.SS (.*)", page)
    assert sorted(heads) == sorted(set(heads))


@pytest.mark.parametrize("parser", [_parser(), a_parser()], ids=["portfwd", "demo"])
def test_synopsis_is_what_help_prints(parser: argparse.ArgumentParser) -> None:
    page = docs.man_page(parser)
    synopsis = page.split("\n.SH SYNOPSIS\n")[1].split("\n.SH ")[0]
    lines = [unroff(line) for line in synopsis.split(".HP\n") if line.strip()]
    for path, sub in commands(parser):
        if path and any(p for p, _ in commands(sub)):
            continue  # a command with subcommands of its own: its leaves stand for it
        usage = " ".join(sub.format_usage().split())
        assert usage.startswith("usage: ")
        assert usage[len("usage: "):] in [" ".join(line.split()) for line in lines], path


def test_man_page_parts_the_parser_does_not_hold() -> None:
    page = docs.man_page(_parser())
    top = _parser()
    for command, _ in docs.EXAMPLES:  # every example is a command line portfwd accepts
        top.parse_args(shlex.split(command)[1:])
    status = page.split("\n.SH EXIT STATUS\n")[1].split("\n.SH ")[0]
    codes = {int(c) for c in re.findall(r"\\fB(\d+)\\fR", status)}
    returned = {v for k, v in vars(errors).items() if k.startswith("EXIT_")}
    assert returned | {doctor.EXIT_BROKEN, trace.EXIT_NOT_DELIVERED, 130} == codes
    environment = page.split("\n.SH ENVIRONMENT\n")[1].split("\n.SH ")[0]
    for name in environment_read():
        assert f"\n\\fB{name}\\fR\n" in environment, name
    for section in ("EXAMPLES", "FILES", "SEE ALSO"):
        assert f"\n.SH {section}\n" in page
    for other in ("forward.toml", "nft", "virsh"):
        assert f"\\fB{other}\\fR(" in page
    trace_text = sections(page)["trace"]
    assert "sctp forwards cannot be traced" in trace_text  # trace probes tcp and udp alone
    assert r"[GUEST]" in unroff(page.split("\n.SH SYNOPSIS\n")[1].split("\n.SH ")[0])


def environment_read() -> List[str]:
    """Every variable portfwd's code reads from os.environ, by literal name or by a
    module constant holding it."""
    names: List[str] = []
    for file in sorted(os.listdir(SRC)):
        if not file.endswith(".py"):
            continue
        with open(os.path.join(SRC, file), encoding="utf-8") as f:
            text = f.read()
        for ref in re.findall(r"environ\.get\(\s*([\w\"]+)", text):
            if ref.startswith('"'):
                names.append(ref.strip('"'))
            else:
                module = __import__(f"portfwd.{file[:-3]}", fromlist=["x"])
                names.append(getattr(module, ref))
    assert names
    return sorted(set(names))


# -- forward.toml(5) ---------------------------------------------------------------

def accepted_keys(section: str) -> List[str]:
    """The keys the validator accepts in a table of ``section``, as its error for an
    unknown key lists them."""
    text = {"options": "[options]\nbogus = 1\n",
            "forward": '[[forward]]\nguest = "a"\nports = [1]\nbogus = 1\n',
            "port": '[[forward]]\nguest = "a"\nports = [{ guest = 1, bogus = 1 }]\n'}[section]
    with pytest.raises(ConfigError) as e:
        config.parse(text, "f")
    return e.value.lines[0].split("known keys: ")[1].split(", ")


def test_config_page_names_every_key_the_validator_accepts() -> None:
    page = docs.config_page()
    chunks = {"options": page.split("\n.SH [OPTIONS]\n")[1].split("\n.SH ")[0],
              "forward": page.split("\n.SH [[FORWARD]]\n")[1].split("\n.SH ")[0],
              "port": page.split("\n.SS ports = [{ ... }]\n")[1].split("\n.SH ")[0]}
    for section, text in chunks.items():
        accepted = accepted_keys(section)
        assert accepted == list(keys.names(section))
        tags = [unroff(t) for t in re.findall(r"\n\.TP\n(.*)", text)]
        assert [t.split(" = ")[0] for t in tags if " = " in t] == accepted, section
        for key in keys.KEYS:
            if key.section == section:
                assert key.type in unroff(text) and key.meaning[:40] in unroff(text)


def test_config_page_defaults_and_examples_are_what_the_validator_does() -> None:
    defaults = Options()
    for key in keys.KEYS:
        if key.section == "options":
            value = tomllib.loads(f"v = {key.default}")["v"]
            assert (tuple(value) if isinstance(value, list) else value) == \
                getattr(defaults, key.name), key.name
        base = {"options": "[options]\n{}\n",
                "forward": '[[forward]]\n{}\nports = [1]\n' if key.name != "ports"
                else '[[forward]]\nguest = "a"\n{}\n',
                "port": '[[forward]]\nguest = "a"\nports = [{{ guest = 1, {} }}]\n'
                if key.name != "guest" else '[[forward]]\nguest = "a"\nports = [{{ {} }}]\n'}
        line = f"{key.name} = {key.example}"
        if key.section == "forward" and key.name not in ("guest", "uuid", "ports"):
            line = 'guest = "a"\n' + line
        if key.section == "port" and key.name == "host":
            line = 'guest = "80-89", ' + line.replace("guest = 1, ", "")
        if key.name == "domain_forwards":  # it needs its allowlist
            line += '\ndomain_ports = ["10000-19999"]'
        text = base[key.section].format(line)
        if key.section == "port" and key.name == "host":
            text = text.replace("guest = 1, ", "")
        config.parse(text, "example")  # raises ConfigError if the example is wrong
    example = docs.config_page().split("\n.EX\n")[1].split("\n.EE")[0]
    config.parse(unroff(example), "example")


@pytest.mark.parametrize("make", [lambda: docs.man_page(_parser()), docs.config_page],
                         ids=["portfwd.8", "forward.toml.5"])
def test_the_pages_render_without_warnings(make: "object", tmp_path: "os.PathLike[str]"
                                           ) -> None:
    page = os.path.join(str(tmp_path), "page")
    with open(page, "w") as f:
        f.write(make())  # type: ignore[operator]
    r = subprocess.run(["groff", "-man", "-Tutf8", "-ww", "-P-cbou", page], capture_output=True,
                       env={**os.environ, "LC_ALL": "C.UTF-8"})
    assert (r.returncode, r.stderr) == (0, b"")
    assert b"SEE ALSO" in r.stdout


def test_man_page_expands_help_and_escapes_roff() -> None:
    page = docs.man_page(a_parser())
    assert "protocol (default: tcp)" in page
    assert "\n\\&.starts with a dot \\e backslash\n" in page
    assert ".SH EXIT STATUS\n.TP\n\\fB0\\fR\nok\n.TP\n\\fB1\\fR\nnot ok\n" in page


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


def test_module_prints_each() -> None:
    for what, text in (("man", docs.man_page(_parser())), ("man-config", docs.config_page()),
                       ("bash-completion", docs.bash_completion(_parser()))):
        r = subprocess.run([sys.executable, "-m", "portfwd.commands.docs", what], capture_output=True,
                           text=True)
        assert (r.returncode, r.stdout) == (0, text)
    r = subprocess.run([sys.executable, "-m", "portfwd.commands.docs", "html"], capture_output=True,
                       text=True)
    assert r.returncode == 2 and "usage: python3 -m portfwd.commands.docs man|man-config|bash-completion" in r.stderr


@pytest.mark.skipif(os.geteuid() != 0, reason="portfwd install writes files as root")
def test_install_writes_the_page_and_the_completion(tmp_path: "os.PathLike[str]") -> None:
    root = str(tmp_path)
    r = subprocess.run([sys.executable, "-m", "portfwd.cli", "install", "--root", root],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    for path, text in (("usr/local/share/man/man8/portfwd.8", docs.man_page(_parser())),
                       ("usr/local/share/man/man5/forward.toml.5", docs.config_page()),
                       ("usr/local/share/bash-completion/completions/portfwd",
                        docs.bash_completion(_parser()))):
        with open(os.path.join(root, path)) as f:
            assert f.read() == text
        assert os.stat(os.path.join(root, path)).st_mode & 0o777 == 0o644


# -- README and docs/ ----------------------------------------------------------------

CHECKOUT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def markdown_files() -> List[str]:
    docs_dir = os.path.join(CHECKOUT, "docs")
    return [os.path.join(CHECKOUT, "README.md")] + sorted(
        os.path.join(docs_dir, name) for name in os.listdir(docs_dir) if name.endswith(".md"))


def anchors(path: str) -> List[str]:
    """The anchors GitHub gives the headings of a markdown file."""
    with open(path, encoding="utf-8") as f:
        text = re.sub(r"```.*?```", "", f.read(), flags=re.S)
    return [re.sub(r"[^\w\- ]", "", h.strip().lower()).replace(" ", "-")
            for h in re.findall(r"^#+ (.*)$", text, flags=re.M)]


def test_links_between_readme_and_docs_resolve() -> None:
    linked: Dict[str, List[str]] = {}
    for path in markdown_files():
        with open(path, encoding="utf-8") as f:
            text = f.read()
        for target in re.findall(r"\]\(([^)\s]+)\)", text):
            if "://" in target:
                continue
            file, _, anchor = target.partition("#")
            where = os.path.normpath(os.path.join(os.path.dirname(path), file)) if file else path
            assert os.path.exists(where), (path, target)
            if anchor:
                assert anchor in anchors(where), (path, target)
            linked.setdefault(where, []).append(path)
    readme = os.path.join(CHECKOUT, "README.md")
    for path in markdown_files()[1:]:  # each page of docs/ is linked from the README and back
        assert readme in linked.get(path, []), path
        assert path in linked.get(readme, []), path


def test_readme_keeps_the_two_setup_commands_and_its_size() -> None:
    with open(os.path.join(CHECKOUT, "README.md"), encoding="utf-8") as f:
        text = f.read()
    blocks = re.findall(r"```sh\n(.*?)```", text.split("\n## Set up\n")[1].split("\n## ")[0],
                        flags=re.S)
    assert [b.strip() for b in blocks] == [
        "apt-get update && debian/build-deb && apt-get install -y ./build/portfwd_0.3.0_all.deb"
        " && (systemctl try-restart libvirtd || true)", "tests/run"]
    assert len(text.splitlines()) <= 450


def test_readme_examples_are_valid_forward_toml() -> None:
    """Each toml block of the README (a fragment gets a guest around it) passes the
    validator."""
    with open(os.path.join(CHECKOUT, "README.md"), encoding="utf-8") as f:
        blocks = re.findall(r"```toml\n(.*?)```", f.read(), flags=re.S)
    assert len(blocks) >= 5
    for block in blocks:
        if "[[forward]]" not in block:
            block = '[[forward]]\nguest = "g"\n' + block
        config.parse(block, "README.md")
