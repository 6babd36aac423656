"""Paths that may be fsspec URLs (``s3://bucket/run``, ``gs://...``): the one small abstraction the
run directory, checkpoints, locks and metrics use on object storage.

- :func:`as_path` gives a :class:`pathlib.Path` for a local path (exactly as before) and a
  :class:`UrlPath` for a URL. ``Path("s3://b/run")`` collapses to ``s3:/b/run``; :func:`as_path`
  restores it, so callers that wrapped a run directory in ``Path`` keep working.
- :class:`UrlPath` is the handful of ``pathlib`` operations the run directory needs (``/``, ``name``,
  ``parent``, ``exists``, ``is_dir``, ``iterdir``, ``read_text``, ``unlink``, exclusive create),
  through ``fsspec``. Listings and existence checks drop fsspec's listing cache first, so a follower
  (``--follow``) sees objects written by other processes.
- :func:`local_copy`: transformers cannot ``from_pretrained`` a URL; a model folder on object
  storage (a checkpoint) is downloaded once into ``$XDG_CACHE_HOME/oprd/remote/`` (keyed by its URL;
  fetched again when its checkpoint marker changed) and loaded from there.
- :func:`upload_folder`: a folder written locally is uploaded file by file, ``last`` (the marker)
  last, in one PUT.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import tempfile
import time
from pathlib import Path

from oprd_cli.errors import OprdError
from oprd_cli.io import atomic_write_bytes, is_local, url_to_fs

__all__ = ["UrlPath", "as_path", "is_url", "local_copy", "remove_tree", "upload_folder"]

# filesystems whose fsspec "xb" is a real exclusive create (s3fs: a PUT with If-None-Match: *)
EXCLUSIVE_PROTOCOLS = {"s3", "s3a", "file", "local", "memory"}
_URL = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]+):/+(.*)$")


class UrlPath:
    """A file or folder on an fsspec filesystem, named by its URL (no trailing slash)."""

    def __init__(self, url: str):
        self.url = str(url).rstrip("/")

    # ---- naming
    def __str__(self) -> str:
        return self.url

    def __repr__(self) -> str:
        return f"UrlPath({self.url!r})"

    def __eq__(self, other) -> bool:
        return isinstance(other, UrlPath) and other.url == self.url

    def __hash__(self) -> int:
        return hash(self.url)

    def __lt__(self, other) -> bool:
        return str(self) < str(other)

    def __truediv__(self, name: str) -> UrlPath:
        return UrlPath(f"{self.url}/{str(name).strip('/')}")

    @property
    def name(self) -> str:
        return self.url.rsplit("/", 1)[-1]

    @property
    def parent(self) -> UrlPath:
        return UrlPath(self.url.rsplit("/", 1)[0])

    def with_name(self, name: str) -> UrlPath:
        return self.parent / name

    def resolve(self) -> UrlPath:
        return self

    def expanduser(self) -> UrlPath:
        return self

    # ---- filesystem
    def _fs(self):
        return url_to_fs(self.url)

    def _fresh(self):
        """The filesystem with its listing cache dropped (all of it: a cached listing of a child
        prefix would hide a marker another process wrote since)."""
        fs, p = self._fs()
        fs.invalidate_cache()
        return fs, p

    def exists(self) -> bool:
        fs, p = self._fresh()
        return fs.exists(p)

    def is_dir(self) -> bool:
        fs, p = self._fresh()
        return fs.isdir(p)

    def is_file(self) -> bool:
        fs, p = self._fresh()
        return fs.isfile(p)

    def iterdir(self):
        fs, p = self._fresh()
        try:
            names = fs.ls(p, detail=False)
        except FileNotFoundError:
            return iter(())
        return iter([self / n.rstrip("/").rsplit("/", 1)[-1] for n in names if n.rstrip("/") != p])

    def mkdir(self, parents: bool = False, exist_ok: bool = False) -> None:
        """Object stores have no folders: a prefix exists once an object is under it."""
        if is_local(self.url):
            Path(self.url.removeprefix("file://")).mkdir(parents=parents, exist_ok=exist_ok)

    def read_bytes(self) -> bytes:
        fs, p = self._fs()
        return fs.cat_file(p)

    def read_text(self) -> str:
        return self.read_bytes().decode("utf-8")

    def write_text(self, text: str) -> None:
        atomic_write_bytes(self.url, text.encode("utf-8"))

    def unlink(self, missing_ok: bool = False) -> None:
        fs, p = self._fs()
        try:
            fs.rm_file(p)
        except FileNotFoundError:
            if not missing_ok:
                raise
        fs.invalidate_cache(p)

    def create_exclusive(self, data: bytes) -> bool:
        """Create the object only if it does not exist (S3: a conditional PUT, ``If-None-Match: *``);
        False when it exists. ``NotImplementedError`` on a filesystem not known to honour fsspec's
        ``"xb"`` (fsspec lets a backend treat it as a plain write)."""
        fs, p = self._fs()
        protocols = {fs.protocol} if isinstance(fs.protocol, str) else set(fs.protocol)
        if not protocols & EXCLUSIVE_PROTOCOLS:
            raise NotImplementedError(f"{self.url}: no exclusive create")
        try:
            with fs.open(p, "xb") as f:
                f.write(data)
        except FileExistsError:
            return False
        except OSError as e:  # no such bucket, no permission, ...
            raise OprdError(f"cannot write {self.url}: {e.strerror or str(e) or type(e).__name__} (does the "
                            "bucket exist, and may these credentials write to it?)") from None
        finally:
            fs.invalidate_cache(p)
        return True


def is_url(path) -> bool:
    return isinstance(path, UrlPath) or (not isinstance(path, Path) and not is_local(str(path))
                                         and _URL.match(str(path)) is not None)


def as_path(path: str | os.PathLike | UrlPath) -> Path | UrlPath:
    """A ``Path`` for a local path (unchanged), a :class:`UrlPath` for an fsspec URL (also one that
    ``Path`` collapsed: ``s3:/b/run``)."""
    if isinstance(path, UrlPath):
        return path
    m = _URL.match(str(path))
    if m is None:
        return Path(path)
    scheme, rest = m.groups()
    if scheme == "file":
        return Path("/" + rest.lstrip("/"))
    return UrlPath(f"{scheme}://{rest}")


def remove_tree(path: Path | UrlPath) -> None:
    """Delete a folder (a prefix) and everything under it; nothing when it does not exist."""
    if isinstance(path, UrlPath):
        fs, p = path._fresh()
        if fs.exists(p):
            fs.rm(p, recursive=True)
        fs.invalidate_cache(p)
    else:
        shutil.rmtree(path, ignore_errors=True)


def upload_folder(local: Path, dest: UrlPath, last: str | None = None) -> None:
    """Upload every file of ``local`` to ``dest``; the file named ``last`` goes last, in one PUT."""
    fs, root = dest._fs()
    files = sorted(p for p in Path(local).rglob("*") if p.is_file() and p.name != last)
    for f in files:
        fs.put_file(str(f), f"{root}/{f.relative_to(local).as_posix()}")
    if last is not None and (Path(local) / last).exists():
        atomic_write_bytes(str(dest / last), (Path(local) / last).read_bytes())
    fs.invalidate_cache(root)


def append_text(path: Path | UrlPath, text: str) -> None:
    """Append to a small log file; an object cannot be appended to, so it is rewritten (one PUT)."""
    if isinstance(path, UrlPath):
        old = path.read_text() if path.exists() else ""
        path.write_text(old + text)
        return
    with open(path, "a") as f:
        f.write(text)


def local_file(path: Path | UrlPath) -> str:
    """A local path with the content of ``path`` (the path itself when it is local), for readers that
    only take local files (``datasets``)."""
    if not isinstance(path, UrlPath):
        return str(path)
    dest = cache_root() / "files" / f"{hashlib.sha256(path.url.encode()).hexdigest()[:16]}-{path.name}"
    atomic_write_bytes(str(dest), path.read_bytes())
    return str(dest)


def cache_root() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "oprd" / "remote"


def local_copy(name: str, marker: str = "oprd_checkpoint.json") -> str:
    """``name`` itself for a local path or hub id; for a URL, a local copy of the folder (downloaded
    when absent or when its ``marker`` differs from the copy's)."""
    if not is_url(name):
        return str(name)
    src = as_path(str(name))
    key = hashlib.sha256(str(src).encode()).hexdigest()[:16]
    dest = cache_root() / f"{key}-{src.name}"
    remote_marker = (src / marker).read_bytes() if (src / marker).exists() else None
    if dest.is_dir() and (remote_marker is None or (dest / marker).exists()
                          and (dest / marker).read_bytes() == remote_marker):
        return str(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.tmp-", dir=dest.parent))
    try:
        fs, root = src._fresh()
        files = fs.find(root)
        if not files:
            raise OprdError(f"{name} does not exist (no objects under it)")
        for f in files:
            rel = f[len(root):].lstrip("/")
            (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
            fs.get_file(f, str(tmp / rel))
        try:
            if dest.exists():  # an older copy (the checkpoint was written again): set aside, then replaced
                old = dest.with_name(f".{dest.name}.old-{os.getpid()}-{time.monotonic_ns()}")
                os.replace(dest, old)
                shutil.rmtree(old, ignore_errors=True)
            os.replace(tmp, dest)
        except OSError:  # another process put its copy in place meanwhile
            if not dest.is_dir():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return str(dest)
