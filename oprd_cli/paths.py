"""Output paths checked before any work: nothing a user made is overwritten or written into by mistake.

:func:`check_output` refuses, in one line and before a model is loaded, an output that lies inside
one of the command's inputs (``--out`` inside the rollout store or the cache it reads), one under a
regular file, a regular file where a folder is expected, and (for stores) an existing folder that
is not a store of the kind the command writes, even with ``--overwrite``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Iterable

from oprd_cli.errors import OprdError
from oprd_cli.io import is_local

__all__ = ["check_output", "inside"]


def _real(path: str | os.PathLike) -> Path:
    return Path(os.path.realpath(os.path.expanduser(str(path))))


def inside(path: str | os.PathLike, folder: str | os.PathLike) -> bool:
    """True when ``path`` is ``folder`` or below it (symlinks resolved)."""
    p, f = _real(path), _real(folder)
    return p == f or f in p.parents


def check_output(out: str | os.PathLike, what: str, *, inputs: Iterable[str | os.PathLike | None] = (),
                 kind: str | None = None) -> None:
    """Refuse ``out`` (one line naming it) when it cannot or must not be written.

    ``inputs`` are the paths the command reads (an output inside one is refused); ``kind`` is the
    store kind the command writes (an existing folder that is not an oprd store of that kind is
    refused, so ``--overwrite`` never deletes a folder of something else)."""
    if not is_local(str(out)):
        return
    for src in inputs:
        if src is not None and is_local(str(src)) and inside(out, src):
            raise OprdError(f"{what} {out} is inside the input {src}; choose a path outside it")
    p = Path(os.path.expanduser(str(out)))
    for parent in [p, *p.parents]:
        if parent.exists():
            if not parent.is_dir():
                where = "is a file" if parent == p else f"is under the file {parent}"
                raise OprdError(f"cannot write {what} {out}: it {where}, not a folder")
            break
    if kind is not None and p.is_dir() and any(p.iterdir()):
        _check_store_kind(p, what, kind)


def _check_store_kind(p: Path, what: str, kind: str) -> None:
    from oprd_cli.stores import common

    try:
        found = common.read_meta(str(p)).get("kind")
    except OprdError:
        found = None
    if found is None and [x.name for x in p.iterdir()] == ["zarr.json"]:
        return  # the first write of a writer that was stopped before it set its attributes
    if found != kind:
        desc = f"a {found!r} store" if found else "a folder that is not an oprd store"
        raise OprdError(f"{what} {p} is {desc}; refusing to replace it (remove it yourself or choose another path)")
