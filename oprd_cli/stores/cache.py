"""The teacher-cache store: teacher hidden states (and optionally log-probs) for one rollout store.

Format owner: every command reads and writes a cache through this module.

Layout (Zarr v3 group)::

    attrs["oprd"]          kind="teacher_cache", format_version, created_at, rollout{path, store_id,
                           content_digest, ...}, tokenizer_digest, teacher{name, config_digest,
                           weights_digest, num_layers, hidden_size, dtype, ...}, layers, hidden_size,
                           positions{mode, k}, logprobs{mode, k, support_k}, encoding{...},
                           compression{compressor, level}, layout{...}, num_samples, num_positions,
                           num_tokens; after completion also content_digest, stored_bytes, raw_bytes,
                           compression_ratio, bytes_per_value, encoding.cosine
    hidden                 [H, n_layers, d]  hidden states of the stored positions, flat over samples;
                           dtype float32 / float16 / uint16 (= the bit pattern of bfloat16, see
                           ``encoding``); sharded: one shard = ``layout.hidden_shard_rows`` rows,
                           inner chunks of ``layout.hidden_chunk_rows`` rows
    token/teacher_logprobs       float32 [R]     log q(y_t) of every response token ("sampled", "topk")
    token/support_logprobs       float32 [R, K]  teacher log-probs at the rollout's student top-K ids ("topk")
    token/teacher_topk_ids       int32   [R, K]  the teacher's own top-K ids ("topk")
    token/teacher_topk_logprobs  float32 [R, K]  and their log-probs ("topk")
    sample/hidden_offset   int64 [N]   first row of sample i in ``hidden``
    sample/num_positions   int32 [N]   number of stored hidden positions of sample i
    sample/position_start  int32 [N]   response position t of its first stored row (rows are t0, t0+1, ...)
    sample/token_offset    int64 [N]   first row of sample i in ``token/*``
    sample/response_length int32 [N]   T of sample i (== the rollout's)
    sample/prompt_length   int32 [N]
    unit/sample_start      int64 [U+1] samples [s_u, s_{u+1}) form unit u
    unit/hidden_start, unit/hidden_rows, unit/token_start, unit/token_rows   int64 [U]
    units/u00000000.json   per-unit done marker: written after the unit's data, holds the per-sample digests
    oprd_layout.json       written once every array above exists (creation is finished)
    oprd_complete.json     completion marker (the last write; atomic)

Positions (format version 2). Response token ``y_t`` of a sample whose prompt has ``Lp`` tokens sits
at sequence index ``Lp + t``. Its stored hidden state is the one at that same index (the state that
has read ``y_t`` and predicts ``y_{t+1}``; the release's ``hidden_states[l][:, -T:]``); the last
prompt token's state is never stored. Log-probs are another position: the distribution over ``y_t``
comes from the output at ``Lp - 1 + t``, so ``teacher_logprobs[t] = log_softmax(logits[Lp - 1 + t])[y_t]``.
Every stored position range is contiguous: ``all`` = [0, T), ``last`` = [T-1] (the final valid
token), ``first_k`` = [0, min(k, T)), ``last_k`` = [T - min(k, T), T). Version 1 stored the state at
``Lp - 1 + t``; such a cache is refused with a one-line message.

Units. Samples are grouped, in order, into *units* of whole samples. A unit owns a region of
``hidden`` (and of ``token/*``) that starts on a shard boundary and spans whole shards, so a worker
always writes whole shards and never touches another unit's files; rows between the end of a unit's
data and the next shard boundary are never read and hold zeros (empty inner chunks are not even
stored). A unit is done once its marker ``units/uNNNNNNNN.json`` exists; the marker is written after
the data, so a killed worker leaves at worst a unit without marker, which the next worker recomputes.
Several workers (``--shard I/N``) fill disjoint units of one store; whoever finds every unit done
writes the completion marker. Nothing relies on renames except the local-disk JSON writes
(object stores get single PUTs), so a cache can live on fsspec object storage.

Digests. Each sample's digest covers its stored bytes (hidden rows in their stored encoding, its
position range and its per-token arrays); ``content_digest`` is a sha256 over the value-defining
metadata (layers, positions, log-prob mode, encoding, source rollout digest) and the ordered sample
digests. It is therefore independent of units, sharding, compression, chunking and restarts.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import os
import socket
import time
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any, Sequence

import numpy as np
import torch
import zarr

from oprd_cli.errors import OprdError
from oprd_cli.stores import common
from oprd_cli.stores.common import StoreFormat

# Version 2: the hidden state of response token t is the one at sequence index Lp + t (version 1
# stored Lp - 1 + t); an old cache is refused, never misread.
FORMAT = StoreFormat(kind="teacher_cache", version=2,
                     older="its hidden states use the old position convention (the state at Lp - 1 + t, not "
                           "Lp + t); re-run `oprd teacher-cache --overwrite` on its rollouts")
LAYOUT_MARKER = "oprd_layout.json"
UNIT_DIR = "units"
UNIT_RE = re.compile(r"^u(\d{8})\.json$")
# Test hook (undocumented for users): seconds to sleep between writing a unit's data and its done
# marker, so that a test can kill a worker while a unit is on disk without its marker.
PAUSE_BEFORE_MARKER_ENV = "OPRD_TEST_CACHE_PAUSE_BEFORE_MARKER"

POSITION_MODES = ("all", "last", "first_k", "last_k")
LOGPROB_MODES = ("none", "sampled", "topk")
STORE_DTYPES = ("float32", "bfloat16", "float16")
DEFAULT_COMPRESSOR = "blosc-zstd"
DEFAULT_LEVEL = {"zstd": 3, "blosc-zstd": 1, "blosc-lz4": 5, "blosc-lz4hc": 5, "lz4": 1, "gzip": 5, "none": None}
BLOSC_BLOCK_BYTES = 1 << 20  # blosc's default blocks are small; 1 MiB blocks compress activations better

UNIT_BYTES = 64 << 20  # target raw hidden bytes per unit (= per shard)
CHUNK_BYTES = 4 << 20  # target raw bytes per inner chunk of ``hidden``
DEFAULT_UNIT_TOKENS = 16384  # at most this many response tokens per unit (unless one sample has more)
TOKEN_CHUNK_ROWS = 4096

HIDDEN = "hidden"
TOKEN_ARRAYS = {  # name -> (dtype, has a K axis)
    "teacher_logprobs": ("float32", False),
    "support_logprobs": ("float32", True),
    "teacher_topk_ids": ("int32", True),
    "teacher_topk_logprobs": ("float32", True),
}

_MANTISSA_BITS = {"float32": 23, "bfloat16": 7, "float16": 10}
_EXPONENT_BITS = {"float32": 8, "bfloat16": 8, "float16": 5}
_STORAGE = {"float32": np.dtype("<f4"), "bfloat16": np.dtype("<u2"), "float16": np.dtype("<f2")}
_TORCH = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def dtype_name(dtype: torch.dtype) -> str:
    for name, dt in _TORCH.items():
        if dt == dtype:
            return name
    raise OprdError(f"teacher dtype {dtype} cannot be stored; use one of {', '.join(STORE_DTYPES)}")


def token_arrays_for(mode: str) -> list[str]:
    if mode == "none":
        return []
    if mode == "sampled":
        return ["teacher_logprobs"]
    return list(TOKEN_ARRAYS)


def position_range(mode: str, k: int, length: int) -> tuple[int, int]:
    """(t0, n): the stored response positions [t0, t0 + n) of a response of ``length`` tokens."""
    if mode == "all":
        return 0, length
    if mode == "last":
        return (length - 1, 1) if length > 0 else (0, 0)
    n = min(int(k), length)
    if mode == "first_k":
        return 0, n
    if mode == "last_k":
        return length - n, n
    raise OprdError(f"unknown --positions {mode!r}; choose one of {', '.join(POSITION_MODES)}")


# ------------------------------------------------------------------------ encoding
def round_mantissa(a: np.ndarray, dtype: str, bits: int) -> np.ndarray:
    """Round the floats stored in ``a`` (storage view of ``dtype``) to ``bits`` mantissa bits.

    Round to nearest, ties to even, on the bit pattern; the dropped low bits become zeros, which
    the compressor then squeezes out. Inf and NaN are left alone.
    """
    total = _MANTISSA_BITS[dtype]
    drop = total - int(bits)
    if drop <= 0:
        return a
    narrow = {2: np.uint16, 4: np.uint32}[a.dtype.itemsize]
    wide = {2: np.uint32, 4: np.uint64}[a.dtype.itemsize]
    u = a.view(narrow).astype(wide)
    exp_mask = wide(((1 << _EXPONENT_BITS[dtype]) - 1) << total)
    keep = wide(((1 << (8 * a.dtype.itemsize)) - 1) ^ ((1 << drop) - 1))
    lsb = (u >> wide(drop)) & wide(1)
    r = (u + wide((1 << (drop - 1)) - 1) + lsb) & keep
    r = np.where((u & exp_mask) == exp_mask, u, r).astype(narrow)
    return r.view(a.dtype)


@dataclass(frozen=True)
class Encoding:
    """How hidden states are stored: ``dtype`` (float32/bfloat16/float16; bfloat16 as its uint16
    bit pattern), optional mantissa rounding, and the dtype the teacher computed in."""

    dtype: str
    model_dtype: str
    mantissa_bits: int | None = None

    def __post_init__(self):
        if self.dtype not in STORE_DTYPES:
            raise OprdError(f"unknown --store-dtype {self.dtype!r}; choose auto or one of {', '.join(STORE_DTYPES)}")
        if self.mantissa_bits is not None:
            full = _MANTISSA_BITS[self.dtype]
            if not 0 <= int(self.mantissa_bits) <= full:
                raise OprdError(
                    f"--lossy-mantissa-bits must be in 0..{full} for {self.dtype} storage, got {self.mantissa_bits}"
                )
            if int(self.mantissa_bits) == full:
                object.__setattr__(self, "mantissa_bits", None)

    @property
    def storage(self) -> np.dtype:
        return _STORAGE[self.dtype]

    @property
    def torch_dtype(self) -> torch.dtype:
        return _TORCH[self.dtype]

    @property
    def faithful(self) -> bool:
        """True when the stored values are exactly the values the teacher computed."""
        return self.dtype == self.model_dtype and self.mantissa_bits is None

    def to_meta(self) -> dict[str, Any]:
        storage = "uint16 bit pattern of bfloat16" if self.dtype == "bfloat16" else self.dtype
        return {
            "dtype": self.dtype,
            "storage": storage,
            "model_dtype": self.model_dtype,
            "lossy_mantissa_bits": self.mantissa_bits,
            "faithful": self.faithful,
            "axes": ["position", "layer", "hidden"],
        }

    @classmethod
    def from_meta(cls, meta: dict) -> "Encoding":
        return cls(meta["dtype"], meta["model_dtype"], meta.get("lossy_mantissa_bits"))

    def encode(self, x: torch.Tensor) -> np.ndarray:
        """Teacher output (CPU tensor, any float dtype) -> the stored numpy array."""
        y = x.detach().to("cpu", self.torch_dtype).contiguous()
        a = y.view(torch.int16).numpy().view(np.uint16) if self.dtype == "bfloat16" else y.numpy()
        if self.mantissa_bits is not None:
            a = round_mantissa(a, self.dtype, self.mantissa_bits)
        return a

    def decode(self, a: np.ndarray) -> torch.Tensor:
        """Stored numpy array -> torch tensor in the stored dtype (bfloat16 stays bfloat16)."""
        a = np.ascontiguousarray(a)
        if self.dtype == "bfloat16":
            return torch.from_numpy(a.view(np.int16)).view(torch.bfloat16)
        return torch.from_numpy(a)


@dataclass
class CosineStats:
    """Running cosine similarity between exact and stored hidden vectors (one per position and layer)."""

    total: float = 0.0
    count: int = 0
    minimum: float = 1.0

    def add(self, exact: torch.Tensor, stored: torch.Tensor, vectors_per_step: int = 1 << 16) -> None:
        """Add the cosines of the last-axis vectors of ``exact`` and ``stored`` (same shape)."""
        a_all = exact.reshape(-1, exact.shape[-1])
        b_all = stored.reshape(-1, stored.shape[-1])
        for s in range(0, a_all.shape[0], vectors_per_step):
            a = a_all[s: s + vectors_per_step].float()
            b = b_all[s: s + vectors_per_step].float()
            num = (a * b).sum(-1)
            den = (a * a).sum(-1).sqrt() * (b * b).sum(-1).sqrt()
            ok = den > 0
            cos = (num[ok] / den[ok]).double()
            if not cos.numel():
                continue
            self.total += float(cos.sum())
            self.count += int(cos.numel())
            self.minimum = min(self.minimum, float(cos.min()))

    def merge(self, other: dict | None) -> None:
        if other and other.get("count"):
            self.total += float(other["sum"])
            self.count += int(other["count"])
            self.minimum = min(self.minimum, float(other["min"]))

    def to_dict(self) -> dict[str, Any]:
        return {"sum": self.total, "count": self.count, "min": self.minimum}

    def summary(self) -> dict[str, Any] | None:
        if not self.count:
            return None
        return {"mean": self.total / self.count, "min": self.minimum, "vectors": self.count}


def hidden_codecs(name: str, level: int | None, itemsize: int) -> list:
    """Compressor codecs for hidden states: ``common.compressor_codecs``, except that blosc gets
    byte-shuffle with the element size and 1 MiB blocks (better ratio and speed on activations)."""
    if name.startswith("blosc-"):
        from zarr.codecs import BloscCodec

        common.compressor_codecs(name, level)  # validates the name
        return [BloscCodec(cname=name.split("-", 1)[1], clevel=DEFAULT_LEVEL.get(name, 5) if level is None else level,
                           shuffle="shuffle", typesize=itemsize, blocksize=BLOSC_BLOCK_BYTES)]
    return common.compressor_codecs(name, level, typesize=itemsize)


# -------------------------------------------------------------------------- layout
@dataclass(frozen=True)
class Unit:
    index: int
    sample_start: int
    sample_stop: int
    hidden_start: int
    hidden_rows: int
    token_start: int
    token_rows: int

    @property
    def rows(self) -> range:
        return range(self.sample_start, self.sample_stop)


@dataclass
class Layout:
    """Where every sample's rows live. A pure function of the rollout's lengths and the settings."""

    position_start: np.ndarray  # int32 [N]
    num_positions: np.ndarray  # int32 [N]
    hidden_offset: np.ndarray  # int64 [N]
    token_offset: np.ndarray  # int64 [N]
    response_length: np.ndarray  # int32 [N]
    prompt_length: np.ndarray  # int32 [N]
    unit_sample_start: np.ndarray  # int64 [U+1]
    unit_hidden_start: np.ndarray  # int64 [U]
    unit_hidden_rows: np.ndarray
    unit_token_start: np.ndarray
    unit_token_rows: np.ndarray
    params: dict[str, int]  # hidden_chunk_rows, hidden_shard_rows, token_chunk_rows, token_shard_rows, ...

    @property
    def num_units(self) -> int:
        return len(self.unit_hidden_start)

    @property
    def hidden_rows(self) -> int:
        return int(self.unit_hidden_start[-1] + self.unit_hidden_rows[-1]) if self.num_units else 0

    @property
    def token_rows(self) -> int:
        return int(self.unit_token_start[-1] + self.unit_token_rows[-1]) if self.num_units else 0

    def unit(self, u: int) -> Unit:
        return Unit(u, int(self.unit_sample_start[u]), int(self.unit_sample_start[u + 1]),
                    int(self.unit_hidden_start[u]), int(self.unit_hidden_rows[u]),
                    int(self.unit_token_start[u]), int(self.unit_token_rows[u]))

    def units(self) -> list[Unit]:
        return [self.unit(u) for u in range(self.num_units)]

    def arrays(self) -> dict[str, np.ndarray]:
        return {
            "sample/position_start": self.position_start, "sample/num_positions": self.num_positions,
            "sample/hidden_offset": self.hidden_offset, "sample/token_offset": self.token_offset,
            "sample/response_length": self.response_length, "sample/prompt_length": self.prompt_length,
            "unit/sample_start": self.unit_sample_start, "unit/hidden_start": self.unit_hidden_start,
            "unit/hidden_rows": self.unit_hidden_rows, "unit/token_start": self.unit_token_start,
            "unit/token_rows": self.unit_token_rows,
        }

    @classmethod
    def from_arrays(cls, arrays: dict[str, np.ndarray], params: dict[str, int]) -> "Layout":
        return cls(
            arrays["sample/position_start"], arrays["sample/num_positions"], arrays["sample/hidden_offset"],
            arrays["sample/token_offset"], arrays["sample/response_length"], arrays["sample/prompt_length"],
            arrays["unit/sample_start"], arrays["unit/hidden_start"], arrays["unit/hidden_rows"],
            arrays["unit/token_start"], arrays["unit/token_rows"], dict(params),
        )


def _pow2_floor(x: float) -> int:
    return 1 << max(0, int(math.floor(math.log2(max(1.0, x)))))


def _round_up(x: int, m: int) -> int:
    return -(-int(x) // m) * m


def plan_layout(
    prompt_lengths: np.ndarray,
    response_lengths: np.ndarray,
    *,
    positions: str,
    k: int,
    n_layers: int,
    hidden_size: int,
    itemsize: int,
    unit_positions: int | None = None,
    unit_tokens: int | None = None,
) -> Layout:
    """Group samples into units and give every sample its rows (see the module docstring)."""
    response_lengths = np.asarray(response_lengths, dtype=np.int64)
    n_samples = len(response_lengths)
    row_bytes = max(1, n_layers * hidden_size * itemsize)
    if unit_positions is None:
        unit_positions = max(1, UNIT_BYTES // row_bytes)
    if unit_tokens is None:
        unit_tokens = DEFAULT_UNIT_TOKENS
    if unit_positions < 1 or unit_tokens < 1:
        raise OprdError("unit sizes must be at least 1")
    c_h = min(_pow2_floor(CHUNK_BYTES / row_bytes), 1 << max(0, int(unit_positions - 1).bit_length()))
    s_h = _round_up(unit_positions, c_h)
    c_t = min(TOKEN_CHUNK_ROWS, 1 << max(0, int(unit_tokens - 1).bit_length()))
    s_t = _round_up(unit_tokens, c_t)

    t0 = np.zeros(n_samples, np.int32)
    num = np.zeros(n_samples, np.int32)
    for i, length in enumerate(response_lengths):
        t0[i], num[i] = position_range(positions, k, int(length))
    hidden_offset = np.zeros(n_samples, np.int64)
    token_offset = np.zeros(n_samples, np.int64)
    starts, h_start, h_rows, t_start, t_rows = [0], [], [], [], []
    h_base = t_base = 0
    i = 0
    while i < n_samples:
        p = r = 0
        j = i
        while j < n_samples:
            n_j, len_j = int(num[j]), int(response_lengths[j])
            if j > i and (p + n_j > s_h or r + len_j > s_t):
                break
            hidden_offset[j] = h_base + p
            token_offset[j] = t_base + r
            p += n_j
            r += len_j
            j += 1
        rows_h = _round_up(p, s_h)
        rows_t = _round_up(r, s_t)
        h_start.append(h_base)
        h_rows.append(rows_h)
        t_start.append(t_base)
        t_rows.append(rows_t)
        h_base += rows_h
        t_base += rows_t
        starts.append(j)
        i = j
    params = {"unit_positions": int(unit_positions), "unit_tokens": int(unit_tokens), "hidden_chunk_rows": int(c_h),
              "hidden_shard_rows": int(s_h), "token_chunk_rows": int(c_t), "token_shard_rows": int(s_t)}
    return Layout(
        t0, num, hidden_offset, token_offset, response_lengths.astype(np.int32),
        np.asarray(prompt_lengths, dtype=np.int32), np.asarray(starts, np.int64), np.asarray(h_start, np.int64),
        np.asarray(h_rows, np.int64), np.asarray(t_start, np.int64), np.asarray(t_rows, np.int64), params,
    )


# ------------------------------------------------------------------------- digests
def sample_digest(row: int, t0: int, n: int, length: int, hidden: np.ndarray,
                  tokens: dict[str, np.ndarray]) -> str:
    """Digest of one sample's stored content (hidden rows in storage encoding + per-token arrays)."""
    h = hashlib.sha256()
    h.update(f"{row}|{t0}|{n}|{length}|{hidden.dtype.str}|{hidden.shape}|".encode())
    h.update(memoryview(np.ascontiguousarray(hidden)).cast("B"))
    for name in sorted(tokens):
        a = np.ascontiguousarray(tokens[name])
        h.update(f"{name}|{a.dtype.str}|{a.shape}|".encode())
        h.update(memoryview(a).cast("B"))
    return h.hexdigest()


def value_meta(meta: dict) -> dict[str, Any]:
    """The metadata that defines what the stored values mean (enters ``content_digest``)."""
    enc = meta["encoding"]
    return {
        "kind": FORMAT.kind, "format_version": FORMAT.version, "layers": list(meta["layers"]),
        "hidden_size": int(meta["hidden_size"]), "positions": meta["positions"], "logprobs": meta["logprobs"],
        "encoding": {"dtype": enc["dtype"], "lossy_mantissa_bits": enc.get("lossy_mantissa_bits")},
        "rollout_content_digest": meta["rollout"]["content_digest"], "num_samples": int(meta["num_samples"]),
    }


def combine_digests(meta: dict, sample_digests: Sequence[str]) -> str:
    h = hashlib.sha256()
    h.update(json.dumps(value_meta(meta), sort_keys=True).encode())
    for d in sample_digests:
        h.update(d.encode())
    return "sha256:" + h.hexdigest()


def layout_key(meta: dict) -> dict[str, Any]:
    """What a resuming or parallel worker must agree on with the store it joins."""
    teacher = meta.get("teacher", {})
    return {
        **value_meta(meta),
        "teacher": {k: teacher.get(k) for k in ("config_digest", "weights_digest", "dtype")},
        "compression": meta.get("compression"),
        "layout": {k: v for k, v in (meta.get("layout") or {}).items() if k != "max_batch_tokens"},
    }


def _describe_key_difference(old: dict, new: dict) -> str:
    diffs = []
    for k in sorted(set(old) | set(new)):
        if old.get(k) != new.get(k):
            diffs.append(f"{k}: {old.get(k)!r} vs {new.get(k)!r}")
    return "; ".join(diffs[:3])


# -------------------------------------------------------------------------- writer
def _storage_error(path: str, e: OSError) -> OprdError:
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
        group = zarr.open_group(path, mode="a")
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
        output ``[n_j, n_layers, d]`` (CPU); ``tokens[name][j]`` its per-token array ``[T_j, ...]``."""
        lay = self.layout
        n_layers, d = self.hidden.shape[1], self.hidden.shape[2]
        region = np.zeros((unit.hidden_rows, n_layers, d), dtype=self.encoding.storage)
        cos = CosineStats()
        digests = []
        token_regions = {name: np.zeros((unit.token_rows, *self.tokens[name].shape[1:]), dtype=self.tokens[name].dtype)
                         for name in self.token_names}
        raw_hidden = raw_tokens = 0
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
            digests.append(sample_digest(row, t0, n, length, enc, tok))
        try:
            if unit.hidden_rows:
                self.hidden[unit.hidden_start: unit.hidden_start + unit.hidden_rows] = region
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
            pause = float(os.environ.get(PAUSE_BEFORE_MARKER_ENV) or 0)
            if pause > 0:
                time.sleep(pause)
            common.write_json_atomic(common.join(self.path, UNIT_DIR, f"u{unit.index:08d}.json"), marker)
        except OSError as e:
            raise _storage_error(self.path, e) from None
        return marker

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
        if not self.complete and common.read_json(common.join(self.path, LAYOUT_MARKER)) is None:
            self._layout_ready = False
        else:
            self._layout_ready = True
        self.meta = meta
        self.group = zarr.open_group(self.path, mode="r")
        self.encoding = Encoding.from_meta(meta["encoding"])

    # ---- metadata
    @property
    def layers(self) -> list[int]:
        return [int(x) for x in self.meta["layers"]]

    @property
    def hidden_size(self) -> int:
        return int(self.meta["hidden_size"])

    @property
    def num_samples(self) -> int:
        return int(self.meta["num_samples"])

    @property
    def num_positions(self) -> int:
        return int(self.meta["num_positions"])

    @property
    def positions(self) -> dict:
        return dict(self.meta["positions"])

    @property
    def logprobs(self) -> dict:
        return {"mode": self.meta["logprobs"]["mode"], "k": int(self.meta["logprobs"].get("k") or 0)}

    @property
    def rollout(self) -> dict:
        r = self.meta["rollout"]
        return {"path": r.get("path"), "store_id": r.get("store_id"), "content_digest": r.get("content_digest")}

    @property
    def tokenizer_digest(self) -> str:
        return str(self.meta["tokenizer_digest"])

    @property
    def teacher(self) -> dict:
        return dict(self.meta["teacher"])

    @property
    def content_digest(self) -> str | None:
        if not self.complete:
            return None
        return str(self.meta.get("content_digest") or (common.completion(self.path) or {}).get("content_digest"))

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
        hidden = torch.zeros((B, n_layers, P, d), dtype=self.encoding.torch_dtype)
        mask = torch.zeros((B, P), dtype=torch.bool)
        positions = torch.full((B, P), -1, dtype=torch.int64)
        for i, part in enumerate(parts):
            k = int(n[i])
            if k:
                hidden[i, :, :k] = self.encoding.decode(part).permute(1, 0, 2)
                mask[i, :k] = True
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
        if dtype is not None:
            hidden = hidden.to(dtype)
        batch = CacheBatch(r, hidden, mask, positions, response_mask, out.get("teacher_logprobs"),
                           out.get("support_logprobs"), out.get("teacher_topk_ids"),
                           out.get("teacher_topk_logprobs"))
        return batch.to(device) if device is not None else batch

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
            "units": {"total": units_total, "done": units_done},
            "layout": m.get("layout"),
            "created_at": m.get("created_at"),
            "completed_at": m.get("completed_at"),
            "content_digest": self.content_digest,
        }


def open_cache(path: str, require_complete: bool = True) -> TeacherCache:
    return TeacherCache(str(path), require_complete=require_complete)
