"""Batches for training: which samples form each optimizer step, how they split into micro-batches,
and a bounded background prefetcher that reads the teacher cache ahead of the step.

A step's plan is a pure function of (cache, seed, epoch, batch size), so a resumed run replays the
exact same batches. Rows of the rollout store and of the cache correspond one to one.
"""

from __future__ import annotations

import queue
import threading
import time
from dataclasses import dataclass
from typing import Callable, Iterator, Sequence

import numpy as np
import torch

from oprd_cli.backbone import pack_by_length
from oprd_cli.errors import OprdError
from oprd_cli.stores.rollouts import RolloutArrays as RolloutData  # noqa: F401 (re-exported)
from oprd_cli.train.step import MicroBatch


def epoch_order(num_samples: int, seed: int, epoch: int, cache_digest: str, shuffle: bool) -> np.ndarray:
    if not shuffle:
        return np.arange(num_samples)
    tag = int(str(cache_digest).split(":")[-1][:8] or "0", 16)
    return np.random.default_rng([int(seed), int(epoch), tag]).permutation(num_samples)


def plan_steps(num_samples: int, batch_size: int, epochs: int, seed: int, cache_digest: str,
               shuffle: bool = True) -> list[tuple[int, np.ndarray]]:
    """``[(epoch, rows)]`` for every optimizer step on one cache: each epoch is one pass over the
    samples in ``batch_size`` groups (the last group may be smaller)."""
    out = []
    for e in range(epochs):
        order = epoch_order(num_samples, seed, e, cache_digest, shuffle)
        for i in range(0, num_samples, batch_size):
            out.append((e, order[i:i + batch_size]))
    return out


def split_micro_batches(rows: Sequence[int], seq_lens: Sequence[int], budget: int) -> list[list[int]]:
    """Split one step's rows into micro-batches whose padded size ``len(rows) * max(seq_len)`` stays
    within ``budget`` tokens (a sample longer than the budget gets a micro-batch of its own). Rows
    are sorted by length first (less padding); the result is deterministic."""
    return [[int(rows[i]) for i in group] for group in pack_by_length(seq_lens, budget)]


@dataclass(frozen=True)
class Needs:
    """What the objective reads from the rollout and the cache."""

    hidden: bool
    teacher_logprobs: bool
    support: bool
    teacher_topk: int = 0  # the teacher's own top-k (first K of the cache's), for tropd
    trust_seed: tuple | None = None  # (run seed, round) of the TrOPD trust draw


def assemble(rows: Sequence[int], rollout: RolloutData, cache, needs: Needs,
             hidden_dtype: torch.dtype | None = None) -> MicroBatch:
    """One micro-batch: token tensors from the rollout, teacher tensors from ``cache.read(rows)``."""
    rows = [int(r) for r in rows]
    b = len(rows)
    plen = [len(rollout.prompt_ids[r]) for r in rows]
    rlen = [len(rollout.response_ids[r]) for r in rows]
    S = max(p + t for p, t in zip(plen, rlen))
    T = max(max(rlen), 1)
    input_ids = torch.zeros((b, max(S, 1)), dtype=torch.long)
    response_ids = torch.zeros((b, T), dtype=torch.long)
    response_mask = torch.zeros((b, T), dtype=torch.bool)
    behaviour = torch.zeros((b, T), dtype=torch.float32)
    for i, r in enumerate(rows):
        seq = np.concatenate([rollout.prompt_ids[r], rollout.response_ids[r]])
        input_ids[i, :len(seq)] = torch.from_numpy(seq)
        response_ids[i, :rlen[i]] = torch.from_numpy(rollout.response_ids[r])
        response_mask[i, :rlen[i]] = True
        behaviour[i, :rlen[i]] = torch.from_numpy(rollout.logprobs[r])
    support_ids = None
    if needs.support:
        if rollout.topk_ids is None:
            raise OprdError("the rollout store has no top-k ids; re-run `oprd rollout --record-topk K`")
        K = rollout.topk_ids[rows[0]].shape[-1]
        support_ids = torch.zeros((b, T, K), dtype=torch.long)
        for i, r in enumerate(rows):
            support_ids[i, :rlen[i]] = torch.from_numpy(rollout.topk_ids[r])
    mb = MicroBatch(rows=np.asarray(rows), input_ids=input_ids, prompt_lens=torch.tensor(plen, dtype=torch.long),
                    response_ids=response_ids, response_mask=response_mask, behaviour_logprobs=behaviour,
                    support_ids=support_ids, trust_seed=needs.trust_seed)
    if rollout.prefix_lengths is not None:
        mb.prefix_lens = torch.as_tensor(rollout.prefix_lengths[rows], dtype=torch.long)
    if cache is None:
        return mb
    cb = cache.read(rows, dtype=hidden_dtype) if hidden_dtype is not None else cache.read(rows)
    got = cb.response_mask.sum(dim=-1).tolist()
    if [int(x) for x in got] != rlen:
        raise OprdError(f"cache {cache.path} does not match its rollout store: response lengths of rows "
                        f"{rows[:4]}... differ ({got[:4]} vs {rlen[:4]})")
    if needs.hidden:
        mb.teacher_hidden = cb.hidden
        mb.hidden_mask = cb.mask.bool()
        mb.hidden_positions = cb.positions.long()
    if needs.teacher_logprobs:
        mb.teacher_logprobs = _pad_to(cb.teacher_logprobs, T)
    if needs.teacher_topk:
        if cb.teacher_topk_ids is None or cb.teacher_topk_logprobs is None:
            raise OprdError(f"cache {cache.path} holds no teacher top-k; re-run `oprd teacher-cache --objective tropd`")
        k = needs.teacher_topk
        mb.teacher_topk_ids = _pad_to(cb.teacher_topk_ids[..., :k], T).long().contiguous()
        mb.teacher_topk_logprobs = _pad_to(cb.teacher_topk_logprobs[..., :k], T).contiguous()
    if needs.support:
        mb.support_logprobs = _pad_to(cb.support_logprobs, T)
        k_cache = int(mb.support_logprobs.shape[-1])
        if mb.support_ids is not None and mb.support_ids.shape[-1] > k_cache:
            # The cache holds teacher log-probs on the student's top-K ids for K = its --topk, the first
            # K of the rollout's (sorted) --record-topk K' ids: the common support is those K ids.
            mb.support_ids = mb.support_ids[..., :k_cache].contiguous()
        if cb.teacher_topk_ids is not None:
            mb.teacher_topk_ids = _pad_to(cb.teacher_topk_ids, T).long()
    return mb


def _pad_to(x: torch.Tensor | None, T: int) -> torch.Tensor | None:
    """The cache's ``[b, T', ...]`` per-token tensors on the micro-batch's ``T`` (they agree whenever
    the lengths match; this only guards a reader that pads differently)."""
    if x is None or x.shape[1] == T:
        return x
    if x.shape[1] > T:
        return x[:, :T]
    pad = torch.zeros((x.shape[0], T - x.shape[1], *x.shape[2:]), dtype=x.dtype)
    return torch.cat([x, pad], dim=1)


class Prefetcher:
    """Runs ``produce(i)`` for ``i = 0..n-1`` on a background thread, at most ``depth`` items ahead of
    the consumer, so the training step does not wait on the disk. Exceptions in the producer reach
    the consumer at the item where they happened. Use as an iterator; :meth:`close` stops early."""

    _DONE = object()

    def __init__(self, produce: Callable[[int], object], n: int, depth: int = 2, name: str = "oprd-prefetch"):
        self._produce = produce
        self._n = n
        self._q: queue.Queue = queue.Queue(maxsize=max(1, depth))
        self._stop = threading.Event()
        self.wait_s = 0.0  # time the consumer spent blocked on the queue (last item)
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def _put(self, item) -> bool:
        while not self._stop.is_set():
            try:
                self._q.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def _run(self) -> None:
        try:
            for i in range(self._n):
                if self._stop.is_set():
                    return
                if not self._put(("ok", self._produce(i))):
                    return
        except BaseException as e:  # noqa: BLE001 - handed to the consumer
            self._put(("err", e))
            return
        self._put(("done", self._DONE))

    def __iter__(self) -> Iterator[object]:
        while True:
            t0 = time.perf_counter()
            kind, item = self._q.get()
            self.wait_s = time.perf_counter() - t0
            if kind == "done":
                return
            if kind == "err":
                raise item
            yield item

    def close(self) -> None:
        self._stop.set()
        try:
            while True:
                self._q.get_nowait()
        except queue.Empty:
            pass
        self._thread.join(timeout=5)

    def __enter__(self) -> "Prefetcher":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
