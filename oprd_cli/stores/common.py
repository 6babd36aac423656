"""Pieces shared by every Zarr store: formats, completion markers, digests, codecs.

A store is a Zarr v3 group. Its root attributes hold ``{"oprd": {"kind": ...,
"format_version": ..., ...}}``. It is *complete* exactly when the marker object
``oprd_complete.json`` exists at its root; the marker is the last write of a
store and is written atomically (temp file + rename on a local disk, a single
PUT on object storage), so a store being written is invisible to readers.

Paths may be local paths or fsspec URLs (``s3://...``, ``gs://...``), wherever
zarr accepts them.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass
from typing import Any, Iterable

import numpy as np
import zarr

from oprd_cli.errors import OprdError
from oprd_cli.io import atomic_write_bytes, is_local, read_json  # noqa: F401  (re-exported for the stores)
from oprd_cli.io import url_to_fs as _fs

COMPLETE_MARKER = "oprd_complete.json"
ATTR_KEY = "oprd"


# --------------------------------------------------------------------------- paths
def exists(path: str) -> bool:
    fs, root = _fs(path)
    return fs.exists(root)


def remove_store(path: str) -> None:
    fs, root = _fs(path)
    if fs.exists(root):
        fs.rm(root, recursive=True)


def write_json_atomic(path: str, obj: Any) -> None:
    """Write a small JSON object so that readers see either nothing or all of it."""
    atomic_write_bytes(path, json.dumps(obj, indent=2, sort_keys=True).encode())


def join(path: str, *parts: str) -> str:
    return "/".join([str(path).rstrip("/"), *parts])


# ----------------------------------------------------------------- completion state
def completion(path: str) -> dict | None:
    """The completion marker's content, or None while the store is incomplete."""
    return read_json(join(path, COMPLETE_MARKER))


def is_complete(path: str) -> bool:
    fs, target = _fs(join(path, COMPLETE_MARKER))
    return fs.exists(target)


def mark_complete(path: str, content_digest: str, **extra: Any) -> None:
    write_json_atomic(
        join(path, COMPLETE_MARKER),
        {"content_digest": content_digest, "completed_at": now_iso(), **extra},
    )


def now_iso() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")


# -------------------------------------------------------------------- format/kind
@dataclass(frozen=True)
class StoreFormat:
    kind: str
    version: int
    # what to do with a store of an older version (appended to the refusal), e.g. how to remake it
    older: str = ""


def read_meta(path: str) -> dict:
    """Root metadata of an oprd store (``kind``, ``format_version`` and the rest)."""
    if not exists(path):
        raise OprdError(f"no store at {path}")
    try:
        group = zarr.open_group(str(path), mode="r")
    except Exception as e:  # not a zarr group at all
        raise OprdError(f"{path} is not a Zarr store ({type(e).__name__}: {e})") from None
    meta = dict(group.attrs.get(ATTR_KEY) or {})
    if not meta.get("kind"):
        raise OprdError(f"{path} is a Zarr store but not one written by oprd (no 'oprd' attributes)")
    return meta


def check_format(meta: dict, expected: StoreFormat, path: str) -> None:
    kind, version = meta.get("kind"), meta.get("format_version")
    if kind != expected.kind:
        raise OprdError(f"{path} is a {kind!r} store, expected a {expected.kind!r} store")
    if version != expected.version:
        if expected.older and isinstance(version, int) and version < expected.version:
            raise OprdError(f"{path} has {kind} format version {version}; this oprd reads version "
                            f"{expected.version}: {expected.older}")
        raise OprdError(
            f"{path} has {kind} format version {version}; this oprd reads version {expected.version} "
            "(upgrade or downgrade oprd to match the store)"
        )


def open_meta(path: str, expected: StoreFormat, require_complete: bool, incomplete: str) -> tuple[dict, bool]:
    """Metadata and completeness of a store of the ``expected`` format; ``incomplete`` is the error
    raised when ``require_complete`` and the completion marker is missing."""
    meta = read_meta(path)
    check_format(meta, expected, path)
    complete = is_complete(path)
    if require_complete and not complete:
        raise OprdError(incomplete)
    return meta, complete


def prepare_output(path: str, overwrite: bool, what: str) -> None:
    """Refuse to replace a complete store unless asked; clear an incomplete leftover."""
    if exists(path):
        if is_complete(path) and not overwrite:
            raise OprdError(f"{what} {path} already exists and is complete; pass --overwrite to replace it")
        remove_store(path)


# ---------------------------------------------------------------------- digests
class Digest:
    """Streaming sha256 over named arrays: name, dtype, shape and raw bytes."""

    def __init__(self) -> None:
        self._h = hashlib.sha256()

    def add_array(self, name: str, values: np.ndarray) -> None:
        values = np.ascontiguousarray(values)
        self._h.update(f"{name}|{values.dtype.str}|{values.shape}|".encode())
        self._h.update(values.tobytes())

    def add_bytes(self, data: bytes) -> None:
        self._h.update(data)

    def hexdigest(self) -> str:
        return "sha256:" + self._h.hexdigest()


# ----------------------------------------------------------------------- codecs
COMPRESSORS = ("zstd", "lz4", "blosc-lz4", "blosc-zstd", "blosc-lz4hc", "gzip", "none")


def compressor_codecs(name: str = "zstd", level: int | None = None, typesize: int | None = None) -> list:
    """Zarr v3 bytes-to-bytes codecs for a compressor name (see COMPRESSORS), crc32c last."""
    from oprd_cli.stores.integrity import checksum_codec

    return [*_compressor(name, level, typesize), checksum_codec()]


def _compressor(name: str, level: int | None, typesize: int | None) -> list:
    from zarr.codecs import BloscCodec, GzipCodec, ZstdCodec

    if name == "none":
        return []
    if name == "zstd":
        return [ZstdCodec(level=3 if level is None else level)]
    if name == "gzip":
        return [GzipCodec(level=5 if level is None else level)]
    if name == "lz4":
        from numcodecs.zarr3 import LZ4

        return [LZ4(acceleration=1 if level is None else max(1, level))]
    if name.startswith("blosc-"):
        cname = name.split("-", 1)[1]
        kwargs: dict[str, Any] = {"cname": cname, "clevel": 5 if level is None else level, "shuffle": "shuffle"}
        if typesize:
            kwargs["typesize"] = typesize
        return [BloscCodec(**kwargs)]
    raise OprdError(f"unknown compressor {name!r}; choose one of {', '.join(COMPRESSORS)}")


# ------------------------------------------------------------------ ragged helpers
def offsets_from_lengths(lengths: Iterable[int]) -> np.ndarray:
    lengths = np.asarray(list(lengths), dtype=np.int64)
    out = np.zeros(len(lengths) + 1, dtype=np.int64)
    np.cumsum(lengths, out=out[1:])
    return out


def encode_strings(texts: Iterable[str]) -> tuple[np.ndarray, np.ndarray]:
    """UTF-8 strings as one flat uint8 array plus int64 offsets (ragged, never padded)."""
    blobs = [t.encode("utf-8") for t in texts]
    offsets = offsets_from_lengths(len(b) for b in blobs)
    flat = np.frombuffer(b"".join(blobs), dtype=np.uint8).copy()
    return flat, offsets


def decode_strings(flat: np.ndarray, offsets: np.ndarray) -> list[str]:
    data = np.asarray(flat, dtype=np.uint8).tobytes()
    return [data[offsets[i] : offsets[i + 1]].decode("utf-8") for i in range(len(offsets) - 1)]
