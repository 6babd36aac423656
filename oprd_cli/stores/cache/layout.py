"""The teacher-cache layout: samples grouped into units that own whole shards of the arrays."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from oprd_cli.errors import OprdError
from oprd_cli.stores.cache.format import (CHUNK_BYTES, DEFAULT_UNIT_TOKENS, TOKEN_CHUNK_ROWS, UNIT_BYTES,
                                          position_range)


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


