"""The teacher-cache format: version, modes, value encoding, codecs and content digests."""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import torch

from oprd_cli.errors import OprdError
from oprd_cli.stores import common
from oprd_cli.stores.common import StoreFormat
from oprd_cli.stores.integrity import checksum_codec

# Version 2: the hidden state of response token t is the one at sequence index Lp + t (version 1
# stored Lp - 1 + t); an old cache is refused, never misread.
FORMAT = StoreFormat(kind="teacher_cache", version=2,
                     older="its hidden states use the old position convention (the state at Lp - 1 + t, not "
                           "Lp + t); re-run `oprd teacher-cache --overwrite` on its rollouts")
LAYOUT_MARKER = "oprd_layout.json"
UNIT_DIR = "units"
UNIT_RE = re.compile(r"^u(\d{8})\.json$")

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
# Per stored position (row of ``hidden``), bool: the position has a teacher partner. Only in caches of a
# cross-tokenizer bridge (``meta["alignment"]``); a cache without it has every stored position valid.
VALID = "position/valid"
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
                           shuffle="shuffle", typesize=itemsize, blocksize=BLOSC_BLOCK_BYTES), checksum_codec()]
    return common.compressor_codecs(name, level, typesize=itemsize)

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
        **({"bridge": meta["bridge"].get("digest")} if meta.get("bridge") else {}),
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


