"""The teacher pass: run the teacher on rollouts and write its hidden states (and log-probs) to a cache.

``oprd teacher-cache`` calls :func:`run_teacher_cache`; ``oprd loop`` calls :func:`cache_rollouts` for
one rollout store -> one cache. The store format lives in :mod:`oprd_cli.stores.cache`.

How a pass works
- The teacher runs only as deep as the deepest requested layer: decoder blocks past it are dropped
  after loading, and a forward hook on the deepest block stops the forward there. The LM head is
  dropped too unless log-probs are asked for; then it runs only on the response positions, a slice
  of rows at a time, never producing ``[B, S, V]`` logits.
- Each sequence is ``prompt + response`` cut after the last position that is needed. Two kinds of
  positions, kept apart: the hidden state of response token ``y_t`` is the one at sequence index
  ``Lp + t`` (it has read ``y_t``; the release's ``hidden_states[l][:, -T:]``), while the log-prob of
  ``y_t`` comes from the output at ``Lp - 1 + t`` (the position that predicts it).
- Work is done unit by unit (a unit is a group of whole samples owning whole shards of the store).
  Within a unit, sequences are sorted by length and packed into batches of at most
  ``max_batch_tokens`` padded tokens (right padding; causal attention keeps real tokens blind to the
  padding). Batches never cross units, so a unit's values depend only on the unit and the budget:
  workers and restarts with the same settings reproduce the same bytes and the same digest.
- The main thread computes; a background thread encodes, compresses and writes finished units
  through a bounded queue (so memory stays flat) and writes each unit's done marker after its data.
"""

from __future__ import annotations

import os
import queue
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from oprd_cli import backbone, models
from oprd_cli.console import err_console, progress
from oprd_cli.errors import OprdError
from oprd_cli.stores import cache as cache_store
from oprd_cli.stores import common
from oprd_cli.stores.rollouts import RolloutStore, open_rollouts
from oprd_cli.stores.rundir import RunDir, round_index


# ------------------------------------------------------------------------ settings
@dataclass
class TeacherCacheConfig:
    """Settings of a teacher pass (``[teacher_cache]`` in oprd.toml; flags override)."""

    layers: str = "all"
    positions: str = "last_k"
    k: int = 2000
    logprobs: str = "none"
    topk: int = 16
    store_dtype: str = "auto"
    compressor: str = cache_store.DEFAULT_COMPRESSOR
    level: int | None = None
    lossy_mantissa_bits: int | None = None
    max_batch_tokens: int = 16384
    unit_positions: int | None = None
    unit_tokens: int | None = None
    device: str = "auto"
    dtype: str = "auto"
    trust_remote_code: bool = False

    def validate(self) -> None:
        if self.positions not in cache_store.POSITION_MODES:
            raise OprdError(f"unknown --positions {self.positions!r}; choose one of "
                            f"{', '.join(cache_store.POSITION_MODES)}")
        if self.k < 1:
            raise OprdError(f"--k must be at least 1 (positions per sample), got {self.k}")
        if self.logprobs not in cache_store.LOGPROB_MODES:
            raise OprdError(f"unknown --logprobs {self.logprobs!r}; choose one of {', '.join(cache_store.LOGPROB_MODES)}")
        if self.logprobs == "topk" and self.topk < 1:
            raise OprdError(f"--topk must be at least 1, got {self.topk}")
        if self.store_dtype != "auto" and self.store_dtype not in cache_store.STORE_DTYPES:
            raise OprdError(f"unknown --store-dtype {self.store_dtype!r}; choose auto or one of "
                            f"{', '.join(cache_store.STORE_DTYPES)}")
        if self.compressor not in common.COMPRESSORS:
            raise OprdError(f"unknown --compressor {self.compressor!r}; choose one of {', '.join(common.COMPRESSORS)}")
        if self.max_batch_tokens < 1:
            raise OprdError(f"--max-batch-tokens must be at least 1, got {self.max_batch_tokens}")
        if self.lossy_mantissa_bits is not None and self.lossy_mantissa_bits < 0:
            raise OprdError(f"--lossy-mantissa-bits must be >= 0, got {self.lossy_mantissa_bits}")
        for name in ("unit_positions", "unit_tokens"):
            v = getattr(self, name)
            if v is not None and v < 1:
                raise OprdError(f"--{name.replace('_', '-')} must be at least 1, got {v}")

    @property
    def need_logits(self) -> bool:
        return self.logprobs != "none"


def parse_shard(spec: str | tuple[int, int] | None) -> tuple[int, int]:
    """``"I/N"`` -> (I, N) with 0 <= I < N."""
    if spec is None:
        return 0, 1
    if isinstance(spec, tuple):
        i, n = spec
    else:
        try:
            a, b = str(spec).split("/")
            i, n = int(a), int(b)
        except ValueError:
            raise OprdError(f"--shard {spec!r} must look like I/N, e.g. 0/4 (worker I of N, I from 0 to N-1)") from None
    if n < 1 or not 0 <= i < n:
        raise OprdError(f"--shard {i}/{n}: I must be in 0..{max(n, 1) - 1} (worker I of N, counting from 0)")
    return i, n


# ------------------------------------------------------------------------ the teacher
@dataclass
class SeqRequest:
    """One sequence to run: ``ids`` (prompt + response, cut after the last needed position),
    the sequence indices whose hidden states are wanted, and, for log-probs, the sequence indices of
    every response position with the sampled ids (and the student's top-k ids)."""

    ids: np.ndarray
    hidden_index: np.ndarray
    logprob_index: np.ndarray | None = None
    targets: np.ndarray | None = None
    support: np.ndarray | None = None


class TeacherModel:
    """A teacher loaded for caching: truncated to the deepest requested layer, LM head only if needed."""

    def __init__(self, name: str, layers: str = "all", need_logits: bool = False, device: str = "auto",
                 dtype: str = "auto", trust_remote_code: bool = False, truncate: bool = True,
                 attn_implementation: str | None = None):
        self.name = str(name)
        self.device = models.resolve_device(device)
        self.dtype = models.resolve_dtype(dtype, self.device)
        self.tokenizer = models.load_tokenizer(self.name, trust_remote_code=trust_remote_code)
        self.tokenizer_digest = models.tokenizer_digest(self.tokenizer)
        model = models.load_model(self.name, torch.device("cpu"), self.dtype, trust_remote_code=trust_remote_code,
                                  attn_implementation=attn_implementation
                                  or models.choose_attn_implementation(self.device, self.dtype))
        self.config = model.config
        self.num_layers = models.num_layers(model.config)
        self.hidden_size = models.hidden_size(model.config)
        self.layers_spec = str(layers)
        self.layers = models.select_layers(layers, self.num_layers)
        self.depth = max(self.layers)
        self.need_logits = bool(need_logits)
        self.config_digest = models.config_digest(model.config)
        self.weights_digest = models.weights_digest(model)
        self.full = self.need_logits or self.depth == self.num_layers or not truncate
        if not self.full:
            backbone.truncate_blocks(model, self.depth)
        lm_head = model.get_output_embeddings() if self.need_logits else None
        if self.need_logits and lm_head is None:
            raise OprdError(f"teacher {self.name} has no LM head; it cannot give log-probs (use --logprobs none)")
        backbone.decoder_of(model)[0].to(self.device).eval()
        if lm_head is not None:
            lm_head.to(self.device).eval()
        self.model = model
        pad = self.tokenizer.pad_token_id
        self.pad_id = int(pad) if pad is not None else 0

    def describe(self) -> dict[str, Any]:
        local = Path(os.path.expanduser(self.name))
        return {
            "name": self.name, "path": str(local.resolve()) if local.is_dir() else None,
            "config_digest": self.config_digest, "weights_digest": self.weights_digest,
            "num_layers": self.num_layers, "hidden_size": self.hidden_size, "dtype": cache_store.dtype_name(self.dtype),
            "model_type": getattr(self.config, "model_type", None), "device": str(self.device),
            "blocks_run": self.num_layers if self.full else self.depth, "lm_head": self.need_logits,
        }

    @torch.no_grad()
    def run(self, reqs: list[SeqRequest], logprobs: str = "none", topk: int = 0,
            logit_elements: int = 1 << 27) -> list[dict[str, Any]]:
        """Run one padded batch. Per request: ``hidden`` [n, n_layers, d] (CPU, model dtype) and, with
        log-probs, ``teacher_logprobs`` [T] (+ ``support_logprobs``, ``teacher_topk_ids``,
        ``teacher_topk_logprobs`` [T, K] for ``topk``) as numpy arrays."""
        dev = self.device
        B = len(reqs)
        S = max(len(r.ids) for r in reqs)
        ids = torch.full((B, S), self.pad_id, dtype=torch.long)
        for i, r in enumerate(reqs):
            ids[i, : len(r.ids)] = torch.from_numpy(np.asarray(r.ids, dtype=np.int64))
        ids = ids.to(dev)
        counts = [len(r.hidden_index) for r in reqs]
        bi = torch.repeat_interleave(torch.arange(B), torch.tensor(counts)).to(dev)
        si = torch.from_numpy(np.concatenate([np.asarray(r.hidden_index, dtype=np.int64) for r in reqs])).to(dev)
        out = backbone.backbone_hidden(self.model, ids, self.layers, need_final=self.full,
                                       num_layers=self.num_layers, rows=(bi, si))
        caps, final = out.hidden, out.final
        hidden = torch.stack([caps[i] for i in self.layers], dim=1).to("cpu")
        results: list[dict[str, Any]] = [{} for _ in reqs]
        for i, part in enumerate(torch.split(hidden, counts)):
            results[i]["hidden"] = part
        if logprobs != "none":
            self._logprobs(final, reqs, logprobs, topk, results, logit_elements)
        return results

    def _logprobs(self, final, reqs, mode, topk, results, logit_elements):
        dev = self.device
        lens = [len(r.logprob_index) for r in reqs]
        lbi = torch.repeat_interleave(torch.arange(len(reqs)), torch.tensor(lens)).to(dev)
        lsi = torch.from_numpy(np.concatenate([np.asarray(r.logprob_index, dtype=np.int64) for r in reqs])).to(dev)
        tgt = torch.from_numpy(np.concatenate([np.asarray(r.targets, dtype=np.int64) for r in reqs])).to(dev)
        k = topk if mode == "topk" else 0
        sup = None
        if k:
            sup = torch.from_numpy(np.concatenate([np.asarray(r.support, dtype=np.int64).reshape(-1, k)
                                                   for r in reqs])).to(dev)
        got = backbone.selected_logprobs(self.model, final[lbi, lsi], tgt, support=sup, topk=k,
                                         logit_elements=logit_elements)
        for name, key in (("teacher_logprobs", "logprobs"), ("support_logprobs", "support_logprobs"),
                          ("teacher_topk_ids", "topk_ids"), ("teacher_topk_logprobs", "topk_logprobs")):
            if key in got:
                for i, part in enumerate(torch.split(got[key], lens)):
                    results[i][name] = part.numpy()


# ------------------------------------------------------------------------ rollouts
@dataclass
class _RolloutData:
    """What the teacher pass needs from a rollout store, read once."""

    store: RolloutStore
    prompt_ids: list[np.ndarray]  # per sample
    response_ids: list[np.ndarray]
    support: list[np.ndarray | None]

    @classmethod
    def load(cls, store: RolloutStore, support_k: int = 0) -> "_RolloutData":
        prompts, responses, support = [], [], []
        by_prompt: dict[int, np.ndarray] = {}
        for s in store.samples():
            if s.prompt_row not in by_prompt:
                by_prompt[s.prompt_row] = np.asarray(s.prompt_ids, dtype=np.int64)
            prompts.append(by_prompt[s.prompt_row])
            responses.append(np.asarray(s.response_ids, dtype=np.int64))
            support.append(np.asarray(s.topk_ids[:, :support_k], dtype=np.int64) if support_k else None)
        return cls(store, prompts, responses, support)


def _request(data: _RolloutData, layout: cache_store.Layout, row: int, logprobs: str) -> SeqRequest | None:
    lp = len(data.prompt_ids[row])
    length = int(layout.response_length[row])
    t0, n = int(layout.position_start[row]), int(layout.num_positions[row])
    need = 0  # tokens of prompt + response the forward must see
    if n:
        need = lp + t0 + n  # hidden state of response token t: sequence index lp + t
    if logprobs != "none" and length:
        need = max(need, lp + length - 1)  # log-prob of token t: output at sequence index lp - 1 + t
        if lp < 1:
            raise OprdError(f"sample {row} of {data.store.path} has an empty prompt; the teacher needs at least "
                            "one prompt token to predict the first response token")
    if need == 0:
        return None
    ids = np.concatenate([data.prompt_ids[row], data.response_ids[row]])[:need]
    req = SeqRequest(ids=ids, hidden_index=np.arange(lp + t0, lp + t0 + n, dtype=np.int64))
    if logprobs != "none":
        req.logprob_index = np.arange(lp - 1, lp - 1 + length, dtype=np.int64)
        req.targets = data.response_ids[row]
        req.support = data.support[row]
    return req


def plan_batches(lengths: dict[int, int], max_batch_tokens: int) -> list[list[int]]:
    """Rows sorted by length (longest first, ties by row), packed so that rows x longest <= budget."""
    order = sorted(lengths, key=lambda r: (-lengths[r], r))
    batches: list[list[int]] = []
    cur: list[int] = []
    for r in order:
        longest = lengths[cur[0]] if cur else lengths[r]
        if cur and longest * (len(cur) + 1) > max_batch_tokens:
            batches.append(cur)
            cur = []
        cur.append(r)
    if cur:
        batches.append(cur)
    return batches


# ------------------------------------------------------------------------ the writer thread
class _BackgroundWriter:
    """Writes finished units on a thread; ``submit`` blocks while ``max_queue`` units wait."""

    def __init__(self, writer: cache_store.CacheWriter, worker: str, max_queue: int,
                 on_written: Callable[[cache_store.Unit, dict, float], None]):
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


# ------------------------------------------------------------------------ one store
def default_out_path(rollouts_path: str | Path) -> Path:
    """``RUN/rollouts/rNNNNNN.zarr`` -> ``RUN/cache/rNNNNNN.zarr``; otherwise ``NAME.cache.zarr`` beside it."""
    p = Path(str(rollouts_path).rstrip("/"))
    if round_index(p) is not None and p.parent.name == "rollouts":
        return RunDir(p.parent.parent).cache_path_for(p)
    stem = p.name[:-5] if p.name.endswith(".zarr") else p.name
    return p.parent / f"{stem}.cache.zarr"


def _rollout_path_str(path: str) -> str:
    return str(Path(path).resolve()) if common.is_local(path) else str(path)


def cache_rollouts(
    teacher: str | TeacherModel,
    rollouts_path: str | Path,
    out_path: str | Path | None = None,
    *,
    layers: str = "all",
    positions: str = "last_k",
    k: int = 2000,
    logprobs: str = "none",
    topk: int = 16,
    store_dtype: str = "auto",
    compressor: str = cache_store.DEFAULT_COMPRESSOR,
    level: int | None = None,
    lossy_mantissa_bits: int | None = None,
    max_batch_tokens: int = 16384,
    unit_positions: int | None = None,
    unit_tokens: int | None = None,
    device: str = "auto",
    dtype: str = "auto",
    shard: tuple[int, int] | str = (0, 1),
    overwrite: bool = False,
    trust_remote_code: bool = False,
    show_progress: bool = True,
    writer_queue: int = 2,
    stats: dict | None = None,
) -> str:
    """Cache the teacher's activations for one complete rollout store; returns the cache path.

    With ``shard=(I, N)`` this worker fills units ``u`` with ``u % N == I``; the cache is marked
    complete by whichever worker finds every unit done. A store left by an interrupted worker is
    resumed (only units without a done marker are computed). ``stats`` (a dict) receives timings.
    """
    cfg = TeacherCacheConfig(layers=layers, positions=positions, k=k, logprobs=logprobs, topk=topk,
                             store_dtype=store_dtype, compressor=compressor, level=level,
                             lossy_mantissa_bits=lossy_mantissa_bits, max_batch_tokens=max_batch_tokens,
                             unit_positions=unit_positions, unit_tokens=unit_tokens, device=device, dtype=dtype,
                             trust_remote_code=trust_remote_code)
    cfg.validate()
    shard_i, shard_n = parse_shard(shard)
    rollouts_path = str(rollouts_path)
    out = str(out_path) if out_path is not None else str(default_out_path(rollouts_path))
    if common.is_local(rollouts_path) and common.is_local(out) and \
            Path(out).resolve() == Path(rollouts_path).resolve():
        raise OprdError("--out is the rollout store itself; choose another path for the cache")
    store = open_rollouts(rollouts_path)
    if not overwrite and common.exists(out) and common.is_complete(out):  # say so before loading the teacher
        kind = common.read_meta(out).get("kind")
        if kind != cache_store.FORMAT.kind:
            raise OprdError(f"{out} is a {kind!r} store, not a teacher cache; choose another --out")
        raise OprdError(f"teacher cache {out} already exists and is complete; pass --overwrite to replace it")
    if cfg.logprobs == "topk":
        if not store.record_topk:
            raise OprdError(f"--logprobs topk needs the student's top-k ids, and rollout store {rollouts_path} has "
                            f"none; re-run `oprd rollout --record-topk {cfg.topk}` (or use --logprobs sampled)")
        if store.record_topk < cfg.topk:
            raise OprdError(f"--topk {cfg.topk} is more than the {store.record_topk} student top-k ids recorded in "
                            f"{rollouts_path}; use --topk {store.record_topk} or less")

    t_start = time.perf_counter()
    tm = teacher if isinstance(teacher, TeacherModel) else TeacherModel(
        teacher, layers=cfg.layers, need_logits=cfg.need_logits, device=cfg.device, dtype=cfg.dtype,
        trust_remote_code=cfg.trust_remote_code)
    if isinstance(teacher, TeacherModel) and cfg.need_logits and not tm.need_logits:
        raise ValueError("the loaded teacher was truncated without its LM head; load it with need_logits=True")
    if isinstance(teacher, TeacherModel):
        layer_list = models.select_layers(cfg.layers, tm.num_layers)
        if not set(layer_list) <= set(tm.layers):
            raise ValueError(f"the loaded teacher was prepared for layers {tm.layers}, not {layer_list}")
    else:
        layer_list = tm.layers
    if tm.tokenizer_digest != store.tokenizer_digest:
        tok_name = (store.meta.get("tokenizer") or {}).get("name") or "?"
        raise OprdError(
            f"teacher {tm.name} has another tokenizer ({tm.tokenizer_digest}) than rollout store {rollouts_path} "
            f"(tokenizer {tok_name}, {store.tokenizer_digest}); the teacher must share the student's tokenizer"
        )

    model_dtype = cache_store.dtype_name(tm.dtype)
    encoding = cache_store.Encoding(model_dtype if cfg.store_dtype == "auto" else cfg.store_dtype, model_dtype,
                                    cfg.lossy_mantissa_bits)
    level_used = cfg.level if cfg.level is not None else cache_store.DEFAULT_LEVEL.get(cfg.compressor)
    layout = cache_store.plan_layout(
        store.prompt_lengths, store.response_lengths, positions=cfg.positions, k=cfg.k,
        n_layers=len(layer_list), hidden_size=tm.hidden_size, itemsize=encoding.storage.itemsize,
        unit_positions=cfg.unit_positions, unit_tokens=cfg.unit_tokens,
    )
    topk_used = cfg.topk if cfg.logprobs == "topk" else 0
    meta = {
        "kind": cache_store.FORMAT.kind,
        "format_version": cache_store.FORMAT.version,
        "created_at": common.now_iso(),
        "rollout": {"path": _rollout_path_str(rollouts_path), "store_id": store.store_id,
                    "content_digest": store.content_digest, "num_samples": store.num_samples,
                    "num_tokens": store.num_tokens, "policy": store.meta.get("policy")},
        "tokenizer_digest": store.tokenizer_digest,
        "teacher": tm.describe(),
        "layers": layer_list,
        "hidden_size": tm.hidden_size,
        "positions": {"mode": cfg.positions, "k": int(cfg.k)},
        "logprobs": {"mode": cfg.logprobs, "k": topk_used, "support_k": topk_used},
        "encoding": encoding.to_meta(),
        "compression": {"compressor": cfg.compressor, "level": level_used},
        "layout": {**layout.params, "num_units": layout.num_units, "hidden_rows": layout.hidden_rows,
                   "token_rows": layout.token_rows, "max_batch_tokens": cfg.max_batch_tokens},
        "num_samples": store.num_samples,
        "num_positions": int(layout.num_positions.sum()),
        "num_tokens": int(layout.response_length.sum()),
    }
    writer = cache_store.CacheWriter.open(out, meta, layout, overwrite=overwrite)
    recorded_budget = (writer.meta.get("layout") or {}).get("max_batch_tokens")
    if recorded_budget is not None and recorded_budget != cfg.max_batch_tokens:
        err_console.print(f"[yellow]warning:[/] {out} was started with --max-batch-tokens {recorded_budget}; "
                          f"this worker uses {cfg.max_batch_tokens}, so its units may differ from the others' "
                          "in the last bits and the content digest from an uninterrupted run")
    done = writer.done_units()
    mine = [u for u in range(layout.num_units) if u % shard_n == shard_i]
    todo = [layout.unit(u) for u in mine if u not in done]
    worker = f"{shard_i}/{shard_n}"
    already = len(mine) - len(todo)
    if already and todo:
        err_console.print(f"resuming {out}: {already} of this worker's {len(mine)} units already done")
    data = _RolloutData.load(store, support_k=topk_used) if todo else None

    counters = {"samples": 0, "tokens": 0, "raw": 0, "stored": 0, "units": 0}
    lock = threading.Lock()
    t_loop = time.perf_counter()
    cpu_loop = time.process_time()
    compute_seconds = 0.0
    total_samples = sum(u.sample_stop - u.sample_start for u in todo)
    bar = progress(
        progress_columns_text("{task.fields[tps]} tok/s"),
        progress_columns_text("{task.fields[mb]} MB"),
        progress_columns_text("x{task.fields[ratio]}"),
        transient=False,
    ) if show_progress and todo else None
    task = None

    def on_written(unit: cache_store.Unit, marker: dict, seconds: float) -> None:
        with lock:
            counters["samples"] += unit.sample_stop - unit.sample_start
            counters["raw"] += marker["raw_bytes"]["hidden"] + marker["raw_bytes"]["tokens"]
            counters["stored"] += marker["stored_bytes"]["hidden"] + marker["stored_bytes"]["tokens"]
            counters["units"] += 1
            if bar is not None:
                elapsed = max(1e-9, time.perf_counter() - t_loop)
                bar.update(task, completed=counters["samples"], tps=f"{counters['tokens'] / elapsed:,.0f}",
                           mb=f"{counters['stored'] / 1e6:,.1f}",
                           ratio=f"{counters['raw'] / counters['stored']:.2f}" if counters["stored"] else "-")

    bg = _BackgroundWriter(writer, worker, writer_queue, on_written) if todo else None
    writer_busy = 0.0
    try:
        if bar is not None:
            bar.start()
            task = bar.add_task(f"teacher-cache {Path(out).name}", total=total_samples, tps="-", mb="0.0", ratio="-")
        for unit in todo:
            reqs = {}
            for row in unit.rows:
                req = _request(data, layout, row, cfg.logprobs)
                if req is not None:
                    reqs[row] = req
            results: dict[int, dict] = {}
            t_c = time.perf_counter()
            for batch in plan_batches({r: len(q.ids) for r, q in reqs.items()}, cfg.max_batch_tokens):
                outs = tm.run([reqs[r] for r in batch], logprobs=cfg.logprobs, topk=topk_used)
                for r, o in zip(batch, outs):
                    results[r] = o
                with lock:
                    counters["tokens"] += sum(len(reqs[r].ids) for r in batch)
            compute_seconds += time.perf_counter() - t_c
            hidden, tokens = [], {name: [] for name in cache_store.token_arrays_for(cfg.logprobs)}
            for row in unit.rows:
                o = results.get(row)
                n = int(layout.num_positions[row])
                hidden.append(o["hidden"] if o is not None else torch.zeros((0, len(layer_list), tm.hidden_size),
                                                                           dtype=tm.dtype))
                for name in tokens:
                    if o is not None:
                        tokens[name].append(o[name])
                    else:
                        shape = (0,) if name == "teacher_logprobs" else (0, topk_used)
                        tokens[name].append(np.zeros(shape, np.float32))
                assert hidden[-1].shape[0] == n
            bg.submit(unit, hidden, tokens)
        if bg is not None:
            bg.close()
            writer_busy = bg.busy_seconds
            bg = None
    finally:
        if bg is not None:  # an error in the main thread: let queued units finish, then stop
            try:
                bg.close()
            except BaseException:
                pass
        if bar is not None:
            bar.stop()
    loop_seconds = time.perf_counter() - t_loop
    loop_cpu_seconds = time.process_time() - cpu_loop
    digest = writer.try_finalize()
    if stats is not None:
        stats.update({
            "path": out, "complete": digest is not None, "content_digest": digest, "units_total": layout.num_units,
            "units_computed": len(todo), "units_already_done": already, "samples": total_samples,
            "tokens_fed": counters["tokens"], "raw_bytes": counters["raw"], "stored_bytes": counters["stored"],
            "loop_seconds": loop_seconds, "loop_cpu_seconds": loop_cpu_seconds, "compute_seconds": compute_seconds,
            "writer_busy_seconds": writer_busy,
            "total_seconds": time.perf_counter() - t_start,
        })
    return out


def progress_columns_text(fmt: str):
    from rich.progress import TextColumn

    return TextColumn(fmt)


# ------------------------------------------------------------------------ run directories
def _summary(rollouts_path, st: dict) -> dict[str, Any]:
    return {
        "path": st["path"], "rollouts": str(rollouts_path), "complete": st["complete"],
        "content_digest": st["content_digest"],
        "units": {"total": st["units_total"], "computed": st["units_computed"],
                  "already_done": st["units_already_done"]},
        "samples_computed": st["samples"], "seconds": round(st["total_seconds"], 3),
    }


def _report(summary: dict[str, Any]) -> None:
    if summary["complete"]:
        err_console.print(f"teacher cache {summary['path']} complete ({summary['content_digest']})")
    else:
        err_console.print(f"teacher cache {summary['path']}: this worker's units are done; "
                          "waiting for the other shards to finish theirs")


def cache_run_dir(
    teacher: str | TeacherModel,
    run_dir: str | Path,
    *,
    follow: bool = False,
    poll_seconds: float = 10.0,
    max_rounds: int | None = None,
    timeout: float | None = None,
    shard: tuple[int, int] | str = (0, 1),
    overwrite: bool = False,
    show_progress: bool = True,
    **settings: Any,
) -> list[dict[str, Any]]:
    """Cache every complete rollout round of ``run_dir`` that has no complete cache, oldest first.

    ``follow`` keeps watching for new rounds (every ``poll_seconds``) until ``max_rounds`` rounds were
    cached by this worker or ``timeout`` seconds have passed. With ``overwrite`` every complete round
    is cached again once (its complete cache replaced), then new rounds as usual. ``settings`` are
    :class:`TeacherCacheConfig` fields. Returns one summary per round worked on.
    """
    run = RunDir(run_dir)
    if not run.root.is_dir():
        raise OprdError(f"run directory {run_dir} does not exist")
    cfg = TeacherCacheConfig(**settings)
    cfg.validate()
    shard = parse_shard(shard)
    tm = teacher if isinstance(teacher, TeacherModel) else None
    summaries: list[dict[str, Any]] = []
    handled: set[int] = set()  # rounds this call has already worked on (so --overwrite redoes each once)
    started = time.monotonic()
    said_waiting = False
    while True:
        worked = False
        for idx, rpath in run.rollout_rounds(complete_only=True):
            if max_rounds is not None and len(summaries) >= max_rounds:
                break
            out = run.cache_path_for(rpath)
            if idx in handled or (common.is_complete(str(out)) and not overwrite):
                continue
            handled.add(idx)
            if tm is None:
                tm = TeacherModel(str(teacher), layers=cfg.layers, need_logits=cfg.need_logits, device=cfg.device,
                                  dtype=cfg.dtype, trust_remote_code=cfg.trust_remote_code)
            st: dict[str, Any] = {}
            cache_rollouts(tm, rpath, out, shard=shard, stats=st, show_progress=show_progress, overwrite=overwrite,
                           **settings)
            if st["units_computed"] or st["complete"]:
                summary = _summary(rpath, st)
                summaries.append(summary)
                _report(summary)
                worked = True
                said_waiting = False
        if not follow:
            if not summaries:
                err_console.print(f"nothing to do in {run.root}: every complete rollout round has a complete cache")
            return summaries
        if max_rounds is not None and len(summaries) >= max_rounds:
            return summaries
        elapsed = time.monotonic() - started
        if timeout is not None and elapsed >= timeout:
            return summaries
        if not worked:
            if not said_waiting:
                err_console.print(f"watching {run.rollouts_dir} for new rounds (every {poll_seconds:g} s)")
                said_waiting = True
            wait = poll_seconds if timeout is None else max(0.0, min(poll_seconds, timeout - elapsed))
            time.sleep(wait)


def run_teacher_cache(
    teacher: str | None = None,
    *,
    rollouts: str | None = None,
    out: str | None = None,
    run_dir: str | None = None,
    follow: bool = False,
    poll_seconds: float = 10.0,
    max_rounds: int | None = None,
    timeout: float | None = None,
    shard: str | None = None,
    overwrite: bool = False,
    show_progress: bool = True,
    **flags: Any,
) -> list[dict[str, Any]]:
    """What ``oprd teacher-cache`` runs. ``flags`` are :class:`TeacherCacheConfig` fields; a flag left
    at None takes its value from ``[teacher_cache]`` in ``RUN/oprd.toml`` (run-dir mode), then the default."""
    from oprd_cli.config import load_run_config, merge

    if (rollouts is None) == (run_dir is None):
        raise OprdError("give either --rollouts STORE.zarr (and optionally --out CACHE.zarr) or --run-dir RUN")
    if follow and run_dir is None:
        raise OprdError("--follow watches a run directory; give --run-dir RUN")
    if out is not None and run_dir is not None:
        raise OprdError("--out goes with --rollouts; in a run directory caches are named RUN/cache/rNNNNNN.zarr")
    if max_rounds is not None and max_rounds < 1:
        raise OprdError(f"--max-rounds must be at least 1, got {max_rounds}")
    if poll_seconds <= 0:
        raise OprdError(f"--poll-seconds must be positive, got {poll_seconds}")
    file_cfg = load_run_config(run_dir) if run_dir is not None else {}
    cfg = merge(TeacherCacheConfig, file_cfg.get("teacher_cache"), **flags)
    teacher = teacher or (file_cfg.get("models") or {}).get("teacher")
    if not teacher:
        raise OprdError("--teacher is required (a hub id or a local folder; or set [models] teacher in oprd.toml)")
    shard_t = parse_shard(shard)
    settings = {f: getattr(cfg, f) for f in TeacherCacheConfig.__dataclass_fields__}
    if run_dir is not None:
        return cache_run_dir(teacher, run_dir, follow=follow, poll_seconds=poll_seconds, max_rounds=max_rounds,
                             timeout=timeout, shard=shard_t, show_progress=show_progress, overwrite=overwrite,
                             **settings)
    st: dict[str, Any] = {}
    cache_rollouts(teacher, rollouts, out, shard=shard_t, overwrite=overwrite, show_progress=show_progress,
                   stats=st, **settings)
    summary = _summary(rollouts, st)
    _report(summary)
    return [summary]
