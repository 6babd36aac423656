"""Atomic writes and small JSON helpers: the one place that knows how to publish a file safely.

A reader sees either the old content (or nothing) or all of the new content, never a part:

- on a local disk, the bytes go to a temporary file beside the target, are flushed and
  ``fsync``-ed, then ``os.replace`` puts them in place (atomic on POSIX);
- on object storage or any other fsspec URL, one PUT (``pipe_file``) is atomic by itself.

``atomic_target`` is the same rule for writers that insist on a path of their own
(``matplotlib.savefig``, a library that writes a file): they write the temporary path, and it
replaces the target only when the block finishes without an exception.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from pathlib import Path
from typing import Any, Iterator

import fsspec

__all__ = ["is_local", "url_to_fs", "atomic_write_bytes", "atomic_write_text", "write_json", "read_json",
           "atomic_target"]


def is_local(path: str | os.PathLike) -> bool:
    """True for a plain path or a ``file://`` URL."""
    s = str(path)
    return "://" not in s or s.startswith("file://")


def url_to_fs(path: str | os.PathLike):
    """``(filesystem, path inside it)`` for a local path or an fsspec URL, without a trailing slash."""
    fs, root = fsspec.core.url_to_fs(str(path))
    return fs, root.rstrip("/")


def _tmp_name(target: str) -> str:
    head, tail = os.path.split(target)
    return os.path.join(head, f".{tail}.tmp-{os.getpid()}-{time.monotonic_ns()}")


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Publish ``data`` at ``path`` atomically (local: temp + fsync + rename; fsspec: one PUT)."""
    fs, target = url_to_fs(path)
    if not is_local(path):
        fs.pipe_file(target, data)
        return
    os.makedirs(os.path.dirname(target) or ".", exist_ok=True)
    tmp = _tmp_name(target)
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """:func:`atomic_write_bytes` for UTF-8 text."""
    atomic_write_bytes(path, text.encode("utf-8"))


def write_json(path: str | os.PathLike, obj: Any, indent: int | None = 2, sort_keys: bool = True) -> None:
    """Write a small JSON document atomically (with a trailing newline)."""
    atomic_write_text(path, json.dumps(obj, indent=indent, sort_keys=sort_keys, ensure_ascii=False) + "\n")


def read_json(path: str | os.PathLike) -> Any | None:
    """The parsed JSON at ``path``, or ``None`` when there is no such file."""
    fs, target = url_to_fs(path)
    try:
        with fs.open(target, "rb") as f:
            return json.loads(f.read())
    except FileNotFoundError:
        return None


@contextlib.contextmanager
def atomic_target(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary local path to write; on success it is fsync-ed and replaces ``path``.

    The temporary name keeps ``path``'s suffix (``.png`` stays ``.png``) so that writers that pick a
    format from the suffix still work. On an exception the temporary file is removed and ``path`` is
    left as it was.
    """
    target = Path(os.path.expanduser(str(path)))
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.stem}.tmp-{os.getpid()}-{time.monotonic_ns()}{target.suffix}")
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, target)
    finally:
        if tmp.exists():
            tmp.unlink()
