"""libvirt's AppArmor confinement, read statically: may the confined libvirt daemon
execute what a portfwd hook executes?

Debian and Ubuntu confine libvirtd with ``/etc/apparmor.d/usr.sbin.libvirtd``, and the
hooks run inside that profile. It lets the daemon execute a short list of paths
(``/etc/libvirt/hooks/** rmix``, ``/usr/bin/* PUx``, ``/usr/sbin/* PUx``, …) and
nothing else, and AppArmor matches the path of a file after its symlinks are resolved
(apparmor.d(5)). This module reads such a profile file (with its includes and
variables), keeps the file rules that carry an exec permission, and tells whether a
resolved path may be executed, and by which rule (AppArmor's globs: ``*``, ``**``,
``?``, ``[...]``, ``{a,b}``; ``deny`` and ``owner`` rules; child profiles and hats
are not the profile's own rules); ``refusal`` holds a hook's exec chain (see
``hookchain``) against a profile.

Parsing and matching are pure functions of text (``parse``, ``exec_verdict``);
``read_profiles`` reads files below a root, so that a Debian root
or a mounted image can be checked as well as ``/``. Used by ``portfwd doctor``.
"""

from __future__ import annotations

import os
import re
import shlex
from typing import Callable, Dict, List, Optional, Sequence, Tuple

from portfwd.host.hookchain import Step
from portfwd.host.pathwalk import at

APPARMOR_DIR = "/etc/apparmor.d"
# libvirt's daemons and the hook kinds each runs (the monolithic libvirtd runs both)
LIBVIRT_PROFILES = (("usr.sbin.libvirtd", ("qemu", "network")),
                    ("usr.sbin.virtqemud", ("qemu",)),
                    ("usr.sbin.virtnetworkd", ("network",)))
MAX_INCLUDE_DEPTH = 20

_INCLUDE = re.compile(r'\s*#?include(\s+if\s+exists)?\s+(<[^>]*>|"[^"]*")\s*$')
_VARIABLE = re.compile(r"\s*@\{(\w+)\}\s*(\+?=)\s*(.*?)\s*$")
_MODE = re.compile(r"[rwaklmixpuPUcCD]+")
_QUALIFIERS = frozenset({"audit", "deny", "allow", "owner", "quiet", "kill", "complain",
                         "prompt"})
# files apparmor_parser skips when it includes a directory
_SKIPPED = re.compile(r"(^\.|~$|\.dpkg-\w+$|\.rpm\w*$|\.bak$|^README$)")


# -- globs ------------------------------------------------------------------------

def glob_regex(pattern: str) -> "re.Pattern[str]":
    """An AppArmor path glob (variables already expanded) as an anchored regex.

    ``*`` is any run of characters but ``/``, ``**`` any run including ``/``, ``?``
    one character but ``/``, ``[...]`` / ``[^...]`` a character class, ``{a,b}``
    alternatives (nesting allowed), ``\\`` escapes. As apparmor_parser does, a
    ``*`` or ``**`` that is a whole path component (``/foo/*``, ``/foo/**``) matches
    at least one character, so ``/foo/*`` matches neither ``/foo/`` nor ``//``,
    and repeated slashes in the pattern count as one. ValueError when unbalanced.
    """
    src = re.sub(r"/{2,}", "/", pattern)
    out: List[str] = []
    depth = 0
    i, n = 0, len(src)
    while i < n:
        c = src[i]
        if c == "\\" and i + 1 < n:
            out.append(re.escape(src[i + 1]))
            i += 2
            continue
        if c == "*":
            j = i
            while j < n and src[j] == "*":
                j += 1
            if i > 0 and src[i - 1] == "/" and (j == n or src[j] == "/"):
                out.append("[^/\x00]")  # a whole component: not empty
            out.append("[^\x00]*" if j - i > 1 else "[^/\x00]*")
            i = j
            continue
        if c == "[":
            end = src.find("]", i + 2 if src.startswith("[^", i) else i + 1)
            if end < 0:
                raise ValueError(f"{pattern}: unclosed [")
            body = src[i + 1:end]
            negate = body.startswith("^")
            body = body[1:] if negate else body
            out.append("[" + ("^" if negate else "") + body.replace("\\", "\\\\")
                       .replace("[", "\\[") + "]")
            i = end + 1
            continue
        if c == "?":
            out.append("[^/\x00]")
        elif c == "{":
            depth += 1
            out.append("(?:")
        elif c == "}" and depth:
            depth -= 1
            out.append(")")
        elif c == "," and depth:
            out.append("|")
        else:
            out.append(re.escape(c))
        i += 1
    if depth:
        raise ValueError(f"{pattern}: unclosed {{")
    return re.compile("".join(out), re.DOTALL)


_VAR_USE = re.compile(r"(?<!\\)@\{(\w+)\}")


def expand(pattern: str, variables: Dict[str, List[str]]) -> str:
    """``pattern`` with each ``@{NAME}`` replaced by its values as ``{v1,v2}``;
    KeyError names an unknown (or self-referencing) variable.

    As apparmor_parser does, a value's own variables are expanded first (each
    combination a value), and where the variable follows ``x/`` or precedes ``/``
    the values lose their leading or trailing slashes (``@{HOME}/.x`` with HOME
    ``/root/`` is ``/root/.x``)."""
    m = _VAR_USE.search(pattern)
    if m is None:
        return pattern
    prefix, suffix = pattern[:m.start()], pattern[m.end():]
    values = _values(m.group(1), variables, ())
    if prefix.endswith("/") and prefix.strip("/"):
        values = [v.lstrip("/") for v in values]
    if suffix.startswith("/"):
        values = [v.rstrip("/") for v in values]
    alternatives = values[0] if len(values) == 1 else "{" + ",".join(values) + "}"
    return prefix + expand(alternatives + suffix, variables)


def _values(name: str, variables: Dict[str, List[str]], seen: Tuple[str, ...]) -> List[str]:
    """The values of variable ``name``, each with its variables expanded."""
    if name not in variables or name in seen:
        raise KeyError(name)
    out: List[str] = []
    work = list(variables[name])
    while work:
        value = work.pop(0)
        m = _VAR_USE.search(value)
        if m is None:
            out.append(value)
            continue
        work += [value[:m.start()] + v + value[m.end():]
                 for v in _values(m.group(1), variables, seen + (name,))]
    return out


# -- profiles ------------------------------------------------------------------------

class Rule:
    """A file rule with an exec permission (``x`` in its mode), allowing or denying."""

    __slots__ = ("pattern", "mode", "deny", "owner", "text", "regex")

    def __init__(self, pattern: str, mode: str, deny: bool, owner: bool, text: str) -> None:
        self.pattern = pattern  # variables expanded
        self.mode = mode  # as written: "PUx", "rmix", "rwxl"
        self.deny = deny
        self.owner = owner  # applies only to files the confined task owns
        self.text = text  # the rule as written, for messages
        self.regex = glob_regex(pattern)

    def matches(self, path: str, owner: bool) -> bool:
        return (owner or not self.owner) and self.regex.fullmatch(path) is not None


class Profile:
    """A top-level profile: its name, attachment and exec rules (not its children's)."""

    __slots__ = ("name", "attachment", "source", "rules")

    def __init__(self, name: str, attachment: Optional[str], source: str) -> None:
        self.name = name
        self.attachment = attachment
        self.source = source
        self.rules: List[Rule] = []


class Verdict:
    """Whether a profile lets its task execute a path: the allowing rule, and a
    denying rule (which wins)."""

    __slots__ = ("allowed_by", "denied_by")

    def __init__(self, allowed_by: Optional[Rule], denied_by: Optional[Rule]) -> None:
        self.allowed_by = allowed_by
        self.denied_by = denied_by

    @property
    def allowed(self) -> bool:
        return self.allowed_by is not None and self.denied_by is None


def exec_verdict(profile: Profile, path: str, owner: bool = True) -> Verdict:
    """May ``profile``'s task execute ``path`` (a resolved path)? ``owner``: the
    file belongs to the task's uid (libvirtd runs as root), so ``owner`` rules count."""
    allowed = next((r for r in profile.rules if not r.deny and r.matches(path, owner)), None)
    denied = next((r for r in profile.rules if r.deny and r.matches(path, owner)), None)
    return Verdict(allowed, denied)


Include = Callable[[str, bool, str], Optional[List[Tuple[str, str]]]]


def parse(text: str, source: str, include: Include) -> Tuple[List[Profile], List[str]]:
    """The top-level profiles of a profile file's ``text`` and what could not be read
    (a missing include, an unknown variable, unbalanced braces), each located.

    ``include(name, quoted, from_source)`` returns the (source, text) of every file an
    include names (several for a directory), or None when there is none.
    """
    problems: List[str] = []
    variables: Dict[str, List[str]] = {}
    lines: List[Tuple[str, str]] = []
    _flatten(text, source, include, 0, lines, variables, problems)
    profiles: List[Profile] = []
    depth = 0
    current: Optional[Profile] = None
    for where, kind, statement in _statements(lines, problems):
        if kind == "open":
            if depth == 0:
                current = _profile_header(statement, where)
                if current is not None:
                    profiles.append(current)
            depth += 1
        elif kind == "close":
            depth -= 1
            if depth == 0:
                current = None
        elif depth == 1 and current is not None:
            rule = _exec_rule(statement, variables, where, problems)
            if rule is not None:
                current.rules.append(rule)
    if depth:
        problems.append(f"{source}: unclosed {{ (a profile or block without its }})")
    return profiles, problems


def _flatten(text: str, source: str, include: Include, depth: int,
             out: List[Tuple[str, str]], variables: Dict[str, List[str]],
             problems: List[str]) -> None:
    """The lines of ``text`` with includes inlined and comments and variable
    definitions taken out (into ``variables``)."""
    for number, raw in enumerate(text.splitlines(), 1):
        where = f"{source}:{number}"
        m = _INCLUDE.match(raw)
        if m:
            name, quoted = m.group(2)[1:-1], m.group(2).startswith('"')
            files = include(name, quoted, source) if depth < MAX_INCLUDE_DEPTH else None
            if files is None:
                if not m.group(1):
                    problems.append(f"{where}: include {m.group(2)}: no such file")
                continue
            for sub_source, sub_text in files:
                _flatten(sub_text, sub_source, include, depth + 1, out, variables, problems)
            continue
        line = _strip_comment(raw)
        v = _VARIABLE.match(line)
        if v:
            values = [w.strip('"') for w in shlex.split(v.group(3), posix=False)]
            if v.group(2) == "+=":
                variables.setdefault(v.group(1), []).extend(values)
            else:
                variables[v.group(1)] = values
        elif line.strip() and not line.lstrip().startswith("$"):  # $bool = … : not a path
            out.append((where, line))


def _strip_comment(line: str) -> str:
    quoted = False
    for i, c in enumerate(line):
        if c == '"':
            quoted = not quoted
        elif c == "#" and not quoted:
            return line[:i]
    return line


def _statements(lines: List[Tuple[str, str]], problems: List[str]
                ) -> List[Tuple[str, str, str]]:
    """(where, kind, text): ``rule`` statements (ended by ``,``), ``open`` (a block's
    header, ended by a ``{`` that stands alone) and ``close``. Commas and braces
    inside globs ``{a,b}``, parentheses and quotes belong to the statement."""
    out: List[Tuple[str, str, str]] = []
    buf: List[str] = []
    glob = paren = 0
    quoted = False
    where = ""
    for line_where, line in lines:
        if not "".join(buf).strip():
            where = line_where
        text = line + "\n"
        for i, c in enumerate(text):
            before = text[i - 1] if i else " "
            after = text[i + 1] if i + 1 < len(text) else "\n"
            if c == '"':
                quoted = not quoted
            elif quoted:
                pass
            elif c == "(":
                paren += 1
            elif c == ")":
                paren = max(paren - 1, 0)
            elif c == "{" and not glob and not paren and before.isspace() and after.isspace():
                out.append((where, "open", "".join(buf).strip()))
                buf = []
                where = line_where
                continue
            elif c == "{":
                glob += 1
            elif c == "}" and glob:
                glob -= 1
            elif c == "}" and not paren:
                if "".join(buf).strip():
                    problems.append(f"{where}: statement without its ',': {''.join(buf).strip()}")
                out.append((line_where, "close", ""))
                buf = []
                continue
            elif c == "," and not glob and not paren:
                out.append((where, "rule", "".join(buf).strip()))
                buf = []
                where = line_where
                continue
            buf.append(c)
    return out


def _words(statement: str) -> List[str]:
    """Whitespace-separated words; quotes, braces and parentheses keep theirs."""
    words: List[str] = []
    buf: List[str] = []
    depth = 0
    quoted = False
    for c in statement:
        if c == '"':
            quoted = not quoted
        elif not quoted and c in "{(":
            depth += 1
        elif not quoted and c in "})":
            depth -= 1
        if c.isspace() and not quoted and depth <= 0:
            if buf:
                words.append("".join(buf))
                buf = []
            continue
        buf.append(c)
    if buf:
        words.append("".join(buf))
    return words


def _is_path(word: str) -> bool:
    return word.lstrip('"').startswith(("/", "@{"))


def _profile_header(header: str, where: str) -> Optional[Profile]:
    """A top-level block: ``profile NAME [ATTACHMENT] [flags=(…)]`` or ``PATH [flags]``."""
    words = [w for w in _words(header) if not w.startswith("flags=") and w != "xattrs"]
    if words[:1] == ["profile"] and len(words) > 1:
        attachment = words[2].strip('"') if len(words) > 2 and _is_path(words[2]) else None
        return Profile(words[1].strip('"'), attachment, where)
    if words and _is_path(words[0]):
        return Profile(words[0].strip('"'), words[0].strip('"'), where)
    return None  # a conditional or another kind of block: not a profile


def _exec_rule(statement: str, variables: Dict[str, List[str]], where: str,
               problems: List[str]) -> Optional[Rule]:
    """The file rule ``statement`` when its mode holds ``x``, else None."""
    words = _words(statement)
    deny = owner = False
    while words and (words[0] in _QUALIFIERS or words[0].startswith("priority=")):
        deny |= words[0] == "deny"
        owner |= words[0] == "owner"
        words.pop(0)
    if words[:1] == ["file"]:
        words.pop(0)
    if len(words) < 2:
        return None
    if _is_path(words[0]) and _MODE.fullmatch(words[1]):
        path, mode = words[0], words[1]
    elif _MODE.fullmatch(words[0]) and _is_path(words[1]):
        mode, path = words[0], words[1]
    else:
        return None  # capability, network, mount, signal, …: not a file rule
    if "x" not in mode:
        return None
    try:
        return Rule(expand(path.strip('"'), variables), mode, deny, owner, statement)
    except KeyError as e:
        problems.append(f"{where}: unknown variable @{{{e.args[0]}}} in: {statement}")
    except ValueError as e:
        problems.append(f"{where}: {e}")
    return None


class Profiles:
    """What one profile file defines, and what could not be read of it."""

    __slots__ = ("path", "profiles", "problems")

    def __init__(self, path: str, profiles: List[Profile], problems: List[str]) -> None:
        self.path = path
        self.profiles = profiles
        self.problems = problems


def read_profiles(root: str, name: str, extra_dirs: Sequence[str] = ()) -> Optional[Profiles]:
    """The profile file ``name`` of ``root``'s /etc/apparmor.d (None when absent), its
    ``<includes>`` looked up there, then in ``extra_dirs`` (host paths)."""
    base = at(root, APPARMOR_DIR)
    path = os.path.join(base, name)
    try:
        text = _read_text(path)
    except FileNotFoundError:
        return None
    except OSError as e:
        return Profiles(path, [], [f"{path}: cannot read: {e.strerror}"])
    dirs = [base] + list(extra_dirs)

    def include(wanted: str, quoted: bool, source: str) -> Optional[List[Tuple[str, str]]]:
        if quoted and wanted.startswith("/"):
            candidates = [at(root, wanted)]
        elif quoted:
            candidates = [os.path.join(os.path.dirname(source), wanted)]
        else:
            candidates = [os.path.join(d, wanted) for d in dirs]
        for candidate in candidates:
            try:
                if os.path.isdir(candidate):
                    files = sorted(f for f in os.listdir(candidate) if not _SKIPPED.search(f))
                    return [(os.path.join(candidate, f), _read_text(os.path.join(candidate, f)))
                            for f in files if os.path.isfile(os.path.join(candidate, f))]
                return [(candidate, _read_text(candidate))]
            except OSError:
                continue
        return None

    profiles, problems = parse(text, path, include)
    return Profiles(path, profiles, problems)


def _read_text(path: str) -> str:
    with open(path, "rb") as f:
        return f.read().decode("utf-8", "surrogateescape")


def refusal(profile: Profile, steps: Sequence[Step]) -> Optional[Tuple[Step, Verdict]]:
    """The first step ``profile`` does not let its task execute, with the verdict."""
    for step in steps:
        if step.real is None:
            continue  # a missing file is not the profile's doing
        verdict = exec_verdict(profile, step.real, owner=step.uid == 0)
        if not verdict.allowed:
            return step, verdict
    return None
