"""One writer at a time: a lock file created with ``O_CREAT | O_EXCL`` that names its holder.

``train`` holds ``DIR/oprd-train.lock`` on its run directory (or ``--out``), a rollout holds
``.NAME.lock`` beside the store it writes. The file holds JSON ``{"host", "pid", "started", "command",
"since"}``; a second writer is refused in one line naming the holder's host and pid. A lock whose
holder is gone (same host, and the pid no longer runs, or now runs another process: its start time
differs) is stale and is taken over: under a short ``.takeover`` guard file (itself created with
``O_EXCL``) the taker re-reads the lock, checks that it is still the same stale one, removes it and
creates its own, so two processes that find one stale lock never both win. A lock of another host is
never taken over automatically: its message says how to remove it.

On object storage (a run directory at an fsspec URL) the lock is an object created with a
conditional PUT (``If-None-Match: *``, fsspec's exclusive mode ``"xb"``), S3's equivalent of
``O_EXCL``: of two writers, exactly one PUT succeeds. A filesystem without exclusive create is told
in one warning line (writer exclusion is then not enforced there).
"""

from __future__ import annotations

import json
import os
import socket
import time
from pathlib import Path
from typing import Any

from oprd_cli.errors import OprdError
from oprd_cli.urlpath import UrlPath, as_path

__all__ = ["WriterLock", "holder_alive"]


def _start_ticks(pid: int) -> int | None:
    """The process's start time in clock ticks since boot (Linux), to tell a reused pid apart."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        return int(stat.rsplit(")", 1)[1].split()[19])
    except (OSError, ValueError, IndexError):
        return None


def holder_alive(info: dict[str, Any]) -> bool:
    """Whether the process a lock names still runs (only decidable on this host: else True)."""
    if info.get("host") != socket.gethostname():
        return True
    pid = int(info.get("pid") or 0)
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    started = info.get("started")
    return started is None or _start_ticks(pid) in (None, started)


def _read(path: Path | UrlPath) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (ValueError, OSError):
        return {}  # being written this instant, or damaged


def _create(path: Path | UrlPath, info: dict[str, Any]) -> bool:
    if isinstance(path, UrlPath):
        try:
            return path.create_exclusive(json.dumps(info).encode())
        except NotImplementedError:  # this filesystem has no (known) exclusive create
            from oprd_cli.console import warn

            warn(f"{path.url.split(':')[0]}:// has no exclusive create; a second writer of {path.parent} is not "
                 "refused (see docs/scale-out.md)")
            path.write_text(json.dumps(info))
            return True
    try:
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
        return False
    with os.fdopen(fd, "w") as f:
        f.write(json.dumps(info))
        f.flush()
        os.fsync(f.fileno())
    return True


class WriterLock:
    """``with WriterLock(path, "oprd train", what="run directory RUN"):`` ... (refuses a live holder)."""

    def __init__(self, path: str | os.PathLike, command: str, what: str):
        self.path, self.command, self.what = as_path(path), command, what
        self.info = {"host": socket.gethostname(), "pid": os.getpid(), "started": _start_ticks(os.getpid()),
                     "command": command, "since": time.strftime("%Y-%m-%dT%H:%M:%S%z")}

    def acquire(self) -> "WriterLock":
        self.path.parent.mkdir(parents=True, exist_ok=True)
        for _ in range(50):
            if _create(self.path, self.info):
                return self
            holder = _read(self.path)
            if holder is None:
                continue  # released meanwhile
            if holder and holder_alive(holder):
                raise OprdError(
                    f"{self.what} is in use by {holder.get('command', 'another oprd')} (pid {holder.get('pid')} on "
                    f"{holder.get('host')}, since {holder.get('since')}); wait for it to finish, or remove "
                    f"{self.path} if that process is gone")
            if not holder:  # unreadable: give its writer a moment
                time.sleep(0.05)
                if _read(self.path) == {}:
                    self._take_over({})
                continue
            self._take_over(holder)
        raise OprdError(f"could not take the lock {self.path}; remove it if no oprd process uses {self.what}")

    def _take_over(self, stale: dict[str, Any]) -> None:
        guard = self.path.with_name(self.path.name + ".takeover")
        if not _create(guard, self.info):
            other = _read(guard)
            if other is not None and not holder_alive(other or {"host": socket.gethostname(), "pid": 0}):
                guard.unlink(missing_ok=True)  # a taker that died mid-way
            time.sleep(0.05)
            return
        try:
            if _read(self.path) == stale:  # still the same stale lock: nobody took it meanwhile
                self.path.unlink(missing_ok=True)
        finally:
            guard.unlink(missing_ok=True)

    def release(self) -> None:
        if _read(self.path) == self.info:
            self.path.unlink(missing_ok=True)

    def __enter__(self) -> "WriterLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
