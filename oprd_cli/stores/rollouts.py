"""The rollout store: one round of student samples (format owner).

Layout (Zarr v3 group; per-token data flat with offsets, never padded)::

    attrs["oprd"]         kind="rollouts", format_version, created_at, policy{model, step,
                          weights_digest}, tokenizer{name, digest}, sampling{...}, template{...},
                          prompts{source, ...}, seed, backend, counts, skipped_prompts
    prompt/ids            int32  [prompt_tokens]    rendered prompt token ids, flat
    prompt/offsets        int64  [P+1]
    prompt/dataset_index  int64  [P]                row of the prompt in its dataset
    prompt/id_bytes, prompt/id_offsets              dataset id (utf-8, ragged)
    prompt/answer_bytes, prompt/answer_offsets      reference answer (utf-8, "" if none)
    prompt/has_answer     bool   [P]
    sample/prompt_row     int32  [N]                row in the prompt/ table
    sample/sample_index   int32  [N]                0..num_samples-1 within its prompt
    sample/finish_reason  uint8  [N]                0 = EOS, 1 = length limit
    sample/offsets        int64  [N+1]              into token/*
    sample/text_bytes, sample/text_offsets          decoded response text (utf-8, ragged)
    sample/prefix_length  int32  [N]                optional (teacher-prefix guidance): the first n
                                                    response tokens were written by the teacher; absent
                                                    means 0 for every sample
    token/response_ids    int32  [R]
    token/logprobs        float32[R]                behaviour log-prob of each sampled token under the
                                                    distribution it was sampled from: log_softmax of the
                                                    logits after temperature, top-k and top-p
                                                    (renormalised); 0 (log 1) for greedy decoding; the
                                                    teacher's for the tokens of a teacher prefix
    token/topk_ids        int32  [R, K]             optional: the top-K ids of the policy's raw logits
    oprd_complete.json                              completion marker (written last, atomically)

``sampling`` records what was used (temperature, top_p, top_k, ...) and ``warped``: whether the
sampling distribution differs from the raw policy (temperature != 1, top-k < vocabulary, top-p < 1,
or greedy). Format version 2 (version 1 stored raw temperature-1 log-probs under the same name, so
a version-1 store is refused rather than misread).

Samples are ordered by (prompt_row, sample_index). ``content_digest`` is a sha256
over every array (names, dtypes, shapes, bytes), so equal content gives an equal
digest whatever the chunking or the time of writing.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from functools import cached_property
from typing import Any, Iterator

import numpy as np
import zarr

from oprd_cli.errors import OprdError
from oprd_cli.stores import common, integrity
from oprd_cli.stores.common import StoreFormat
from oprd_cli.stores.meta import RolloutMeta

FORMAT = StoreFormat(kind="rollouts", version=2)
FINISH_REASONS = ("eos", "length")
TOKEN_CHUNK = 1 << 18  # tokens per chunk of the flat arrays
ROW_CHUNK = 1 << 16  # rows per chunk of per-prompt / per-sample arrays


@dataclass
class RolloutSample:
    """One sample as the reader returns it."""

    row: int  # position in the store
    prompt_row: int
    prompt_index: int  # row in the source dataset
    prompt_id: str
    sample_index: int
    prompt_ids: np.ndarray  # int32 [prompt_len]
    response_ids: np.ndarray  # int32 [T]
    logprobs: np.ndarray  # float32 [T]
    topk_ids: np.ndarray | None  # int32 [T, K]
    finish_reason: str
    text: str
    answer: str | None


class RolloutWriter:
    """Collects prompts and samples, then writes the store and marks it complete.

    Rows are buffered in memory (token ids and log-probs are small next to a teacher
    cache) and written in whole chunks at :meth:`finish`; the completion marker is the
    last write, so an interrupted writer leaves an incomplete store that readers refuse
    and the next writer replaces.
    """

    def __init__(self, path: str, meta: dict[str, Any], record_topk: int = 0, overwrite: bool = False,
                 record_prefix: bool = False):
        self.path = str(path)
        self.meta = dict(meta)
        self.record_topk = int(record_topk)
        self.record_prefix = bool(record_prefix)  # write sample/prefix_length (teacher-prefix guidance)
        self._prefix: list[int] = []
        common.prepare_output(self.path, overwrite, "rollout store")
        try:
            self.group = zarr.open_group(self.path, mode="w")
            self.group.attrs[common.ATTR_KEY] = {"kind": FORMAT.kind, "format_version": FORMAT.version,
                                                 "created_at": common.now_iso(), **self.meta}
        except OSError as e:
            raise OprdError(f"cannot write rollout store {self.path}: {e.strerror or e}") from None
        self._prompts: list[tuple[list[int], int, str, str | None]] = []
        self._samples: list[tuple[int, int, int, str]] = []  # prompt_row, sample_index, finish, text
        self._ids: list[np.ndarray] = []
        self._logprobs: list[np.ndarray] = []
        self._topk: list[np.ndarray] = []

    def add_prompt(self, prompt_ids: list[int], dataset_index: int, prompt_id: str, answer: str | None) -> int:
        self._prompts.append((list(prompt_ids), int(dataset_index), str(prompt_id), answer))
        return len(self._prompts) - 1

    def add_sample(self, prompt_row: int, sample_index: int, response_ids, logprobs, finish_reason: str,
                   text: str, topk_ids=None, prefix_length: int = 0) -> None:
        ids = np.asarray(response_ids, dtype=np.int32).reshape(-1)
        lp = np.asarray(logprobs, dtype=np.float32).reshape(-1)
        if ids.shape != lp.shape:
            raise ValueError("response_ids and logprobs differ in length")
        if not 0 <= int(prefix_length) <= len(ids) or (prefix_length and not self.record_prefix):
            raise ValueError(f"prefix_length {prefix_length} does not fit a response of {len(ids)} tokens")
        self._prefix.append(int(prefix_length))
        if self.record_topk:
            tk = np.asarray(topk_ids, dtype=np.int32).reshape(len(ids), self.record_topk)
            self._topk.append(tk)
        self._samples.append((int(prompt_row), int(sample_index), FINISH_REASONS.index(finish_reason), text))
        self._ids.append(ids)
        self._logprobs.append(lp)

    def _array(self, name: str, data: np.ndarray, chunk_rows: int) -> None:
        chunks = (max(1, min(chunk_rows, data.shape[0])),) + data.shape[1:]
        self.group.create_array(name, data=data, chunks=chunks, compressors=common.compressor_codecs("zstd", 3))

    def finish(self, extra_meta: dict[str, Any] | None = None) -> str:
        """Write every array, the digest and the completion marker; returns the content digest."""
        if not self._samples:
            raise OprdError("no samples were generated; nothing to write")
        order = sorted(range(len(self._samples)), key=lambda i: (self._samples[i][0], self._samples[i][1]))
        samples = [self._samples[i] for i in order]
        ids = [self._ids[i] for i in order]
        arrays: dict[str, np.ndarray] = {}
        p_ids = [np.asarray(p[0], dtype=np.int32) for p in self._prompts]
        arrays["prompt/ids"] = np.concatenate(p_ids) if p_ids else np.zeros(0, np.int32)
        arrays["prompt/offsets"] = common.offsets_from_lengths(len(p) for p in p_ids)
        arrays["prompt/dataset_index"] = np.asarray([p[1] for p in self._prompts], dtype=np.int64)
        arrays["prompt/id_bytes"], arrays["prompt/id_offsets"] = common.encode_strings(p[2] for p in self._prompts)
        arrays["prompt/answer_bytes"], arrays["prompt/answer_offsets"] = common.encode_strings(
            p[3] or "" for p in self._prompts)
        arrays["prompt/has_answer"] = np.asarray([p[3] is not None for p in self._prompts], dtype=bool)
        arrays["sample/prompt_row"] = np.asarray([s[0] for s in samples], dtype=np.int32)
        arrays["sample/sample_index"] = np.asarray([s[1] for s in samples], dtype=np.int32)
        arrays["sample/finish_reason"] = np.asarray([s[2] for s in samples], dtype=np.uint8)
        arrays["sample/offsets"] = common.offsets_from_lengths(len(x) for x in ids)
        arrays["sample/text_bytes"], arrays["sample/text_offsets"] = common.encode_strings(s[3] for s in samples)
        if self.record_prefix:
            arrays["sample/prefix_length"] = np.asarray([self._prefix[i] for i in order], dtype=np.int32)
        arrays["token/response_ids"] = np.concatenate(ids)
        arrays["token/logprobs"] = np.concatenate([self._logprobs[i] for i in order])
        if self.record_topk:
            arrays["token/topk_ids"] = np.concatenate([self._topk[i] for i in order])
        try:
            for name, data in arrays.items():
                chunk = TOKEN_CHUNK if name.startswith(("token/", "prompt/ids")) or name.endswith("bytes") \
                    else ROW_CHUNK
                if name == "token/topk_ids":
                    chunk = max(1, TOKEN_CHUNK // max(1, self.record_topk))
                self._array(name, data, chunk)
        except OSError as e:
            raise OprdError(f"cannot write rollout store {self.path}: {e.strerror or e}") from None
        digest = common.Digest()
        for name in sorted(arrays):
            digest.add_array(name, arrays[name])
        content_digest = digest.hexdigest()
        counts = {
            "num_prompts": len(self._prompts),
            "num_samples": len(samples),
            "num_tokens": int(arrays["token/response_ids"].shape[0]),
            "num_prompt_tokens": int(arrays["prompt/ids"].shape[0]),
            "num_finished_eos": int((arrays["sample/finish_reason"] == 0).sum()),
            "num_truncated": int((arrays["sample/finish_reason"] == 1).sum()),
        }
        meta = dict(self.group.attrs[common.ATTR_KEY])
        meta.update(counts)
        meta.update(extra_meta or {})
        meta["content_digest"] = content_digest
        self.group.attrs[common.ATTR_KEY] = meta
        common.mark_complete(self.path, content_digest)
        return content_digest


def _meta_field(key: str, conv, default=None) -> property:
    """A property reading ``meta[key]`` (``default`` when given and the key is absent) through ``conv``."""
    if default is None:
        return property(lambda self: conv(self.meta[key]))
    return property(lambda self: conv(self.meta.get(key, default)))


class RolloutStore:
    """Read-only view of a complete rollout store."""

    def __init__(self, path: str, require_complete: bool = True):
        self.path = str(path)
        meta, self.complete = common.open_meta(
            self.path, FORMAT, require_complete,
            f"rollout store {self.path} is incomplete (its writer was interrupted or is still running); "
            "re-run `oprd rollout` to produce it",
        )
        self.meta = meta
        self.group = integrity.guard(zarr.open_group(self.path, mode="r"), self.path, self.complete)

    # ---- small arrays, loaded once
    def _load(self, name: str) -> np.ndarray:
        cache = self.__dict__.setdefault("_cache", {})
        if name not in cache:
            cache[name] = self.group[name][...]
        return cache[name]

    num_samples = _meta_field("num_samples", int)
    num_tokens = _meta_field("num_tokens", int)
    num_prompts = _meta_field("num_prompts", int)
    content_digest = _meta_field("content_digest", str)
    record_topk = _meta_field("record_topk", int, default=0)

    @property
    def sampling(self) -> dict[str, Any]:
        """The sampling parameters used, with ``warped`` (see the module docstring)."""
        return dict(self.meta.get("sampling") or {})

    @property
    def warped(self) -> bool:
        return bool(self.sampling.get("warped", False))

    @property
    def tokenizer_digest(self) -> str:
        return str(self.meta["tokenizer"]["digest"])

    @cached_property
    def typed_meta(self) -> RolloutMeta:
        """The store's metadata, typed (read once)."""
        return RolloutMeta.from_attrs(self.path, self.meta)

    @cached_property
    def store_id(self) -> str:
        """A short id for this store's content (used by caches to name their source)."""
        return self.content_digest.split(":")[-1][:16]

    @property
    def sample_offsets(self) -> np.ndarray:
        return self._load("sample/offsets")

    @property
    def response_lengths(self) -> np.ndarray:
        return np.diff(self.sample_offsets)

    @property
    def prompt_lengths(self) -> np.ndarray:
        """Prompt length of every sample, int64 [N]."""
        return np.diff(self._load("prompt/offsets"))[self._load("sample/prompt_row")]

    @property
    def prefix_lengths(self) -> np.ndarray:
        """Teacher-prefix length of every sample, int32 [N] (0 everywhere for a store without guidance)."""
        if "prefix_length" not in self.group["sample"]:
            return np.zeros(self.num_samples, dtype=np.int32)
        return self._load("sample/prefix_length")

    @property
    def finish_reasons(self) -> list[str]:
        return [FINISH_REASONS[i] for i in self._load("sample/finish_reason")]

    def prompt_ids(self, prompt_row: int) -> np.ndarray:
        off = self._load("prompt/offsets")
        return self._load("prompt/ids")[off[prompt_row] : off[prompt_row + 1]]

    def texts(self) -> list[str]:
        return common.decode_strings(self._load("sample/text_bytes"), self._load("sample/text_offsets"))

    def prompt_answers(self) -> list[str | None]:
        answers = common.decode_strings(self._load("prompt/answer_bytes"), self._load("prompt/answer_offsets"))
        return [a if h else None for a, h in zip(answers, self._load("prompt/has_answer"))]

    def prompt_ids_table(self) -> list[str]:
        return common.decode_strings(self._load("prompt/id_bytes"), self._load("prompt/id_offsets"))

    def token_range(self, start: int, stop: int) -> tuple[int, int]:
        off = self.sample_offsets
        return int(off[start]), int(off[stop])

    def read_tokens(self, name: str, start: int, stop: int) -> np.ndarray:
        """Flat per-token array ``token/<name>`` for samples [start, stop)."""
        a, b = self.token_range(start, stop)
        if name == "topk_ids" and not self.record_topk:
            raise OprdError(f"rollout store {self.path} has no top-k ids; re-run `oprd rollout --record-topk K`")
        return self.group[f"token/{name}"][a:b]

    def samples(self, start: int = 0, stop: int | None = None) -> Iterator[RolloutSample]:
        """Samples [start, stop) with every field, reading each array once for the range."""
        stop = self.num_samples if stop is None else min(stop, self.num_samples)
        if start >= stop:
            return
        off = self.sample_offsets
        base = int(off[start])
        ids = self.read_tokens("response_ids", start, stop)
        lps = self.read_tokens("logprobs", start, stop)
        topk = self.read_tokens("topk_ids", start, stop) if self.record_topk else None
        texts = self.texts()
        answers = self.prompt_answers()
        pids = self.prompt_ids_table()
        prow = self._load("sample/prompt_row")
        sidx = self._load("sample/sample_index")
        dsidx = self._load("prompt/dataset_index")
        fin = self._load("sample/finish_reason")
        for i in range(start, stop):
            a, b = int(off[i]) - base, int(off[i + 1]) - base
            r = int(prow[i])
            yield RolloutSample(
                row=i, prompt_row=r, prompt_index=int(dsidx[r]), prompt_id=pids[r], sample_index=int(sidx[i]),
                prompt_ids=self.prompt_ids(r), response_ids=ids[a:b], logprobs=lps[a:b],
                topk_ids=None if topk is None else topk[a:b], finish_reason=FINISH_REASONS[int(fin[i])],
                text=texts[i], answer=answers[r],
            )

    def sample(self, i: int) -> RolloutSample:
        return next(self.samples(i, i + 1))

    def recompute_digest(self) -> str:
        """Digest recomputed from the stored arrays (checks the store against its marker)."""
        names = []

        def visit(group, prefix=""):
            for name, item in group.members():
                if isinstance(item, zarr.Group):
                    visit(item, f"{prefix}{name}/")
                else:
                    names.append(f"{prefix}{name}")

        with warnings.catch_warnings():  # the completion marker is not a zarr node; that is fine
            warnings.simplefilter("ignore")
            visit(self.group)
        d = common.Digest()
        for name in sorted(names):
            d.add_array(name, self.group[name][...])
        return d.hexdigest()

    def info(self) -> dict[str, Any]:
        meta = dict(self.meta)
        lengths = self.response_lengths
        info = {
            "path": self.path,
            "kind": FORMAT.kind,
            "format_version": FORMAT.version,
            "complete": self.complete,
            **{k: v for k, v in meta.items() if k not in ("kind", "format_version")},
            "store_id": self.store_id,
            "mean_response_tokens": float(lengths.mean()) if len(lengths) else 0.0,
            "max_response_tokens": int(lengths.max()) if len(lengths) else 0,
        }
        return info


@dataclass
class RolloutArrays:
    """The per-sample token arrays of one rollout store, held in memory (ids and log-probs are small
    next to a cache): what the teacher pass and the trainer read. Samples of one prompt share its
    ``prompt_ids`` array."""

    path: str
    prompt_ids: list[np.ndarray]  # int64, per sample
    response_ids: list[np.ndarray]  # int64, per sample
    logprobs: list[np.ndarray]  # float32, per sample
    topk_ids: list[np.ndarray] | None  # int64 [T, K] per sample, when the store recorded top-k ids
    prefix_lengths: np.ndarray | None = None  # int32 [N] teacher-prefix lengths (None: no guidance, all 0)

    @classmethod
    def load(cls, store: "RolloutStore") -> "RolloutArrays":
        return load_arrays(store)

    def __len__(self) -> int:
        return len(self.response_ids)

    def seq_len(self, row: int) -> int:
        """Input length of a sample: prompt + response (the last response token's hidden state is
        supervised by OPRD; its output distribution is never needed)."""
        return len(self.prompt_ids[row]) + len(self.response_ids[row])

    def response_tokens(self, rows) -> int:
        return int(sum(len(self.response_ids[i]) for i in rows))


def load_arrays(store: RolloutStore) -> RolloutArrays:
    """The one way to load a rollout's token arrays: each flat array read once, split per sample."""
    n = store.num_samples
    cuts = (store.sample_offsets[1:-1] - store.sample_offsets[0]).astype(np.int64)
    prompt_off = store._load("prompt/offsets")
    prompt_flat = store._load("prompt/ids").astype(np.int64)
    by_prompt = [prompt_flat[prompt_off[r]: prompt_off[r + 1]] for r in range(len(prompt_off) - 1)]

    def per_sample(name: str, dtype) -> list[np.ndarray]:
        return np.split(store.read_tokens(name, 0, n).astype(dtype), cuts) if n else []

    return RolloutArrays(
        path=store.path,
        prompt_ids=[by_prompt[int(r)] for r in store._load("sample/prompt_row")],
        response_ids=per_sample("response_ids", np.int64),
        logprobs=per_sample("logprobs", np.float32),
        topk_ids=per_sample("topk_ids", np.int64) if store.record_topk and n else None,
        prefix_lengths=store.prefix_lengths if "prefix_length" in store.group["sample"] else None,
    )


def open_rollouts(path: str, require_complete: bool = True) -> RolloutStore:
    return RolloutStore(path, require_complete=require_complete)
