"""The teacher pass: run the teacher on rollouts and write its hidden states (and log-probs) to a cache.

``oprd teacher-cache`` calls :func:`run_teacher_cache`; ``oprd loop`` calls :func:`cache_rollouts` for
one rollout store -> one cache. The store format lives in :mod:`oprd_cli.stores.cache`.

How a pass works
- The teacher (:mod:`oprd_cli.teacher_model`) runs only as deep as the deepest requested layer:
  decoder blocks past it are dropped after loading, and the one truncated forward
  (:mod:`oprd_cli.backbone`) stops after the deepest block. The LM head is dropped too unless
  log-probs are asked for; then it runs only on the response positions, a slice of rows at a time,
  never producing ``[B, S, V]`` logits.
- Each sequence is ``prompt + response`` cut after the last position that is needed. Two kinds of
  positions, kept apart: the hidden state of response token ``y_t`` is the one at sequence index
  ``Lp + t`` (it has read ``y_t``; the release's ``hidden_states[l][:, -T:]``), while the log-prob of
  ``y_t`` comes from the output at ``Lp - 1 + t`` (the position that predicts it).
- Work is done unit by unit (a unit is a group of whole samples owning whole shards of the store):
  checks, teacher, plan of the store, then the units (:func:`cache_rollouts` names each step).
  Within a unit, sequences are sorted by length and packed into batches of at most
  ``max_batch_tokens`` padded tokens (right padding; causal attention keeps real tokens blind to the
  padding). Batches never cross units, so a unit's values depend only on the unit and the budget:
  workers and restarts with the same settings reproduce the same bytes and the same digest.
- The main thread computes; a background thread encodes, compresses and writes finished units
  through a bounded queue (so memory stays flat) and writes each unit's done marker after its data.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from oprd_cli import models
from oprd_cli.console import err_console, progress
from oprd_cli.paths import check_output
from oprd_cli.errors import OprdError
from oprd_cli.stores import cache as cache_store
from oprd_cli.stores import common
from oprd_cli.stores.rollouts import RolloutArrays, RolloutStore, load_arrays, open_rollouts
from oprd_cli.stores.rundir import RunDir, round_index
from oprd_cli.teacher_model import SeqRequest, TeacherModel, unit_batches  # noqa: F401 (re-exported)


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
    bridge: str | None = None  # a fitted bridge folder: store z_T = P_T (h_T - mu_T) (oprd_cli.bridge.caching)

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

    @property
    def support_k(self) -> int:
        """Student top-k ids the teacher scores (and its own top-k kept): ``topk`` for ``--logprobs topk``."""
        return self.topk if self.logprobs == "topk" else 0

    @classmethod
    def resolve(cls, cfg: "TeacherCacheConfig | None", settings: dict[str, Any]) -> "TeacherCacheConfig":
        """``cfg`` itself, or one built from ``settings`` (its fields); validated either way."""
        if cfg is not None and settings:
            raise TypeError(f"give a TeacherCacheConfig or its fields, not both ({', '.join(settings)})")
        cfg = cfg if cfg is not None else cls(**settings)
        cfg.validate()
        return cfg


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


def _check_inputs(cfg: TeacherCacheConfig, store: RolloutStore, out: str, overwrite: bool) -> None:
    """The refusals that need no teacher: an existing complete cache, top-k ids the rollout lacks."""
    if common.is_local(store.path) and common.is_local(out) and Path(out).resolve() == Path(store.path).resolve():
        raise OprdError("--out is the rollout store itself; choose another path for the cache")
    check_output(out, "teacher cache", inputs=[store.path])
    if not overwrite and common.exists(out) and common.is_complete(out):  # say so before loading the teacher
        kind = common.read_meta(out).get("kind")
        if kind != cache_store.FORMAT.kind:
            raise OprdError(f"{out} is a {kind!r} store, not a teacher cache; choose another --out")
        raise OprdError(f"teacher cache {out} already exists and is complete; pass --overwrite to replace it")
    if cfg.logprobs == "topk":
        store.typed_meta.check_topk(cfg.topk)


def _load_teacher(teacher: str | TeacherModel, cfg: TeacherCacheConfig, store: RolloutStore,
                  same_tokenizer: bool = True) -> tuple[TeacherModel, list[int]]:
    """The teacher (loaded, or checked when given loaded) and the layers to cache; it must share the
    rollout's tokenizer."""
    if isinstance(teacher, TeacherModel):
        tm = teacher
        if cfg.need_logits and not tm.need_logits:
            raise ValueError("the loaded teacher was truncated without its LM head; load it with need_logits=True")
        layer_list = models.select_layers(cfg.layers, tm.num_layers)
        if not set(layer_list) <= set(tm.layers):
            raise ValueError(f"the loaded teacher was prepared for layers {tm.layers}, not {layer_list}")
    else:
        tm = TeacherModel(teacher, layers=cfg.layers, need_logits=cfg.need_logits, device=cfg.device, dtype=cfg.dtype,
                          trust_remote_code=cfg.trust_remote_code)
        layer_list = tm.layers
    if same_tokenizer:  # a bridge aligns other tokenizers by character offsets (oprd_cli.bridge.view)
        store.typed_meta.check_teacher(tm.name, tm.tokenizer_digest)
    return tm, layer_list


def _plan_store(cfg: TeacherCacheConfig, store: RolloutStore, tm: TeacherModel,
                layer_list: list[int], bp=None) -> tuple[dict[str, Any], cache_store.Layout]:
    """The cache's metadata and unit layout for this rollout, teacher and settings (``bp``: a
    :class:`~oprd_cli.bridge.caching.BridgePass`, whose layers, rank and entries it records)."""
    model_dtype = "float32" if bp else cache_store.dtype_name(tm.dtype)  # z_T is computed in float32
    encoding = cache_store.Encoding(model_dtype if cfg.store_dtype == "auto" else cfg.store_dtype, model_dtype,
                                    cfg.lossy_mantissa_bits)
    layout = cache_store.plan_layout(
        store.prompt_lengths, store.response_lengths, positions=cfg.positions, k=cfg.k,
        n_layers=bp.n_layers if bp else len(layer_list), hidden_size=bp.bridge.rank if bp else tm.hidden_size,
        itemsize=encoding.storage.itemsize,
        unit_positions=cfg.unit_positions, unit_tokens=cfg.unit_tokens,
    )
    meta = {
        "kind": cache_store.FORMAT.kind,
        "format_version": cache_store.FORMAT.version,
        "created_at": common.now_iso(),
        "rollout": {"path": _rollout_path_str(store.path), "store_id": store.store_id,
                    "content_digest": store.content_digest, "num_samples": store.num_samples,
                    "num_tokens": store.num_tokens, "policy": store.meta.get("policy")},
        "tokenizer_digest": store.tokenizer_digest,
        "teacher": tm.describe(),
        "layers": list(bp.bridge.teacher_layers) if bp else layer_list,
        "hidden_size": bp.bridge.rank if bp else tm.hidden_size,
        "positions": {"mode": cfg.positions, "k": int(cfg.k)},
        "logprobs": {"mode": cfg.logprobs, "k": cfg.support_k, "support_k": cfg.support_k},
        "encoding": encoding.to_meta(),
        "compression": {"compressor": cfg.compressor,
                        "level": cfg.level if cfg.level is not None else cache_store.DEFAULT_LEVEL.get(cfg.compressor)},
        "layout": {**layout.params, "num_units": layout.num_units, "hidden_rows": layout.hidden_rows,
                   "token_rows": layout.token_rows, "max_batch_tokens": cfg.max_batch_tokens},
        "num_samples": store.num_samples,
        "num_positions": int(layout.num_positions.sum()),
        "num_tokens": int(layout.response_length.sum()),
    }
    if bp is not None:
        meta.update(bp.prepare(load_arrays(store), layout))
    return meta, layout


def _compute_unit(tm: TeacherModel, data: RolloutArrays, layout: cache_store.Layout, unit: cache_store.Unit,
                  cfg: TeacherCacheConfig, on_batch: Callable[[int], None], bp=None) -> tuple[list[torch.Tensor],
                                                                                              dict[str, list[np.ndarray]]]:
    """Run the teacher over one unit; its hidden states and per-token arrays in row order (rows that
    needed no forward get empty entries). ``on_batch(tokens)`` after each batch. With a bridge
    (``bp``) the projected states (and, across tokenizers, the positions' validity)."""
    results: dict[int, dict] = {}
    cross = bp is not None and bp.cross  # the teacher reads the response text under its own tokenizer
    batches = bp.batches(layout, unit, cfg.max_batch_tokens) if cross else \
        unit_batches(data, layout, unit, cfg.logprobs, cfg.max_batch_tokens, cfg.support_k)
    for batch in batches:
        outs = tm.run([q for _, q in batch], logprobs=cfg.logprobs, topk=cfg.support_k)
        results.update({row: o for (row, _), o in zip(batch, outs)})
        on_batch(sum(len(q.ids) for _, q in batch))
    if cross:
        done = [bp.finish(layout, row, (results.get(row) or {}).get("hidden")) for row in unit.rows]
        return [z for z, _ in done], {cache_store.VALID: [v for _, v in done]}
    hidden, tokens = [], {name: [] for name in cache_store.token_arrays_for(cfg.logprobs)}
    n_layers = len(models.select_layers(cfg.layers, tm.num_layers))
    for row in unit.rows:
        o = results.get(row)
        hidden.append(o["hidden"] if o is not None else torch.zeros((0, n_layers, tm.hidden_size), dtype=tm.dtype))
        if bp is not None:  # the same tokenizer: z_T of the states at Lp + t
            hidden[-1] = bp.finish(layout, row, o["hidden"] if o is not None else None)[0]
        for name in tokens:
            shape = (0,) if name == "teacher_logprobs" else (0, cfg.support_k)
            tokens[name].append(o[name] if o is not None else np.zeros(shape, np.float32))
        assert hidden[-1].shape[0] == int(layout.num_positions[row])
    return hidden, tokens


class _Counters:
    """What the pass has done so far (updated by the compute and the writer threads) and its bar."""

    def __init__(self, bar, total_samples: int, name: str):
        self.samples = self.tokens = self.raw = self.stored = self.units = 0
        self.lock = threading.Lock()
        self.t0 = time.perf_counter()
        self.bar = bar
        self.task = bar.add_task(f"teacher-cache {name}", total=total_samples, tps="-", mb="0.0",
                                 ratio="-") if bar is not None else None

    def fed(self, tokens: int) -> None:
        with self.lock:
            self.tokens += tokens

    def written(self, unit: cache_store.Unit, marker: dict, seconds: float) -> None:
        with self.lock:
            self.samples += unit.sample_stop - unit.sample_start
            self.raw += marker["raw_bytes"]["hidden"] + marker["raw_bytes"]["tokens"]
            self.stored += marker["stored_bytes"]["hidden"] + marker["stored_bytes"]["tokens"]
            self.units += 1
            if self.bar is not None:
                elapsed = max(1e-9, time.perf_counter() - self.t0)
                self.bar.update(self.task, completed=self.samples, tps=f"{self.tokens / elapsed:,.0f}",
                                mb=f"{self.stored / 1e6:,.1f}",
                                ratio=f"{self.raw / self.stored:.2f}" if self.stored else "-")


def _progress_bar(show: bool):
    if not show:
        return None
    return progress(progress_columns_text("{task.fields[tps]} tok/s"), progress_columns_text("{task.fields[mb]} MB"),
                    progress_columns_text("x{task.fields[ratio]}"), transient=False)


def _run_units(tm: TeacherModel, data: RolloutArrays | None, layout: cache_store.Layout, todo: list,
               writer: cache_store.CacheWriter, worker: str, cfg: TeacherCacheConfig, writer_queue: int,
               counters: _Counters, bp=None) -> tuple[float, float]:
    """Compute every unit of ``todo`` and hand it to a background writer; (compute, writer-busy) seconds."""
    compute_seconds, bg = 0.0, cache_store.BackgroundWriter(writer, worker, writer_queue, counters.written)
    try:
        for unit in todo:
            t_c = time.perf_counter()
            hidden, tokens = _compute_unit(tm, data, layout, unit, cfg, counters.fed, bp)
            compute_seconds += time.perf_counter() - t_c
            bg.submit(unit, hidden, tokens)
        bg.close()
        busy, bg = bg.busy_seconds, None
    finally:
        if bg is not None:  # an error in the main thread: let queued units finish, then stop
            try:
                bg.close()
            except BaseException:
                pass
    return compute_seconds, busy


def cache_rollouts(
    teacher: str | TeacherModel,
    rollouts_path: str | Path,
    out_path: str | Path | None = None,
    *,
    cfg: TeacherCacheConfig | None = None,
    shard: tuple[int, int] | str = (0, 1),
    overwrite: bool = False,
    show_progress: bool = True,
    writer_queue: int = 2,
    stats: dict | None = None,
    **settings: Any,
) -> str:
    """Cache the teacher's activations for one complete rollout store; returns the cache path.

    Settings come as a :class:`TeacherCacheConfig` (``cfg``) or as its fields (``settings``), not both.
    With ``shard=(I, N)`` this worker fills units ``u`` with ``u % N == I``; the cache is marked
    complete by whichever worker finds every unit done. A store left by an interrupted worker is
    resumed (only units without a done marker are computed). ``stats`` (a dict) receives timings.
    """
    from oprd_cli.bridge.caching import BridgePass, bridged_config

    cfg = bridged_config(TeacherCacheConfig.resolve(cfg, settings))
    shard_i, shard_n = parse_shard(shard)
    rollouts_path = str(rollouts_path)
    out = str(out_path) if out_path is not None else str(default_out_path(rollouts_path))
    store = open_rollouts(rollouts_path)
    _check_inputs(cfg, store, out, overwrite)
    t_start = time.perf_counter()
    tm, layer_list = _load_teacher(teacher, cfg, store, same_tokenizer=not cfg.bridge)
    bp = BridgePass(cfg.bridge, store, tm, cfg.logprobs) if cfg.bridge else None
    meta, layout = _plan_store(cfg, store, tm, layer_list, bp)
    writer = cache_store.CacheWriter.open(out, meta, layout, overwrite=overwrite)
    recorded_budget = (writer.meta.get("layout") or {}).get("max_batch_tokens")
    if recorded_budget is not None and recorded_budget != cfg.max_batch_tokens:
        err_console.print(f"[yellow]warning:[/] {out} was started with --max-batch-tokens {recorded_budget}; "
                          f"this worker uses {cfg.max_batch_tokens}, so its units may differ from the others' "
                          "in the last bits and the content digest from an uninterrupted run")
    done = writer.done_units()
    mine = [u for u in range(layout.num_units) if u % shard_n == shard_i]
    todo = [layout.unit(u) for u in mine if u not in done]
    already = len(mine) - len(todo)
    if already and todo:
        err_console.print(f"resuming {out}: {already} of this worker's {len(mine)} units already done")
    total_samples = sum(u.sample_stop - u.sample_start for u in todo)
    cpu_loop = time.process_time()
    bar = _progress_bar(show_progress and bool(todo))
    counters = _Counters(bar, total_samples, Path(out).name)
    compute_seconds = writer_busy = 0.0
    if bar is not None:
        bar.start()
    try:
        if todo:
            compute_seconds, writer_busy = _run_units(tm, load_arrays(store), layout, todo, writer, f"{shard_i}/{shard_n}",
                                                      cfg, writer_queue, counters, bp)
    finally:
        if bar is not None:
            bar.stop()
    loop_seconds = time.perf_counter() - counters.t0
    digest = writer.try_finalize()
    if stats is not None:
        stats.update({
            "path": out, "complete": digest is not None, "content_digest": digest, "units_total": layout.num_units,
            "units_computed": len(todo), "units_already_done": already, "samples": total_samples,
            "tokens_fed": counters.tokens, "raw_bytes": counters.raw, "stored_bytes": counters.stored,
            "loop_seconds": loop_seconds, "loop_cpu_seconds": time.process_time() - cpu_loop,
            "compute_seconds": compute_seconds, "writer_busy_seconds": writer_busy,
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
    cfg: TeacherCacheConfig | None = None,
    **settings: Any,
) -> list[dict[str, Any]]:
    """Cache every complete rollout round of ``run_dir`` that has no complete cache, oldest first.

    ``follow`` keeps watching for new rounds (every ``poll_seconds``) until ``max_rounds`` rounds were
    cached by this worker or ``timeout`` seconds have passed. With ``overwrite`` every complete round
    is cached again once (its complete cache replaced), then new rounds as usual. Settings: a
    :class:`TeacherCacheConfig` (``cfg``) or its fields (``settings``). Returns one summary per round worked on.
    """
    run = RunDir(run_dir)
    if not run.root.is_dir():
        raise OprdError(f"run directory {run_dir} does not exist")
    from oprd_cli.bridge.caching import bridged_config

    cfg = bridged_config(TeacherCacheConfig.resolve(cfg, settings))
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
                           cfg=cfg)
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
    objective: str | None = None,
    **flags: Any,
) -> list[dict[str, Any]]:
    """What ``oprd teacher-cache`` runs. ``flags`` are :class:`TeacherCacheConfig` fields; a flag left
    at None takes its value from ``[teacher_cache]`` in ``RUN/oprd.toml`` (run-dir mode), then what
    ``objective`` needs (``--logprobs``/``--topk``, :func:`oprd_cli.loop.cache_defaults`), then the default."""
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
    need = None
    if objective is not None:
        from oprd_cli.loop import cache_defaults

        need = {k: v for k, v in cache_defaults(objective, None).items() if k in ("logprobs", "topk")}
    cfg = merge(TeacherCacheConfig, file_cfg.get("teacher_cache"), defaults=need, **flags)
    teacher = teacher or (file_cfg.get("models") or {}).get("teacher")
    if not teacher:
        raise OprdError("--teacher is required (a hub id or a local folder; or set [models] teacher in oprd.toml)")
    shard_t = parse_shard(shard)
    from oprd_cli.torchrun import dist_env, rank_device

    env = dist_env()
    if env.enabled:  # under torchrun: rank I of N is shard I/N, on its own device
        if shard is None:
            shard_t = (env.rank, env.world_size)
        cfg.device = rank_device(cfg.device, env)
    if run_dir is not None:
        return cache_run_dir(teacher, run_dir, follow=follow, poll_seconds=poll_seconds, max_rounds=max_rounds,
                             timeout=timeout, shard=shard_t, show_progress=show_progress, overwrite=overwrite,
                             cfg=cfg)
    st: dict[str, Any] = {}
    cache_rollouts(teacher, rollouts, out, shard=shard_t, overwrite=overwrite, show_progress=show_progress,
                   stats=st, cfg=cfg)
    summary = _summary(rollouts, st)
    _report(summary)
    return [summary]
