"""Checksums end to end: every chunk of every store carries a crc32c, and a corrupt chunk is one line.

Writers put :func:`checksum_codec` last in every array's bytes-to-bytes chain (``common.compressor_codecs``
and the cache's ``hidden_codecs`` do), so each chunk (each inner chunk of a sharded array) is
checksummed after compression and checked before decompression. zarr raises a bare ``ValueError``
without a position when a checksum does not match; :func:`guard` wraps a store's root group so that
the readers of both stores turn such a failure into one :class:`OprdError` naming the store, the
array and the chunk (found by re-reading the chunks of the failed selection one at a time). Stores
written before checksums were added stay readable; ``oprd verify`` says they carry none.
"""

from __future__ import annotations

import itertools
import math
import os
from typing import Any, Iterator

import zarr

from oprd_cli.errors import OprdError

CHECKSUM = "crc32c"
# exceptions a damaged chunk raises while decoding (checksum mismatch, bad compressed frame, short chunk)
_DECODE_ERRORS = (ValueError, RuntimeError, EOFError, OSError)


def checksum_codec():
    """The bytes-to-bytes codec that checksums a chunk (Zarr v3 ``crc32c``)."""
    from zarr.codecs import Crc32cCodec

    return Crc32cCodec()


def chunk_codecs(arr: zarr.Array) -> tuple:
    """The codecs applied to one (inner) chunk of ``arr``."""
    from zarr.codecs import ShardingCodec

    codecs = tuple(arr.metadata.codecs)
    if len(codecs) == 1 and isinstance(codecs[0], ShardingCodec):
        return tuple(codecs[0].codecs)
    return codecs


def has_checksum(arr: zarr.Array) -> bool:
    from zarr.codecs import Crc32cCodec

    return any(isinstance(c, Crc32cCodec) for c in chunk_codecs(arr))


def chunk_slices(arr: zarr.Array, rows: tuple[int, int] | None = None) -> Iterator[tuple[tuple[int, ...], tuple]]:
    """(chunk grid index, selection) of every (inner) chunk of ``arr``, optionally only those that
    overlap rows ``[rows[0], rows[1])`` of the first axis."""
    shape, chunks = tuple(arr.shape), tuple(arr.chunks)
    if not shape:
        yield (), ()
        return
    grids = [range(math.ceil(s / c)) if s else range(0) for s, c in zip(shape, chunks)]
    if rows is not None:
        lo, hi = rows
        grids[0] = range(max(0, lo // chunks[0]), min(len(grids[0]), math.ceil(hi / chunks[0])))
    for idx in itertools.product(*grids):
        yield idx, tuple(slice(i * c, min((i + 1) * c, s)) for i, c, s in zip(idx, chunks, shape))


def bad_chunk(arr: zarr.Array, rows: tuple[int, int] | None = None) -> tuple[tuple[int, ...], tuple, str] | None:
    """The first chunk of ``arr`` (within ``rows``) that cannot be decoded: (index, selection, reason)."""
    for idx, sel in chunk_slices(arr, rows):
        try:
            arr[sel]
        except _DECODE_ERRORS as e:
            return idx, sel, _reason(e)
    return None


def _reason(e: BaseException) -> str:
    text = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    if "checksum" in text.lower():
        return "crc32c checksum mismatch"
    return f"{type(e).__name__}: {text[:120]}"


def describe_chunk(idx: tuple[int, ...], sel: tuple) -> str:
    where = f"chunk {'.'.join(map(str, idx)) or '0'}"
    if sel and isinstance(sel[0], slice):
        where += f" (rows {sel[0].start}..{sel[0].stop - 1})"
    return where


def corrupt_error(store: str, name: str, idx, sel, reason: str) -> OprdError:
    return OprdError(f"store {store}: array {name}, {describe_chunk(idx, sel)} is corrupt ({reason}); nothing "
                     f"was read from it; `oprd verify {store}` lists every bad chunk; re-create the store")


def _rows_of(selection: Any) -> tuple[int, int] | None:
    first = selection[0] if isinstance(selection, tuple) and selection else selection
    if isinstance(first, slice) and first.step in (None, 1):
        return (first.start or 0, first.stop if first.stop is not None else 1 << 62)
    if isinstance(first, int):
        return (first, first + 1)
    return None


def _check_still_there(watch: str | None, store: str, name: str) -> None:
    if watch is not None and not os.path.exists(watch):
        raise OprdError(f"store {store} was deleted or replaced while it was being read (array {name}); "
                        "nothing read from it is used; run the command again")


class GuardedArray:
    """A read-only zarr array whose reads name the corrupt chunk in one line, and (``watch``: the marker
    of a store opened complete) notice a store deleted under the reader: zarr reads a missing chunk as
    its fill value, so without this a vanished store would read as zeros."""

    def __init__(self, arr: zarr.Array, store: str, name: str, watch: str | None = None):
        self._arr, self._store, self._name, self._watch = arr, store, name, watch

    def __getattr__(self, attr: str):
        return getattr(self._arr, attr)

    def __len__(self) -> int:
        return len(self._arr)

    def __getitem__(self, selection):
        try:
            values = self._arr[selection]
        except _DECODE_ERRORS as e:
            found = bad_chunk(self._arr, _rows_of(selection))
            if found is None:
                raise
            raise corrupt_error(self._store, self._name, *found) from e
        _check_still_there(self._watch, self._store, self._name)
        return values


class GuardedGroup:
    """A zarr group whose arrays are :class:`GuardedArray` (attributes and members pass through)."""

    def __init__(self, group: zarr.Group, store: str, prefix: str = "", watch: str | None = None):
        self._group, self._store, self._prefix, self._watch = group, store, prefix, watch

    def __getattr__(self, attr: str):
        return getattr(self._group, attr)

    def __contains__(self, name: str) -> bool:
        return name in self._group

    def __getitem__(self, name: str):
        full = f"{self._prefix}{name}"
        try:
            item = self._group[name]
        except KeyError:
            _check_still_there(self._watch, self._store, full)
            raise
        if isinstance(item, zarr.Group):
            return GuardedGroup(item, self._store, full + "/", self._watch)
        return GuardedArray(item, self._store, full, self._watch)


def guard(group: zarr.Group, store: str, complete: bool = False) -> GuardedGroup:
    """``group`` read through :class:`GuardedArray`; a ``complete`` local store is also watched for deletion
    (one stat of its completion marker per read)."""
    from oprd_cli.stores.common import COMPLETE_MARKER, is_local, join

    watch = join(store, COMPLETE_MARKER) if complete and is_local(store) else None
    if watch is not None and watch.startswith("file://"):
        watch = watch[len("file://"):]
    return GuardedGroup(group, store, watch=watch)


def array_names(group: zarr.Group, prefix: str = "") -> list[str]:
    """Every array below ``group``, as slash paths, sorted."""
    import warnings

    names: list[str] = []
    with warnings.catch_warnings():  # files beside the zarr nodes (markers) are fine
        warnings.simplefilter("ignore")
        for name, item in group.members():
            if isinstance(item, zarr.Group):
                names += array_names(item, f"{prefix}{name}/")
            else:
                names.append(f"{prefix}{name}")
    return sorted(names)
