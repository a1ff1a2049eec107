"""The compiled configuration under the run directory (``compiled/``, see
``state``): the parsed forward.toml, one file of binding templates per guest
name and per UUID, so that the hook reads a few bytes instead of parsing TOML.

    compiled -> compiled.PID.RANDOM/
        signature   ``state.config_signature`` of the file it was compiled from
        domain_forwards   present (empty) when [options] domain_forwards = true
        options     (table, strict, [discover sources])
        name/NAME   the binding templates (``plan.Template``) of guest NAME
        uuid/UUID   … of a guest named by UUID

Written as a new folder and the ``compiled`` link swapped to it in one rename
(``write``); the hook's early exit reads only ``state.cached_signature`` and
``state.cached_guest_files``.
"""

from __future__ import annotations

import os

from portfwd.rundir.run_host import ensure_dir
from portfwd.rundir.state import (COMPILED, DOMAIN_FORWARDS, NEW_LINK, cached_guest_files, cached_signature, compiled_dir,
                    config_signature, file_name, run_dir)

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Dict, List, Optional, Tuple

    from portfwd.plan import Template


def write(root: str, groups: Dict[Tuple[str, str], List[Template]],
          options: Tuple[str, bool, List[str]], signature: str,
          domain_forwards: bool = False) -> None:
    """A new ``compiled.PID.RANDOM`` folder, then the ``compiled`` symlink swapped
    to it in one rename: the hook sees the old cache or the new one, never a mix.
    ``domain_forwards``: an empty file DOMAIN_FORWARDS says so
    (``state.cached_domain_forwards``)."""
    import marshal
    import shutil

    ensure_dir(root)
    target = _new_folder(root)
    for sub in ("name", "uuid"):
        os.mkdir(os.path.join(target, sub))
    for (sub, ident), templates in groups.items():
        with open(os.path.join(target, sub, file_name(ident)), "xb") as f:
            marshal.dump(templates, f)
    with open(os.path.join(target, "options"), "xb") as f:
        marshal.dump(options, f)
    with open(os.path.join(target, "signature"), "x", encoding="utf-8") as f:
        f.write(signature)
    if domain_forwards:
        open(os.path.join(target, DOMAIN_FORWARDS), "xb").close()
    tmp_link = os.path.join(root, f"{NEW_LINK}{os.getpid()}.{os.urandom(4).hex()}")
    os.symlink(os.path.basename(target), tmp_link)
    os.replace(tmp_link, compiled_dir(root))
    for name in os.listdir(root):
        old = os.path.join(root, name)
        if name.startswith(COMPILED + ".") and old != target and not os.path.islink(old):
            shutil.rmtree(old, ignore_errors=True)


def _new_folder(root: str) -> str:
    """A new empty folder ``compiled.PID.RANDOM``: never one that exists (the one
    ``compiled`` points to, made by an earlier process of the same pid)."""
    while True:
        target = os.path.join(root, f"{COMPILED}.{os.getpid()}.{os.urandom(4).hex()}")
        try:
            os.mkdir(target)
            return target
        except FileExistsError:
            continue


def read(root: str, name: str, uuid: Optional[str], config: str
         ) -> Optional[Tuple[str, bool, Tuple[str, ...], List[Template]]]:
    """(table, strict, discover, templates) of a guest; None if stale or unreadable."""
    import marshal

    if cached_signature(root) != config_signature(config):
        return None
    try:
        with open(os.path.join(compiled_dir(root), "options"), "rb") as f:
            table, strict, discover = marshal.load(f)
        items: List[Template] = []
        for path in cached_guest_files(name, uuid, root):
            with open(path, "rb") as f:
                items.extend(marshal.load(f))
    except (OSError, EOFError, ValueError, TypeError):
        return None
    return str(table), bool(strict), tuple(str(d) for d in discover), items


def strict(root: Optional[str] = None) -> bool:
    """``strict`` as last compiled, whatever the signature (False if unknown)."""
    import marshal

    try:
        with open(os.path.join(compiled_dir(root or run_dir()), "options"), "rb") as f:
            return bool(marshal.load(f)[1])
    except (OSError, EOFError, ValueError, TypeError, IndexError):
        return False
