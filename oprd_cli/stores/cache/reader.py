"""The teacher-cache reader: a complete store opened read-only, rows read as padded batches."""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property
from typing import Any, Sequence

import numpy as np
import torch
import zarr

from oprd_cli.errors import OprdError
from oprd_cli.stores import common, integrity
from oprd_cli.stores.cache.format import (FORMAT, HIDDEN, LAYOUT_MARKER, VALID, Encoding, combine_digests, sample_digest,
                                          token_arrays_for)
from oprd_cli.stores.cache.layout import Layout
from oprd_cli.stores.meta import CacheMeta
from oprd_cli.stores.cache.writer import _aggregate, read_unit_markers


# -------------------------------------------------------------------------- reader
@dataclass
class CacheBatch:
    """A batch of cache rows, padded to the longest sample in the batch (see the module docstring)."""

    rows: np.ndarray  # [B]
    hidden: torch.Tensor  # [B, Lyr, P, d]
    mask: torch.Tensor  # [B, P] bool
    positions: torch.Tensor  # [B, P] int64, -1 at padding
    response_mask: torch.Tensor  # [B, T] bool
    teacher_logprobs: torch.Tensor | None = None  # [B, T] float32
    support_logprobs: torch.Tensor | None = None  # [B, T, K] float32
    teacher_topk_ids: torch.Tensor | None = None  # [B, T, K] int64
    teacher_topk_logprobs: torch.Tensor | None = None  # [B, T, K] float32
    extra: dict[str, Any] = field(default_factory=dict)

    def to(self, device) -> "CacheBatch":
        def mv(t):
            return None if t is None else t.to(device)

        return CacheBatch(self.rows, mv(self.hidden), mv(self.mask), mv(self.positions), mv(self.response_mask),
                          mv(self.teacher_logprobs), mv(self.support_logprobs), mv(self.teacher_topk_ids),
                          mv(self.teacher_topk_logprobs), dict(self.extra))


def _read_spans(arr, starts: np.ndarray, lengths: np.ndarray, gap: int) -> list[np.ndarray]:
    """Read rows [starts[i], starts[i]+lengths[i]) of ``arr``; nearby ranges share one read."""
    out: list[np.ndarray | None] = [None] * len(starts)
    order = np.argsort(starts, kind="stable")
    i = 0
    while i < len(order):
        j = i
        a = int(starts[order[i]])
        b = a + int(lengths[order[i]])
        while j + 1 < len(order) and int(starts[order[j + 1]]) <= b + gap:
            j += 1
            b = max(b, int(starts[order[j]]) + int(lengths[order[j]]))
        block = arr[a:b] if b > a else np.zeros((0, *arr.shape[1:]), dtype=arr.dtype)
        for o in order[i: j + 1]:
            s = int(starts[o]) - a
            out[o] = block[s: s + int(lengths[o])]
        i = j + 1
    return out  # type: ignore[return-value]


class TeacherCache:
    """Read-only view of a teacher cache (``require_complete`` refuses a store still being written)."""

    def __init__(self, path: str, require_complete: bool = True):
        self.path = str(path)
        meta, self.complete = common.open_meta(
            self.path, FORMAT, require_complete,
            f"teacher cache {self.path} is incomplete (its workers were interrupted or are still running); "
            "run `oprd teacher-cache` again to finish it",
        )
        self._layout_ready = self.complete or common.read_json(common.join(self.path, LAYOUT_MARKER)) is not None
        self.meta = meta
        self.group = integrity.guard(zarr.open_group(self.path, mode="r"), self.path, self.complete)
        self.encoding = Encoding.from_meta(meta["encoding"])
        # ---- metadata, read once
        m = self.typed_meta
        self.layers, self.hidden_size, self.num_samples = list(m.layers), m.hidden_size, m.num_samples
        self.num_positions = int(meta["num_positions"])
        self.positions, self.logprobs = dict(m.positions), {"mode": m.logprobs_mode, "k": m.logprobs_k}
        self.rollout = {"path": m.rollout_path, "store_id": meta["rollout"].get("store_id"),
                        "content_digest": m.rollout_digest}
        self.tokenizer_digest, self.teacher = m.tokenizer_digest, dict(meta["teacher"])
        self.bridge, self.alignment = meta.get("bridge"), meta.get("alignment")
        self.has_valid = bool((self.alignment or {}).get("cross_tokenizer"))

    @property
    def content_digest(self) -> str | None:
        if not self.complete:
            return None
        return str(self.meta.get("content_digest") or (common.completion(self.path) or {}).get("content_digest"))

    @cached_property
    def typed_meta(self) -> CacheMeta:
        """The cache's metadata, typed (read once), with :meth:`CacheMeta.check_fits`."""
        return CacheMeta.from_attrs(self.path, self.meta)

    @cached_property
    def layout(self) -> Layout:
        if not self._layout_ready:
            raise OprdError(f"teacher cache {self.path} is still being created")
        arrays = {}
        for name in ("sample/position_start", "sample/num_positions", "sample/hidden_offset", "sample/token_offset",
                     "sample/response_length", "sample/prompt_length", "unit/sample_start", "unit/hidden_start",
                     "unit/hidden_rows", "unit/token_start", "unit/token_rows"):
            arrays[name] = self.group[name][...]
        return Layout.from_arrays(arrays, self.meta["layout"])

    @property
    def response_lengths(self) -> np.ndarray:
        return self.layout.response_length

    @property
    def token_names(self) -> list[str]:
        return token_arrays_for(self.logprobs["mode"])

    # ---- data
    def _rows(self, rows: Sequence[int] | slice | np.ndarray) -> np.ndarray:
        if isinstance(rows, slice):
            rows = range(*rows.indices(self.num_samples))
        r = np.asarray(list(rows) if not isinstance(rows, np.ndarray) else rows, dtype=np.int64).reshape(-1)
        if len(r) and (r.min() < 0 or r.max() >= self.num_samples):
            raise IndexError(f"rows out of range 0..{self.num_samples - 1}")
        return r

    def read_hidden(self, row: int) -> np.ndarray:
        """The stored hidden rows of one sample, ``[n, n_layers, d]`` in storage encoding."""
        lay = self.layout
        a = int(lay.hidden_offset[row])
        return self.group[HIDDEN][a: a + int(lay.num_positions[row])]

    def read_tokens(self, name: str, row: int) -> np.ndarray:
        lay = self.layout
        a = int(lay.token_offset[row])
        return self.group[f"token/{name}"][a: a + int(lay.response_length[row])]

    def read(self, rows: Sequence[int] | slice, device=None, dtype: torch.dtype | None = None) -> CacheBatch:
        """Rows of the cache as padded tensors; reads only the chunks those rows live in."""
        r = self._rows(rows)
        lay = self.layout
        n_layers, d = len(self.layers), self.hidden_size
        n = lay.num_positions[r].astype(np.int64)
        lengths = lay.response_length[r].astype(np.int64)
        B, P, T = len(r), int(n.max()) if len(r) else 0, int(lengths.max()) if len(r) else 0
        chunk_rows = int(self.meta["layout"]["hidden_chunk_rows"])
        parts = _read_spans(self.group[HIDDEN], lay.hidden_offset[r], n, gap=chunk_rows) if B else []
        vparts = _read_spans(self.group[VALID], lay.hidden_offset[r], n, gap=chunk_rows) if B and self.has_valid else None
        hidden = torch.zeros((B, n_layers, P, d), dtype=self.encoding.torch_dtype)
        mask = torch.zeros((B, P), dtype=torch.bool)
        positions = torch.full((B, P), -1, dtype=torch.int64)
        for i, part in enumerate(parts):
            k = int(n[i])
            if k:
                hidden[i, :, :k] = self.encoding.decode(part).permute(1, 0, 2)
                mask[i, :k] = torch.from_numpy(np.asarray(vparts[i], dtype=np.bool_)) if vparts is not None else True
                positions[i, :k] = torch.arange(int(lay.position_start[r[i]]), int(lay.position_start[r[i]]) + k)
        response_mask = torch.arange(T)[None, :] < torch.from_numpy(lengths)[:, None] if B else \
            torch.zeros((0, 0), dtype=torch.bool)
        out: dict[str, torch.Tensor | None] = {}
        tok_chunk = int(self.meta["layout"]["token_chunk_rows"])
        for name in self.token_names:
            arr = self.group[f"token/{name}"]
            tparts = _read_spans(arr, lay.token_offset[r], lengths, gap=tok_chunk)
            tail = tuple(arr.shape[1:])
            dt = torch.int64 if name == "teacher_topk_ids" else torch.float32
            t = torch.zeros((B, T, *tail), dtype=dt)
            for i, part in enumerate(tparts):
                if len(part):
                    t[i, : len(part)] = torch.from_numpy(np.ascontiguousarray(part)).to(dt)
            out[name] = t
        self._check_finite(r, {HIDDEN: hidden, **out})
        if dtype is not None:
            hidden = hidden.to(dtype)
        batch = CacheBatch(r, hidden, mask, positions, response_mask, out.get("teacher_logprobs"),
                           out.get("support_logprobs"), out.get("teacher_topk_ids"),
                           out.get("teacher_topk_logprobs"))
        return batch.to(device) if device is not None else batch

    def _check_finite(self, rows: np.ndarray, arrays: dict[str, torch.Tensor | None]) -> None:
        """Refuse NaN or +inf anywhere (and -inf in hidden states) in what was read: never train on it."""
        for name, t in arrays.items():
            if t is None or not t.is_floating_point():
                continue
            bad = ~torch.isfinite(t) if name == HIDDEN else (torch.isnan(t) | (t == float("inf")))
            if bool(bad.any()):
                i = int(bad.reshape(len(rows), -1).any(1).nonzero()[0, 0])
                raise OprdError(f"teacher cache {self.path}: {name} of sample {int(rows[i])} is not finite (NaN or "
                                "inf); nothing was trained on it; re-create the cache (was the teacher's output NaN?)")

    # ---- checking and describing
    def unit_markers(self) -> dict[int, dict]:
        return read_unit_markers(self.path)

    def recompute_digest(self) -> str:
        """The content digest recomputed from the stored arrays."""
        lay = self.layout
        digests = []
        hid = self.group[HIDDEN]
        toks = {name: self.group[f"token/{name}"] for name in self.token_names}
        for unit in lay.units():
            block = hid[unit.hidden_start: unit.hidden_start + unit.hidden_rows] if unit.hidden_rows else None
            tblocks = {name: a[unit.token_start: unit.token_start + unit.token_rows] for name, a in toks.items()}
            for row in unit.rows:
                t0, n, length = int(lay.position_start[row]), int(lay.num_positions[row]), int(lay.response_length[row])
                a = int(lay.hidden_offset[row] - unit.hidden_start)
                h = block[a: a + n] if block is not None else np.zeros((0, len(self.layers), self.hidden_size),
                                                                         self.encoding.storage)
                b = int(lay.token_offset[row] - unit.token_start)
                tok = {name: tb[b: b + length] for name, tb in tblocks.items()}
                if self.has_valid:
                    tok[VALID] = self.group[VALID][lay.hidden_offset[row]: lay.hidden_offset[row] + n]
                digests.append(sample_digest(row, t0, n, length, h, tok))
        return combine_digests(self.meta, digests)

    def verify(self) -> bool:
        """True when the store is complete and its data hashes to the recorded content digest."""
        if not self.complete:
            return False
        return self.recompute_digest() == self.content_digest

    def info(self) -> dict[str, Any]:
        m = self.meta
        units_total = int(m.get("layout", {}).get("num_units", 0))
        if self.complete:
            stats = {k: m.get(k) for k in ("raw_bytes", "stored_bytes", "stored_bytes_hidden", "stored_bytes_tokens",
                                           "compression_ratio")}
            cosine = m["encoding"].get("cosine")
            units_done = units_total
        else:
            markers = read_unit_markers(self.path)
            stats = _aggregate(markers)
            cosine = stats.pop("cosine")
            units_done = len(markers)
        values = self.num_positions * len(self.layers) * self.hidden_size
        done_values = values if self.complete else sum(
            int(x.get("positions", 0)) for x in read_unit_markers(self.path).values()) * len(self.layers) * self.hidden_size
        bpv = (stats.get("stored_bytes_hidden") or 0) / done_values if done_values else None
        encoding = {k: v for k, v in m["encoding"].items() if k != "cosine"}
        encoding["cosine_similarity"] = cosine if not self.encoding.faithful else {"mean": 1.0, "min": 1.0}
        return {
            "path": self.path,
            "kind": FORMAT.kind,
            "format_version": FORMAT.version,
            "complete": self.complete,
            "num_samples": self.num_samples,
            "num_positions": self.num_positions,
            "num_tokens": int(m.get("num_tokens", 0)),
            "layers": self.layers,
            "hidden_size": self.hidden_size,
            "positions": self.positions,
            "logprobs": self.logprobs,
            "encoding": encoding,
            "compression": m.get("compression"),
            "stored_bytes": stats.get("stored_bytes"),
            "raw_bytes": stats.get("raw_bytes"),
            "compression_ratio": stats.get("compression_ratio"),
            "bytes_per_value": bpv,
            "rollout": self.rollout,
            "rollout_store_id": self.rollout["store_id"],
            "rollout_digest": self.rollout["content_digest"],
            "tokenizer_digest": self.tokenizer_digest,
            "teacher": self.teacher,
            **({"bridge": self.bridge} if self.bridge else {}),
            **({"alignment": self.alignment} if self.alignment else {}),
            "units": {"total": units_total, "done": units_done},
            "layout": m.get("layout"),
            "created_at": m.get("created_at"),
            "completed_at": m.get("completed_at"),
            "content_digest": self.content_digest,
        }


def open_cache(path: str, require_complete: bool = True) -> TeacherCache:
    return TeacherCache(str(path), require_complete=require_complete)

