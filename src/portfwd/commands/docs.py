"""The man page and the bash completion, generated from the argument parser
(``cmdline.parser``).

Both walk whatever the parser holds (options, positionals, subcommands and their
own options), so they never drift from the command line. Pure functions; the
package build and `portfwd install` write their output::

    python3 -m portfwd.commands.docs man              # portfwd(8), roff, on stdout
    python3 -m portfwd.commands.docs man-config       # forward.toml(5), from keys.KEYS
    python3 -m portfwd.commands.docs bash-completion  # a bash completion script, on stdout
"""

from __future__ import annotations

import argparse
import re
import shlex
import sys
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

from portfwd.libvirt import domainxml
from portfwd.commands import installpaths
from portfwd.config import keys
from portfwd.rundir import state
from portfwd.commands.installpaths import HOOK_KINDS, hook


class Command:
    """One parser level: its name path, its options and positionals, its subcommands."""

    __slots__ = ("path", "parser", "help", "options", "positionals", "children")

    def __init__(self, path: Tuple[str, ...], parser: argparse.ArgumentParser,
                 help: str) -> None:
        self.path = path
        self.parser = parser
        self.help = help
        self.options: List[argparse.Action] = []
        self.positionals: List[argparse.Action] = []
        self.children: List[Command] = []
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                helps = {a.dest: a.help or "" for a in action._choices_actions}
                seen: List[argparse.ArgumentParser] = []
                for name, sub in action.choices.items():
                    # an alias shares its command's parser; a hidden command stays hidden
                    if any(sub is s for s in seen) or helps.get(name) == argparse.SUPPRESS:
                        continue
                    seen.append(sub)
                    self.children.append(Command(path + (name,), sub, helps.get(name, "")))
            elif action.help == argparse.SUPPRESS:
                continue
            elif action.option_strings:
                self.options.append(action)
            else:
                self.positionals.append(action)

    def walk(self) -> Iterator[Command]:
        yield self
        for child in self.children:
            yield from child.walk()


def _help(parser: argparse.ArgumentParser, action: argparse.Action) -> str:
    """The action's help with %(default)s and friends expanded, as --help shows it."""
    if not action.help:
        return ""
    return " ".join(parser._get_formatter()._expand_help(action).split())


def _metavar(action: argparse.Action) -> str:
    if action.nargs == 0:
        return ""
    if action.metavar is not None:
        return str(action.metavar)
    if action.choices is not None:
        return "{" + ",".join(str(c) for c in action.choices) + "}"
    return action.dest.upper() if action.option_strings else action.dest


def usage(parser: argparse.ArgumentParser) -> str:
    """The parser's usage line as ``--help`` prints it, without ``usage:`` and unwrapped."""
    formatter = argparse.HelpFormatter(parser.prog, width=1 << 16)
    formatter.add_usage(parser.usage, parser._actions,
                        parser._mutually_exclusive_groups, prefix="")
    return " ".join(formatter.format_help().split())


def _synopsis(command: Command) -> str:
    prog = " ".join(command.path)
    rest = usage(command.parser)[len(command.parser.prog):].strip()
    return f"\\fB{_roff(prog)}\\fR {_roff(rest)}".rstrip()


# -- man page (roff) -----------------------------------------------------------------

def _roff(text: str) -> str:
    """Text safe in roff: backslashes escaped, option dashes as minus signs, no line
    starting with a control character."""
    text = text.replace("\\", "\\e")
    text = re.sub(r"(?<![\w-])-[\w-]*", lambda m: m.group().replace("-", "\\-"), text)
    return "\n".join("\\&" + line if line.startswith((".", "'")) else line
                     for line in text.splitlines())


def _same(action: argparse.Action, top: Sequence[argparse.Action]) -> bool:
    """Whether ``action`` repeats an option of the top level (-h, -c given after the
    command): the page describes it once, under OPTIONS."""
    return any(a.option_strings == action.option_strings and a.help == action.help
               for a in top) or isinstance(action, argparse._HelpAction)


def _option_lines(parser: argparse.ArgumentParser,
                  actions: Sequence[argparse.Action]) -> List[str]:
    lines: List[str] = []
    for action in actions:
        value = _metavar(action)
        names = ", ".join(f"\\fB{_roff(s)}\\fR" for s in action.option_strings) or \
            f"\\fI{_roff(value)}\\fR"
        if value and action.option_strings:
            names += f" \\fI{_roff(value)}\\fR"
        lines += [".TP", names, _roff(_help(parser, action)) or "\\&"]
    return lines


def _exit_status(epilog: str) -> List[str]:
    """``exit codes: 0 ok, 1 …`` (the parser's epilog) as one paragraph per code."""
    text = " ".join(epilog.split()).split(":", 1)[1].strip()
    lines: List[str] = []
    for code, meaning in re.findall(r"(\d+) (.*?)(?:, (?=\d+ )|$)", text):
        lines += [".TP", f"\\fB{code}\\fR", _roff(meaning)]
    return lines


def _paragraphs(rows: Sequence[Tuple[str, str]], tag: str = "B") -> List[str]:
    """(term, text) rows as tagged paragraphs."""
    lines: List[str] = []
    for term, text in rows:
        lines += [".TP", f"\\f{tag}{_roff(term)}\\fR", _roff(text)]
    return lines


DESCRIPTION = (
    "portfwd keeps the forwards that forward.toml(5) lists in one nftables table of family"
    " inet that it owns alone, one atomic transaction per change. Its libvirt hooks add a"
    " guest's forwards when it starts, is restored, migrated in, or libvirtd reconnects to"
    " it, and remove them when it stops; they never call libvirt and never stop a guest"
    " unless strict = true. The commands below validate the configuration, apply it to the"
    " running guests, show what is live and find what blocks a forward. -c may stand before"
    " or after the command; every command takes -h.")

# the environment portfwd reads (os.environ): name, what it does
ENVIRONMENT = (
    (state.ENV_CONFIG, f"the configuration file when --config is not given (default"
                       f" {state.DEFAULT_CONFIG}). The libvirt hooks always read the default:"
                       " libvirt gives them an empty environment."),
    (state.ENV_RUN_DIR, f"the run directory (default {state.DEFAULT_RUN_DIR}): what is applied,"
                        " per guest and host-wide, the compiled configuration and the lock."),
    (domainxml.ENV_STATUS_DIR, f"where libvirt's QEMU driver keeps the status files of running"
                               f" domains (default {domainxml.STATUS_DIR}); for tests."),
    ("JOURNAL_STREAM", "set by systemd: when it names portfwd's stderr, log lines go to the"
                       " journal once each, with their priority, instead of syslog too."),
    ("PATH", "where the iptables tools are looked for (default"
             " /usr/sbin:/usr/bin:/sbin:/bin)."),
)

# command lines that EXAMPLES shows (the tests parse each with the parser)
EXAMPLES = (
    ("portfwd check", "validate the configuration; every error as FILE:LINE:COL: message"),
    ("portfwd sync", "apply it to the guests that run now (guests that start later get their"
                     " forwards from the libvirt hook)"),
    ("portfwd status", "every forward and its state; active means it is in the kernel"),
    ("portfwd sync --dry-run", "what a sync would add, remove and keep; changes nothing"),
    ("portfwd doctor web1", "walk the path of web1's forwards and stop at the first broken"
                            " layer, with its fix"),
    ("portfwd trace web1 8080 --from 203.0.113.2", "send one probe to web1's forward of host"
                                                   " port 8080 and show each chain's verdict"),
    ("portfwd import /etc/libvirt/hooks/hooks.json", "print libvirt-hook-qemu's forwards as"
                                                     " forward.toml"),
    ("portfwd reapply", "put the table back from the records after nft flush ruleset"),
)

SEE_ALSO = ("forward.toml(5)", "nft(8)", "virsh(1)", "libvirtd(8)")


def _see_also(pages: Sequence[str]) -> List[str]:
    return [".SH SEE ALSO", ", ".join("\\fB%s\\fR(%s)" % tuple(s[:-1].split("("))
                                      for s in pages)]


def _files() -> List[str]:
    return _paragraphs((
        (state.DEFAULT_CONFIG, f"the configuration, see forward.toml(5); {state.ENV_CONFIG} or"
                               " --config names another"),
        (installpaths.DEB_EXAMPLE, "the commented example configuration (Debian package)"),
        (state.DEFAULT_RUN_DIR, "what is applied, per guest and host-wide, and the lock"),
        (", ".join(hook(kind) for kind in HOOK_KINDS), "the libvirt hooks"),
    ), tag="I")


def man_page(parser: argparse.ArgumentParser) -> str:
    """The manual page, section 8, in roff."""
    top = Command((parser.prog,), parser, parser.description or "")
    name = parser.prog
    summary = (parser.description or name).rstrip(".")
    lines = [f'.TH {name.upper()} 8 "" "{name}" "System Administration"',
             ".SH NAME", f"{name} \\- {_roff(summary[:1].lower() + summary[1:])}",
             ".SH SYNOPSIS"]
    for command in top.walk():
        if not command.children or command is top:
            lines += [".HP", _synopsis(command)]
    lines += [".SH DESCRIPTION", _roff(parser.description or "")]
    if name == "portfwd":
        lines += [".PP", _roff(DESCRIPTION)]
    if top.options or top.positionals:
        lines += [".SH OPTIONS"] + _option_lines(parser, top.positionals + top.options)
    commands = [c for c in top.walk() if c is not top]
    if commands:
        lines.append(".SH COMMANDS")
    for command in commands:
        lines += [".SS " + _roff(" ".join(command.path[1:])),
                  _roff(command.parser.description or command.help)]
        own = [a for a in command.options if not _same(a, top.options)]
        if command.positionals or own:
            lines += _option_lines(command.parser, command.positionals + own)
    if name == "portfwd":
        lines += [".SH EXAMPLES"] + _paragraphs(EXAMPLES)
        lines += [".SH ENVIRONMENT"] + _paragraphs(ENVIRONMENT)
    if parser.epilog:
        epilog = " ".join(parser.epilog.split())
        if epilog.lower().startswith("exit codes:"):
            lines += [".SH EXIT STATUS"] + _exit_status(epilog)
        else:
            lines += [".SH NOTES", _roff(epilog)]
    if name == "portfwd":
        lines += [".SH FILES"] + _files()
    lines += _see_also(SEE_ALSO if name == "portfwd" else ("nft(8)",))
    return "\n".join(lines) + "\n"


# -- forward.toml(5) -----------------------------------------------------------------

CONFIG_EXAMPLE = """\
[options]
listen = ["eth0"]

[[forward]]
guest = "web1"
ipv4  = "192.168.122.10"
ipv6  = "fd00:122::10"
ports = ["8080:80", "2222:22/tcp", "5000-5010/udp", 443]

[[forward]]
guest = "db1"
from  = ["198.51.100.0/24"]
ports = [{ host = 15432, guest = 5432, listen = ["203.0.113.5"] }]
"""

PORT_SPECS = (
    ('"8080:80"', "host port 8080 to guest port 80, tcp"),
    ('"53/udp"', "the same port on both sides, udp"),
    ('"5000-5010/udp"', "the same range on both sides: one table element, whatever its size"),
    ('"6000-6009:7000-7009/sctp"', "a shifted range, stored port by port: at most 1024 ports"),
    ("443", "a bare number: the same port on both sides, tcp"),
    ('{ host = 8443, guest = 443, proto = "tcp", listen = ["203.0.113.5"] }',
     "an inline table, with the keys below (it may also narrow listen and from)"),
)


def _key_lines(section: str) -> List[str]:
    lines: List[str] = []
    for key in keys.KEYS:
        if key.section != section:
            continue
        default = f"; default {key.default}" if key.default else "; no default"
        lines += [".TP", f"\\fB{key.name}\\fR = \\fI{_roff(key.example)}\\fR",
                  _roff(f"({key.type}{default}) {key.meaning}")]
    return lines


def config_page() -> str:
    """forward.toml(5), in roff: every key from ``keys.KEYS``, which ``config`` accepts."""
    lines = ['.TH FORWARD.TOML 5 "" "portfwd" "File Formats"',
             ".SH NAME", "forward.toml \\- port forwards of libvirt guests, for portfwd(8)",
             ".SH SYNOPSIS", f"\\fI{_roff(state.DEFAULT_CONFIG)}\\fR",
             ".SH DESCRIPTION",
             _roff("A TOML file that says which host ports portfwd forwards to which libvirt"
                   " guests. portfwd reads it only if root alone can write it and every"
                   " directory on its path. `portfwd check` validates it (every error as"
                   " FILE:LINE:COL: message, unknown keys with a hint); `portfwd sync` applies"
                   " it to the guests that run; guests that start later get their forwards"
                   " from the libvirt hook, and `portfwd daemon` applies a valid edit within"
                   " 2 s. An invalid file changes no rule."),
             ".PP", _roff("The file has two kinds of tables, both optional: [options] and"
                          " [[forward]]; any other top-level key is an error.")]
    for section, header, text in keys.SECTIONS:
        if section == "port":
            lines += [".SH PORTS", _roff("Each item of ports is one of:")]
            lines += _paragraphs(PORT_SPECS)
            lines += [".PP", _roff("Ports are 1 to 65535; the two ranges of one item are of"
                                   " equal length.")]
            lines += [".SS " + _roff(header), _roff(text)]
        else:
            lines += [".SH " + _roff(header.upper()), _roff(text)]
        lines += _key_lines(section)
    lines += [".SH CONFLICTS",
              _roff("Two forwards may not claim the same listen address, protocol and host"
                    " port; an empty listen (every address) overlaps every specific address."
                    " A range and a single port never share a port."),
              ".SH EXAMPLE", ".EX"] + [_roff(line) or "" for line in
                                       CONFIG_EXAMPLE.splitlines()] + [".EE"]
    lines += [".SH FILES"] + _paragraphs((
        (state.DEFAULT_CONFIG, "the file portfwd and its hooks read"),
        (installpaths.DEB_EXAMPLE, "a commented example (Debian package)"),
    ), tag="I")
    lines += _see_also(("portfwd(8)", "nft(8)", "virsh(1)"))
    return "\n".join(lines) + "\n"


# -- bash completion ---------------------------------------------------------------

_FILE_WORDS = ("PATH", "FILE", "JSON", "CONFIG", "OUTPUT")
GUEST = "GUEST"  # a positional completed with guest names


def _value_completion(action: argparse.Action) -> str:
    """The compgen arguments that complete the action's value ('' for none)."""
    if action.choices is not None:
        return "-W " + shlex.quote(" ".join(str(c) for c in action.choices))
    hint = f"{action.metavar or ''} {action.dest}".upper()
    if "DIR" in hint:
        return "-d"
    if any(word in hint for word in _FILE_WORDS):
        return "-f"
    return ""


def _case_body(command: Command) -> List[str]:
    """The lines completing the words after ``command`` (and before a subcommand)."""
    body = ["case $prev in"]
    for action in command.options:
        if action.nargs == 0:
            continue
        compgen = _value_completion(action)
        fill = f'COMPREPLY=($(compgen {compgen} -- "$cur"))' if compgen else "COMPREPLY=()"
        body.append(f"    {'|'.join(action.option_strings)}) {fill}; return ;;")
    body.append("esac")
    options = " ".join(s for a in command.options for s in a.option_strings)
    body.append(f"opts={shlex.quote(options)}")
    words = " ".join(c.path[-1] for c in command.children)
    if command.children:
        body.append(f"words={shlex.quote(words)}")
    elif command.positionals and command.positionals[0].metavar == GUEST:
        body.append("guests=1")  # the configured guests' names, from `show --names`
    elif command.positionals:
        values = _value_completion(command.positionals[0]) or "-f"
        body.append(f"values={shlex.quote(values)}")
    return body


def bash_completion(parser: argparse.ArgumentParser) -> str:
    """A bash completion script: subcommands, their options, and file, choice or guest
    values (the guests that ``show --names`` lists, with the line's -c)."""
    top = Command((parser.prog,), parser, "")
    func = "_" + re.sub(r"\W", "_", parser.prog)
    nodes = list(top.walk())
    by_path: Dict[str, Command] = {" ".join(c.path[1:]): c for c in nodes}
    lines = [f"# bash completion for {parser.prog}(8); generated by"
             " `python3 -m portfwd.commands.docs bash-completion`: do not edit",
             f"{func}()", "{",
             "    local cur=${COMP_WORDS[COMP_CWORD]} prev=${COMP_WORDS[COMP_CWORD-1]}",
             "    local cmd='' opts='' words='' values='' guests='' config=() i",
             "    COMPREPLY=()",
             "    for ((i = 1; i < COMP_CWORD; i++)); do",
             "        case ${COMP_WORDS[i-1]} in -c|--config) config=(-c \"${COMP_WORDS[i]}\") ;; esac",
             "        case ${cmd:+$cmd }${COMP_WORDS[i]} in"]
    commands = [path for path in by_path if path]
    if commands:
        lines.append(f"            {'|'.join(shlex.quote(p) for p in commands)})"
                     " cmd=${cmd:+$cmd }${COMP_WORDS[i]} ;;")
    lines += ["        esac", "    done", "    case $cmd in"]
    for path, command in by_path.items():
        lines.append(f"        {shlex.quote(path)})")
        lines += [" " * 12 + line for line in _case_body(command)]
        lines.append(" " * 12 + ";;")
    lines += ["    esac",
              '    if [[ $cur == -* ]]; then',
              '        COMPREPLY=($(compgen -W "$opts" -- "$cur"))',
              "    elif [[ -n $guests ]]; then",
              f'        COMPREPLY=($(compgen -W "$("${{COMP_WORDS[0]}}" "${{config[@]}}" show --names'
              f' 2>/dev/null)" -- "$cur"))',
              "    elif [[ -n $words ]]; then",
              '        COMPREPLY=($(compgen -W "$words" -- "$cur"))',
              "    elif [[ -n $values ]]; then",
              '        COMPREPLY=($(compgen $values -- "$cur"))',
              "    fi",
              "}",
              f"complete -o filenames -F {func} {parser.prog}"]
    return "\n".join(lines) + "\n"


def main(argv: Optional[List[str]] = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    outputs = {"man": man_page, "man-config": lambda _: config_page(),
               "bash-completion": bash_completion}
    if len(args) != 1 or args[0] not in outputs:
        print(f"usage: python3 -m portfwd.commands.docs {'|'.join(outputs)}", file=sys.stderr)
        return 2
    from portfwd.cmdline import parser

    sys.stdout.write(outputs[args[0]](parser()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
