"""The man page and the bash completion, generated from the argument parser
(``cmdline.parser``).

Both walk whatever the parser holds (options, positionals, subcommands and their
own options), so they never drift from the command line. Pure functions; the
package build and `portfwd install` write their output::

    python3 -m portfwd.docs man              # roff, section 8, on stdout
    python3 -m portfwd.docs bash-completion  # a bash completion script, on stdout
"""

from __future__ import annotations

import argparse
import re
import shlex
import sys
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

from . import state
from .installpaths import HOOK_KINDS, hook

SEE_ALSO = ("nft(8)", "virsh(1)", "libvirtd(8)")


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


def _usage(command: Command) -> str:
    """The command's arguments after its name: options, positionals, COMMAND."""
    words: List[str] = []
    for action in command.options:
        if isinstance(action, argparse._HelpAction):
            continue
        value = _metavar(action)
        flag = action.option_strings[0]
        words.append(f"[{flag} {value}]" if value else f"[{flag}]")
    words.extend(_metavar(a) for a in command.positionals)
    if command.children:
        words.append("COMMAND")
    return " ".join(words)


def _synopsis(command: Command) -> str:
    return f"\\fB{_roff(' '.join(command.path))}\\fR {_roff(_usage(command))}".rstrip()


# -- man page (roff) -----------------------------------------------------------------

def _roff(text: str) -> str:
    """Text safe in roff: backslashes escaped, option dashes as minus signs, no line
    starting with a control character."""
    text = text.replace("\\", "\\e")
    text = re.sub(r"(?<![\w-])-[\w-]*", lambda m: m.group().replace("-", "\\-"), text)
    return "\n".join("\\&" + line if line.startswith((".", "'")) else line
                     for line in text.splitlines())


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


def man_page(parser: argparse.ArgumentParser) -> str:
    """The manual page, section 8, in roff."""
    top = Command((parser.prog,), parser, parser.description or "")
    name = parser.prog
    summary = (parser.description or name).rstrip(".")
    lines = [f'.TH {name.upper()} 8 "" "{name}" "System Administration"',
             ".SH NAME", f"{name} \\- {_roff(summary[:1].lower() + summary[1:])}",
             ".SH SYNOPSIS"]
    for command in top.walk():
        if not command.children:
            lines += [".HP", _synopsis(command)]
    lines += [".SH DESCRIPTION", _roff(parser.description or "")]
    if top.options or top.positionals:
        lines += [".SH OPTIONS"] + _option_lines(parser, top.positionals + top.options)
    commands = [c for c in top.walk() if c is not top]
    if commands:
        lines.append(".SH COMMANDS")
    for command in commands:
        lines += [".SS " + _roff(" ".join(command.path[1:])),
                  _roff(command.parser.description or command.help)]
        lines += [".PP", _synopsis(command)]
        if command.positionals or command.options:
            lines += _option_lines(command.parser, command.positionals + command.options)
    if parser.epilog:
        epilog = " ".join(parser.epilog.split())
        if epilog.lower().startswith("exit codes:"):
            lines += [".SH EXIT STATUS", _roff(epilog.split(":", 1)[1].strip())]
        else:
            lines += [".SH NOTES", _roff(epilog)]
    lines += [".SH FILES",
              ".TP", f"\\fI{_roff(state.DEFAULT_CONFIG)}\\fR",
              f"the configuration (\\fB{state.ENV_CONFIG}\\fR names another)",
              ".TP", f"\\fI{_roff(state.DEFAULT_RUN_DIR)}\\fR",
              f"what is applied, per guest (\\fB{state.ENV_RUN_DIR}\\fR names another)",
              ".TP", ", ".join(f"\\fI{_roff(hook(kind))}\\fR" for kind in HOOK_KINDS),
              "the libvirt hooks",
              ".SH SEE ALSO", ", ".join("\\fB%s\\fR(%s)" % tuple(s[:-1].split("("))
                                        for s in SEE_ALSO)]
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
             " `python3 -m portfwd.docs bash-completion`: do not edit",
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
    outputs = {"man": man_page, "bash-completion": bash_completion}
    if len(args) != 1 or args[0] not in outputs:
        print(f"usage: python3 -m portfwd.docs {'|'.join(outputs)}", file=sys.stderr)
        return 2
    from .cmdline import parser

    sys.stdout.write(outputs[args[0]](parser()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
