"""What running a portfwd hook executes, as libvirt runs it: the hook, its ``#!``
interpreters, the shell and Python it hands over to and the tools those run, each
resolved inside a root directory (AppArmor matches the path of a file after its
symlinks are resolved). ``apparmor.refusal`` holds this chain against a profile.
"""

from __future__ import annotations

import os
import re
import shlex
from typing import List, Optional

from portfwd.host.pathwalk import at, resolve

# the PATH libvirt gives its hooks (virCommandAddEnvPassCommon)
LIBVIRT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
# what the hooks' sh lines run besides their interpreter
SH_TOOLS = ("cat", "logger")
# what the hook's Python runs (compat.py's iptables tools, looked up on PATH)
HOOK_TOOLS = ("iptables", "ip6tables", "iptables-nft", "ip6tables-nft", "iptables-legacy",
              "ip6tables-legacy")
MAX_INTERPRETERS = 4  # nested #! the kernel follows


class Step:
    """A file that running a hook executes: why (``role``), the path as named, its
    real path inside the root (None: it does not exist) and its owner's uid."""

    __slots__ = ("role", "named", "real", "uid")

    def __init__(self, role: str, named: str, real: Optional[str], uid: int = 0) -> None:
        self.role = role  # "hook", "interpreter", "shell", "python", "tool"
        self.named = named
        self.real = real
        self.uid = uid

    @property
    def via_symlink(self) -> bool:
        return self.real is not None and self.real != os.path.normpath(self.named)


def hook_chain(root: str, hook: str, path_env: str = LIBVIRT_PATH) -> List[Step]:
    """Every file running ``hook`` (a portfwd hook, as libvirt runs it) executes, each
    resolved inside ``root``: the hook, its ``#!`` interpreter, for the Debian
    package's wrapper the shell it hands the hook under /usr/lib to, the Python of
    the hook's ``py=`` line, the tools its sh lines and its Python run (those that
    exist on libvirt's PATH)."""
    steps = _executed(root, "hook", hook)
    texts = [_script(root, steps[0].real)]
    wrapped = re.search(r'^hook=(\S+)\n(?:.*\n)*?\s*exec (\S+) "\$hook"', texts[0], re.M)
    if wrapped:  # the Debian package's hook: `exec /bin/sh "$hook"` of the file under /usr/lib
        steps += _executed(root, "shell", wrapped.group(2))
        try:
            texts.append(_script(root, resolve(root, wrapped.group(1))))
        except OSError:
            pass
    py = re.search(r"^py=(.+)$", texts[-1], re.M)
    words = shlex.split(py.group(1)) if py else []
    if words:
        steps += _executed(root, "python", words[0])
    tools = [t for t in SH_TOOLS if any(re.search(rf"(^|\s){t} ", t_) for t_ in texts)]
    for tool in tools + (list(HOOK_TOOLS) if words else []):
        found = which(root, tool, path_env)
        if found:
            steps += _executed(root, "tool", found)
    return steps


def _executed(root: str, role: str, path: str, level: int = 0) -> List[Step]:
    """``path`` and, for a script, its ``#!`` interpreter(s)."""
    try:
        real: Optional[str] = resolve(root, path)
        uid = os.stat(at(root, str(real))).st_uid
    except OSError:
        return [Step(role, path, None)]
    steps = [Step(role, path, real, uid)]
    interpreter = _shebang(at(root, str(real)))
    if interpreter and level < MAX_INTERPRETERS:
        steps += _executed(root, "interpreter", interpreter, level + 1)
    return steps


def _shebang(path: str) -> Optional[str]:
    try:
        with open(path, "rb") as f:
            first = f.readline(256)
    except OSError:
        return None
    if not first.startswith(b"#!"):
        return None
    words = first[2:].decode("utf-8", "replace").split()
    return words[0] if words else None


def _script(root: str, real: Optional[str]) -> str:
    """The text of the script at the real path ``real`` ("" when unreadable)."""
    if real is None:
        return ""
    try:
        with open(at(root, real), "rb") as f:
            return f.read().decode("utf-8", "surrogateescape")
    except OSError:
        return ""


def which(root: str, name: str, path_env: str = LIBVIRT_PATH) -> Optional[str]:
    """The first executable ``name`` on ``path_env`` inside ``root`` (as named, not
    resolved), or None."""
    for folder in path_env.split(":"):
        candidate = os.path.join(folder, name)
        try:
            real = at(root, resolve(root, candidate))
        except OSError:
            continue
        if os.path.isfile(real) and os.stat(real).st_mode & 0o111:
            return candidate
    return None
