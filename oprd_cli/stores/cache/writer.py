"""The teacher-cache writer: create, join or resume a store, write whole units and their markers, complete it."""

from __future__ import annotations

import hashlib
import json
import os
import queue
import socket
import threading
import time
from typing import Any, Callable

import numpy as np
import torch
import zarr

from oprd_cli.errors import OprdError
from oprd_cli.stores import common
from oprd_cli.stores.cache.format import (FORMAT, HIDDEN, LAYOUT_MARKER, TOKEN_ARRAYS, UNIT_DIR, UNIT_RE, VALID,
                                          CosineStats,
                                          Encoding, _describe_key_difference, combine_digests, hidden_codecs,
                                          layout_key, sample_digest, token_arrays_for)
from oprd_cli.stores.cache.layout import Layout, Unit


# -------------------------------------------------------------------------- writer
def _storage_error(path: str, e: OSError) -> OprdError:
    import errno

    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        return OprdError(f"cannot write teacher cache {path}: {e.strerror} (disk full); the cache stays incomplete "
                         "and resumable: free some space and run the same command again")
    return OprdError(f"cannot write teacher cache {path}: {e.strerror or e}")


class CacheWriter:
    """Creates a cache (or joins/resumes one being written) and writes whole units.

    Safe for several processes on one store: creation only ever adds identical metadata (nothing
    is deleted unless ``overwrite`` asks to replace a complete or mismatching store), each unit's
    region is whole shards owned by that unit, and completion is idempotent.
    """

    def __init__(self, path: str, meta: dict, layout: Layout, group: zarr.Group):
        self.path = path
        self.meta = meta
        self.layout = layout
        self.group = group
        self.encoding = Encoding.from_meta(meta["encoding"])
        self.token_names = token_arrays_for(meta["logprobs"]["mode"])
        self.hidden = group[HIDDEN]
        self.tokens = {name: group[f"token/{name}"] for name in self.token_names}
        self.valid = group[VALID] if (meta.get("alignment") or {}).get("cross_tokenizer") else None
        self._fs, self._root = common._fs(path)

    # ---- opening
    @classmethod
    def open(cls, path: str, meta: dict, layout: Layout, overwrite: bool = False) -> "CacheWriter":
        path = str(path)
        new_key = layout_key(meta)
        try:
            if common.exists(path):
                try:
                    old = common.read_meta(path)
                except OprdError:
                    old = None
                if old is not None and old.get("kind") != FORMAT.kind:
                    raise OprdError(f"{path} is a {old.get('kind')!r} store, not a teacher cache; "
                                    "choose another --out")
                complete = common.is_complete(path)
                if complete and not overwrite:
                    raise OprdError(f"teacher cache {path} already exists and is complete; "
                                    "pass --overwrite to replace it")
                mismatch = old is not None and old.get("format_version") == FORMAT.version and \
                    layout_key(old) != new_key
                unknown = old is not None and old.get("format_version") != FORMAT.version
                if complete or ((mismatch or unknown) and overwrite):
                    common.remove_store(path)
                elif mismatch:
                    raise OprdError(
                        f"an unfinished teacher cache with other settings is at {path} "
                        f"({_describe_key_difference(layout_key(old), new_key)}); pass --overwrite to start over"
                    )
                elif unknown:
                    raise OprdError(f"{path} holds teacher-cache format version {old.get('format_version')}; "
                                    "pass --overwrite to replace it")
            group = cls._create(path, meta, layout)
        except OSError as e:
            raise _storage_error(path, e) from None
        stored_meta = dict(group.attrs[common.ATTR_KEY])
        return cls(path, stored_meta, layout, group)

    @staticmethod
    def _create(path: str, meta: dict, layout: Layout) -> zarr.Group:
        """Idempotent creation: adds what is missing, never deletes or changes what is there."""
        if common.read_json(common.join(path, LAYOUT_MARKER)) is not None:
            group = zarr.open_group(path, mode="r+")
            old = dict(group.attrs.get(common.ATTR_KEY) or {})
            if layout_key(old) != layout_key(meta):
                raise OprdError(f"an unfinished teacher cache with other settings is at {path} "
                                f"({_describe_key_difference(layout_key(old), layout_key(meta))}); "
                                "pass --overwrite to start over")
            return group
        if common.is_local(path):
            parent = os.path.dirname(os.path.abspath(path))
            if os.path.exists(parent) and not os.path.isdir(parent):
                raise OprdError(f"cannot write teacher cache {path}: {parent} is not a directory")
        try:
            group = zarr.open_group(path, mode="a")
        except zarr.errors.ContainsGroupError:  # another shard worker created it between zarr's check and write
            group = zarr.open_group(path, mode="r+")
        existing = dict(group.attrs.get(common.ATTR_KEY) or {})
        if existing:
            if layout_key(existing) != layout_key(meta):
                raise OprdError(f"an unfinished teacher cache with other settings is at {path}; "
                                "pass --overwrite to start over")
        else:
            group.attrs[common.ATTR_KEY] = meta
        encoding = Encoding.from_meta(meta["encoding"])
        p = layout.params
        n_layers, d = len(meta["layers"]), int(meta["hidden_size"])
        comp = meta["compression"]
        codecs = hidden_codecs(comp["compressor"], comp["level"], encoding.storage.itemsize)
        specs: dict[str, dict[str, Any]] = {
            HIDDEN: dict(shape=(layout.hidden_rows, n_layers, d), dtype=encoding.storage,
                         chunks=(p["hidden_chunk_rows"], n_layers, d), shards=(p["hidden_shard_rows"], n_layers, d),
                         compressors=codecs, fill_value=0),
        }
        if (meta.get("alignment") or {}).get("cross_tokenizer"):
            specs[VALID] = dict(shape=(layout.hidden_rows,), dtype=np.bool_, chunks=(p["hidden_chunk_rows"],),
                                shards=(p["hidden_shard_rows"],), compressors=common.compressor_codecs("zstd", 3),
                                fill_value=False)
        k = int(meta["logprobs"].get("k") or 0)
        for name in token_arrays_for(meta["logprobs"]["mode"]):
            dt, has_k = TOKEN_ARRAYS[name]
            tail = (k,) if has_k else ()
            specs[f"token/{name}"] = dict(
                shape=(layout.token_rows, *tail), dtype=dt, chunks=(p["token_chunk_rows"], *tail),
                shards=(p["token_shard_rows"], *tail), fill_value=0,
                compressors=common.compressor_codecs("zstd", 3),
            )
        for name, data in layout.arrays().items():
            specs[name] = dict(shape=data.shape, dtype=data.dtype, chunks=(max(1, min(len(data), 1 << 16)),),
                               compressors=common.compressor_codecs("zstd", 3), fill_value=0)
        arrays = {}
        for name, spec in specs.items():
            try:
                arrays[name] = group.create_array(name, overwrite=False, **spec)
            except zarr.errors.ContainsArrayError:
                arrays[name] = group[name]
                if tuple(arrays[name].shape) != tuple(spec["shape"]):
                    raise OprdError(f"the unfinished teacher cache at {path} has another layout "
                                    f"({name} {arrays[name].shape} vs {spec['shape']}); pass --overwrite") from None
        for name, data in layout.arrays().items():
            if len(data):
                arrays[name][...] = data
        common.write_json_atomic(common.join(path, LAYOUT_MARKER),
                                 {"layout_key": hashlib.sha256(json.dumps(layout_key(meta), sort_keys=True)
                                                               .encode()).hexdigest(),
                                  "created_at": common.now_iso()})
        return group

    # ---- progress
    def done_units(self) -> set[int]:
        return set(_list_unit_markers(self.path))

    # ---- writing
    def write_unit(self, unit: Unit, hidden: list[torch.Tensor], tokens: dict[str, list[np.ndarray]],
                   worker: str = "0/1") -> dict[str, Any]:
        """Encode, write and mark one unit. ``hidden[j]`` is sample ``unit.sample_start + j``'s teacher
        output ``[n_j, n_layers, d]`` (CPU); ``tokens[name][j]`` its per-token array ``[T_j, ...]``;
        ``tokens[VALID][j]`` (cross-tokenizer caches) its per-position validity ``[n_j]`` bool."""
        lay = self.layout
        n_layers, d = self.hidden.shape[1], self.hidden.shape[2]
        region = np.zeros((unit.hidden_rows, n_layers, d), dtype=self.encoding.storage)
        cos = CosineStats()
        digests = []
        token_regions = {name: np.zeros((unit.token_rows, *self.tokens[name].shape[1:]), dtype=self.tokens[name].dtype)
                         for name in self.token_names}
        raw_hidden = raw_tokens = 0
        valid = np.zeros(unit.hidden_rows, dtype=np.bool_) if self.valid is not None else None
        for j, row in enumerate(unit.rows):
            t0, n, length = int(lay.position_start[row]), int(lay.num_positions[row]), int(lay.response_length[row])
            h = hidden[j]
            if tuple(h.shape) != (n, n_layers, d):
                raise ValueError(f"sample {row}: hidden states of shape {tuple(h.shape)}, expected {(n, n_layers, d)}")
            enc = self.encoding.encode(h)
            if not self.encoding.faithful and n:
                cos.add(h, self.encoding.decode(enc))
            a = int(lay.hidden_offset[row] - unit.hidden_start)
            region[a: a + n] = enc
            raw_hidden += enc.nbytes
            tok = {}
            b = int(lay.token_offset[row] - unit.token_start)
            for name in self.token_names:
                arr = np.asarray(tokens[name][j], dtype=self.tokens[name].dtype)
                if arr.shape[0] != length:
                    raise ValueError(f"sample {row}: {name} has {arr.shape[0]} rows, expected {length}")
                token_regions[name][b: b + length] = arr
                raw_tokens += arr.nbytes
                tok[name] = arr
            if valid is not None:
                v = np.asarray(tokens[VALID][j], dtype=np.bool_)
                valid[a: a + n] = v
                tok[VALID] = v
            digests.append(sample_digest(row, t0, n, length, enc, tok))
        try:
            if unit.hidden_rows:
                self.hidden[unit.hidden_start: unit.hidden_start + unit.hidden_rows] = region
                if valid is not None:
                    self.valid[unit.hidden_start: unit.hidden_start + unit.hidden_rows] = valid
            for name in self.token_names:
                if unit.token_rows:
                    self.tokens[name][unit.token_start: unit.token_start + unit.token_rows] = token_regions[name]
            stored_hidden = self._stored_bytes(HIDDEN, self.hidden, unit.hidden_start, unit.hidden_rows)
            stored_tokens = sum(self._stored_bytes(f"token/{name}", self.tokens[name], unit.token_start,
                                                   unit.token_rows) for name in self.token_names)
            marker = {
                "unit": unit.index, "samples": [unit.sample_start, unit.sample_stop], "digests": digests,
                "positions": int(lay.num_positions[unit.sample_start: unit.sample_stop].sum()),
                "tokens": int(lay.response_length[unit.sample_start: unit.sample_stop].sum()),
                "raw_bytes": {"hidden": raw_hidden, "tokens": raw_tokens},
                "stored_bytes": {"hidden": stored_hidden, "tokens": stored_tokens},
                "cosine": cos.to_dict() if cos.count else None,
                "worker": worker, "host": socket.gethostname(), "pid": os.getpid(), "written_at": common.now_iso(),
            }
            self._write_marker(unit.index, marker)
        except OSError as e:
            raise _storage_error(self.path, e) from None
        return marker

    def _write_marker(self, unit_index: int, marker: dict) -> None:
        """A unit's done marker: written after its data, so a unit without one is recomputed."""
        common.write_json_atomic(common.join(self.path, UNIT_DIR, f"u{unit_index:08d}.json"), marker)

    def _stored_bytes(self, name: str, arr, start: int, rows: int) -> int:
        if not rows:
            return 0
        shard = arr.shards[0] if arr.shards else arr.chunks[0]
        total = 0
        for s in range(start // shard, (start + rows) // shard):
            key = arr.metadata.encode_chunk_key((s,) + (0,) * (arr.ndim - 1))
            try:
                total += int(self._fs.size(f"{self._root}/{name}/{key}"))
            except FileNotFoundError:
                pass
        return total

    # ---- completion
    def try_finalize(self) -> str | None:
        """Mark the store complete if every unit is done; returns the content digest (or None)."""
        if common.is_complete(self.path):
            return (common.completion(self.path) or {}).get("content_digest")
        markers = read_unit_markers(self.path)
        if len(markers) < self.layout.num_units:
            return None
        meta = dict(self.meta)
        digests: list[str] = []
        stats = _aggregate(markers, self.layout.num_units)
        for u in range(self.layout.num_units):
            digests.extend(markers[u]["digests"])
        content_digest = combine_digests(meta, digests)
        meta.update(stats)
        meta["encoding"] = {**meta["encoding"], "cosine": stats.pop("cosine", None)}
        meta.pop("cosine", None)
        meta["content_digest"] = content_digest
        meta["completed_at"] = common.now_iso()
        try:
            group = zarr.open_group(self.path, mode="r+")
            group.attrs[common.ATTR_KEY] = meta
            common.mark_complete(self.path, content_digest, num_samples=int(meta["num_samples"]))
        except OSError as e:
            raise _storage_error(self.path, e) from None
        self.meta = meta
        return content_digest


def _list_unit_markers(path: str) -> list[int]:
    fs, root = common._fs(common.join(path, UNIT_DIR))
    try:
        names = fs.ls(root, detail=False)
    except FileNotFoundError:
        return []
    out = []
    for n in names:
        m = UNIT_RE.match(str(n).rstrip("/").rsplit("/", 1)[-1])
        if m:
            out.append(int(m.group(1)))
    return sorted(out)


def read_unit_markers(path: str) -> dict[int, dict]:
    out = {}
    for u in _list_unit_markers(path):
        m = common.read_json(common.join(path, UNIT_DIR, f"u{u:08d}.json"))
        if m is not None:
            out[u] = m
    return out


def _aggregate(markers: dict[int, dict], num_units: int | None = None) -> dict[str, Any]:
    raw_h = raw_t = st_h = st_t = 0
    cos = CosineStats()
    for m in markers.values():
        raw_h += int(m["raw_bytes"]["hidden"])
        raw_t += int(m["raw_bytes"]["tokens"])
        st_h += int(m["stored_bytes"]["hidden"])
        st_t += int(m["stored_bytes"]["tokens"])
        cos.merge(m.get("cosine"))
    stored = st_h + st_t
    return {
        "raw_bytes": raw_h + raw_t,
        "stored_bytes": stored,
        "stored_bytes_hidden": st_h,
        "stored_bytes_tokens": st_t,
        "compression_ratio": (raw_h + raw_t) / stored if stored else None,
        "cosine": cos.summary(),
    }


# -------------------------------------------------------------------------- background writer
class BackgroundWriter:
    """Writes finished units on a thread; ``submit`` blocks while ``max_queue`` units wait."""

    def __init__(self, writer: CacheWriter, worker: str, max_queue: int,
                 on_written: Callable[[Unit, dict, float], None]):
        self.writer = writer
        self.worker = worker
        self.on_written = on_written
        self.q: queue.Queue = queue.Queue(maxsize=max(1, max_queue))
        self.error: BaseException | None = None
        self.busy_seconds = 0.0
        self.thread = threading.Thread(target=self._loop, name="oprd-cache-writer", daemon=True)
        self.thread.start()

    def _loop(self) -> None:
        while True:
            item = self.q.get()
            if item is None:
                return
            if self.error is not None:
                continue
            unit, hidden, tokens = item
            t = time.perf_counter()
            try:
                marker = self.writer.write_unit(unit, hidden, tokens, worker=self.worker)
                dt = time.perf_counter() - t
                self.busy_seconds += dt
                self.on_written(unit, marker, dt)
            except BaseException as e:  # handed to the main thread
                self.error = e

    def _put(self, item) -> None:
        while True:
            if self.error is not None and item is not None:
                raise self.error
            try:
                self.q.put(item, timeout=0.2)
                return
            except queue.Full:
                if not self.thread.is_alive():
                    return

    def submit(self, unit, hidden, tokens) -> None:
        self._put((unit, hidden, tokens))

    def close(self) -> None:
        self._put(None)
        self.thread.join()
        if self.error is not None:
            raise self.error
