"""``oprd train``: update the student from cached teacher activations on its own rollouts.

Two ways in (see docs/training.md):

- ``run_train(model=M, cache=C, out=DIR, config=...)``: train on one cache; checkpoints go to
  ``DIR/checkpoints/step-NNNNNN`` and metrics to ``DIR/metrics.jsonl`` (DIR is laid out like a run
  directory); ``resume=True`` continues from DIR's latest checkpoint.
- ``run_train(run_dir=R, config=...)``: continue from the run's latest checkpoint (or the initial
  student: ``--model`` / ``[models] student``) and consume the newest complete cache in ``R/cache``
  that it has not trained on; ``config.follow`` keeps waiting for new caches (the decoupled setup).

How many steps one cache gives: one pass (``ceil(samples / batch_size)`` steps) by default;
``config.epochs`` passes when set; and without ``follow``, further passes until ``config.max_steps``
(each pass has its own seeded order, a pure function of seed, pass and cache digest, so a resumed
run replays the same batches). The run remembers, per cache (round name + content digest), how many
steps it took on it, in every checkpoint's marker.

The demo and ``oprd loop`` call :func:`train_on_cache` (one cache) or :func:`run_train`.
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from oprd_cli import models as M
from oprd_cli.console import err_console, progress, warn
from oprd_cli.errors import OprdError
from oprd_cli.stores import common
from oprd_cli.stores.rundir import STEP_RE, RunDir, round_index
from oprd_cli.train.batches import Needs, Prefetcher, RolloutData, assemble, plan_steps, split_micro_batches
from oprd_cli.train.checkpoint import (
    clean_temporaries,
    load_trainer_state,
    prune_checkpoints,
    read_marker,
    save_checkpoint,
    set_rng_state,
)
from oprd_cli.train.config import TrainConfig, TrainResult
from oprd_cli.train.step import NonFiniteLoss, Trainer


# ----------------------------------------------------------------------------- a validated cache
@dataclass
class Source:
    """A complete cache that fits the student, with its rollout store."""

    path: str
    name: str
    round: int | None
    cache: Any  # TeacherCache
    rollout_path: str
    rollout: RolloutData
    digest: str
    store_id: str
    policy_step: int
    policy_digest: str | None
    record_topk: int

    def ref(self) -> dict[str, Any]:
        return {"name": self.name, "path": self.path, "round": self.round, "content_digest": self.digest,
                "rollout": self.rollout_path, "policy_step": self.policy_step}


def _same_path(a: str | Path, b: str | Path) -> bool:
    try:
        return Path(a).expanduser().resolve() == Path(b).expanduser().resolve()
    except OSError:
        return False


def _same_cache(ref: dict[str, Any], src: "Source") -> bool:
    """A cache is known by its name (the round) and its content digest, so that a run directory can be
    moved, and a round that repeats another's content is still a new round."""
    return ref.get("content_digest") == src.digest and ref.get("name") == src.name


def _check_student_path(model: str) -> None:
    """Refuse a folder that looks like an oprd checkpoint but is not a complete one."""
    p = Path(os.path.expanduser(str(model)))
    if p.is_dir() and STEP_RE.match(p.name) and p.parent.name == "checkpoints":
        read_marker(p)  # raises with a message when the marker is missing


class _Session:
    """State of one ``oprd train`` invocation."""

    def __init__(self, *, model: str | None, cache: str | None, run_dir: str | None, out: str | None,
                 rollouts: str | None, config: TrainConfig, resume: bool, show_progress: bool):
        cfg = config
        cfg.validate()
        if cache is None and run_dir is None:
            raise OprdError("pass --cache CACHE.zarr (with --out DIR) or --run-dir RUN")
        if cfg.follow and (run_dir is None or cache is not None):
            raise OprdError("--follow waits for new caches in a run directory: pass --run-dir RUN without --cache")
        if cache is not None and out is None and run_dir is None:
            raise OprdError("pass --out DIR (where checkpoints and metrics go) with --cache")
        self.cfg = cfg
        self.explicit_cache = cache
        self.rollouts_override = rollouts
        self.source_run = RunDir(Path(run_dir)) if run_dir is not None else None
        self.target = RunDir(Path(out) if out is not None else Path(run_dir))
        self.show_progress = show_progress
        self.t_start = time.monotonic()

        if self.source_run is not None and not self.source_run.root.is_dir():
            raise OprdError(f"run directory {self.source_run.root} does not exist")
        if self.source_run is not None and cache is None and not cfg.follow \
                and not self.source_run.cache_rounds(complete_only=True):
            raise OprdError(f"no complete teacher cache in {self.source_run.cache_dir}; make one with "
                            f"`oprd teacher-cache --run-dir {self.source_run.root}`")
        clean_temporaries(self.target.checkpoints_dir)
        latest = self.target.latest_checkpoint()
        explicit = cache is not None
        if explicit and latest is not None and not resume:
            raise OprdError(f"{self.target.checkpoints_dir} already has checkpoints (latest {latest.path.name}); "
                            "pass --resume to continue from it, or choose another --out")
        if explicit and resume and latest is None:
            raise OprdError(f"nothing to resume: no complete checkpoint in {self.target.checkpoints_dir}")
        self.marker: dict[str, Any] | None = None
        trainer_state = None
        if latest is not None and (resume or not explicit):
            if model is not None and not resume and not _same_path(model, latest.path):
                raise OprdError(
                    f"run {self.target.root} already has checkpoints (latest {latest.path.name}); drop --model to "
                    "continue from it, or start a new run directory")
            self.marker = read_marker(latest.path)
            trainer_state = load_trainer_state(latest.path)
            student = str(latest.path)
            self.base_model = self.marker.get("base_model", student)
        else:
            student = model
            if student is None and self.source_run is not None:
                from oprd_cli.config import load_run_config

                student = (load_run_config(self.source_run.root).get("models") or {}).get("student")
            if student is None:
                raise OprdError("pass --model (the initial student: a hub id or a save_pretrained folder); it is "
                                "required for the first training of a run")
            _check_student_path(str(student))
            self.base_model = str(student)
        self.student_path = str(student)

        # ---- the student
        self.device = M.resolve_device(cfg.device)
        self.autocast = self._autocast_dtype()
        self.tokenizer = M.load_tokenizer(self.student_path, cfg.trust_remote_code)
        self.model = M.load_model(self.student_path, self.device, torch.float32, cfg.trust_remote_code,
                                  cfg.attn_implementation)
        self.n_layers = M.num_layers(self.model.config)
        self.d_model = M.hidden_size(self.model.config)
        self.tok_digest = M.tokenizer_digest(self.tokenizer)

        # ---- run bookkeeping (carried in every checkpoint marker)
        mk = self.marker or {}
        self.consumed: list[dict] = list(mk.get("consumed_caches", []))
        self.skipped: list[dict] = list(mk.get("skipped_caches", []))
        self.progress_state: dict | None = mk.get("progress")
        self.checkpoint_steps: list[int] = list(mk.get("checkpoint_steps", []))
        self.layers: list[int] | None = mk.get("layers")
        self._sources: dict[str, Source] = {}  # validated caches by path (complete caches are immutable)
        self._warned_warp = False  # the warped-rollout warning is said once per invocation

        # ---- the explicit cache is validated before the schedule (its size may define the plan)
        self.first_source: Source | None = None
        if explicit:
            self.first_source = self.validate(cache)

        # the schedule's planned length: --total-steps, else --max-steps, else what the run planned before,
        # else (one explicit cache) the steps of this invocation's passes over it
        total = cfg.total_steps or cfg.max_steps or (mk.get("total_steps") if self.marker else None)
        if total is None and self.first_source is not None:
            total = self.horizon(self.first_source, 0)
        self._warn_constant_lr = total is None  # said once, when a step is about to be taken
        self.layers = self.layers or (self.first_source.cache.layers if self.first_source else None)
        self.trainer = Trainer(self.model, cfg, self.layers or [], self.device, total, self.autocast)
        torch.manual_seed(cfg.seed)
        if trainer_state is not None:
            self.trainer.load_state_dict(trainer_state)
            set_rng_state(trainer_state.get("rng"))
        self.start_step = self.trainer.step
        self.last_checkpoint: str | None = str(latest.path) if latest is not None else None
        self.saved_step = self.trainer.step if latest is not None and (resume or not explicit) else None
        self._truncate_metrics()

    # ------------------------------------------------------------------ helpers
    def _autocast_dtype(self) -> torch.dtype | None:
        dt = self.cfg.dtype
        if dt == "auto":
            return torch.bfloat16 if self.device.type == "cuda" else None
        resolved = M.resolve_dtype(dt, self.device)
        if resolved == torch.float32:
            return None
        if self.device.type != "cuda":
            warn(f"--dtype {dt} (autocast) is only used on GPU; training runs in float32 on {self.device}")
            return None
        return resolved

    def _truncate_metrics(self) -> None:
        """Drop metric lines of steps after the checkpoint we continue from (a crashed run's tail)."""
        path = self.target.metrics_path
        if not path.exists():
            return
        keep, dropped = [], 0
        for line in path.read_text().splitlines():
            try:
                step = int(json.loads(line).get("step", 0))
            except (ValueError, AttributeError):
                continue
            if step <= self.trainer.step:
                keep.append(line)
            else:
                dropped += 1
        if dropped:
            tmp = path.with_name(path.name + f".tmp-{os.getpid()}")
            tmp.write_text("".join(line + "\n" for line in keep))
            os.replace(tmp, path)

    def _locate_rollouts(self, cache_path: str, cache) -> str:
        if self.rollouts_override:
            return str(self.rollouts_override)
        recorded = cache.rollout.get("path")
        if recorded and common.exists(str(recorded)):
            return str(recorded)
        if self.source_run is not None and round_index(cache_path) is not None:
            p = self.source_run.rollout_path_for(cache_path)
            if p.exists():
                return str(p)
        raise OprdError(f"cannot find the rollout store of cache {cache_path} (recorded as {recorded}); "
                        "pass --rollouts PATH")

    def validate(self, cache_path: str) -> Source:
        """Open a cache and its rollouts and check that they fit the student and the objective."""
        cache_path = str(cache_path)
        if cache_path not in self._sources:
            self._sources[cache_path] = self._validate(cache_path)
        return self._sources[cache_path]

    def _validate(self, cache_path: str) -> Source:
        from oprd_cli.stores.cache import open_cache
        from oprd_cli.stores.rollouts import open_rollouts

        cfg = self.cfg
        cache_path = str(cache_path)
        if not common.exists(cache_path):
            raise OprdError(f"no teacher cache at {cache_path}; make one with `oprd teacher-cache`")
        c = open_cache(cache_path)  # refuses an incomplete cache with its own message
        c.typed_meta.check_fits(tokenizer_digest=self.tok_digest, student_layers=self.n_layers,
                                student_width=self.d_model)
        if self.layers is not None and list(self.layers) != list(c.layers) and cfg.uses_oprd:
            raise OprdError(f"cache {cache_path} holds layers {c.layers}, but this run trains on layers "
                            f"{self.layers}; make caches with the same --layers for one run")
        c.typed_meta.check_fits(need_hidden=cfg.uses_oprd, logprobs_for=cfg.objective)
        rpath = self._locate_rollouts(cache_path, c)
        store = open_rollouts(rpath)
        c.typed_meta.check_fits(rollout=store.typed_meta)
        if store.tokenizer_digest != self.tok_digest:
            raise OprdError(f"rollout store {rpath} was sampled with another tokenizer ({store.tokenizer_digest}) "
                            f"than the student's ({self.tok_digest})")
        if cfg.objective == "opd-topk" and not store.record_topk:
            raise OprdError(f"--objective opd-topk needs the student's top-k ids, and rollout store {rpath} has "
                            "none; re-run `oprd rollout --record-topk K`")
        self._warn_warped(rpath, store.meta.get("sampling") or {})
        policy = store.meta.get("policy") or {}
        return Source(path=cache_path, name=Path(cache_path.rstrip("/")).name, round=round_index(cache_path),
                      cache=c, rollout_path=rpath, rollout=RolloutData.load(store), digest=str(c.content_digest),
                      store_id=str(c.content_digest).split(":")[-1][:16], policy_step=int(policy.get("step") or 0),
                      policy_digest=policy.get("weights_digest"), record_topk=store.record_topk)

    def _warn_warped(self, rpath: str, sampling: dict[str, Any]) -> None:
        """Warn once per invocation when an OPD objective (teacher log-probs, importance ratios) trains
        on rollouts sampled from a warped distribution: the reverse-KL estimate then targets that
        distribution, not the student's own."""
        if self._warned_warp or not self.cfg.uses_opd:
            return
        warped = []
        temperature = sampling.get("temperature")
        if temperature is not None and float(temperature) != 1.0:
            warped.append(f"temperature {temperature:g}")
        if int(sampling.get("top_k") or 0) > 0:
            warped.append(f"top_k {int(sampling['top_k'])}")
        top_p = sampling.get("top_p")
        if top_p is not None and float(top_p) < 1.0:
            warped.append(f"top_p {top_p:g}")
        if sampling.get("warped", bool(warped)):  # the rollout store's own verdict when it records one
            self._warned_warp = True
            reasons = ", ".join(warped) or "settings that change the policy's distribution"
            warn(f"rollout store {rpath} was sampled with {reasons}: "
                 f"--objective {self.cfg.objective} "
                 "then estimates the reverse KL (and importance ratios) on a warped distribution, not the "
                 "student's own; sample rollouts at temperature 1 without top-k/top-p for an unbiased estimate")

    def staleness(self, src: Source) -> int:
        """How many checkpoints older than the current student the cache's rollout policy is."""
        if src.policy_digest is not None and src.policy_digest == M.weights_digest(self.model):
            return 0
        return sum(1 for s in self.checkpoint_steps if src.policy_step < s <= self.trainer.step)

    # ------------------------------------------------------------------ run-dir cache selection
    def _seen_round(self) -> int:
        rounds = [c.get("round") for c in self.consumed + self.skipped if c.get("round") is not None]
        return max(rounds) if rounds else 0

    def per_epoch(self, src: Source) -> int:
        """Optimizer steps of one pass over ``src``."""
        return -(-src.cache.num_samples // self.cfg.batch_size)

    def steps_done(self, src: Source) -> int:
        """Optimizer steps this run has already taken on ``src`` (over all passes)."""
        p = self.progress_state
        if p is not None and _same_cache(p["cache"], src):
            return int(p["steps_done"])
        for c in self.consumed:
            if _same_cache(c, src):
                return int(c.get("steps", self.per_epoch(src)))
        return 0

    def horizon(self, src: Source, start: int) -> int:
        """How many steps (counted from the cache's first step) this invocation may take on ``src``:
        ``--epochs E`` passes; or, by default, one pass, extended by further passes up to
        ``--max-steps`` when not following (see ``TrainConfig.epochs``)."""
        cfg = self.cfg
        per = self.per_epoch(src)
        if cfg.epochs is not None:
            return cfg.epochs * per
        if cfg.follow or cfg.max_steps is None:
            return per
        return max(per, start + max(0, cfg.max_steps - self.trainer.step))

    def _current_source(self) -> Source | None:
        """The cache this run trained on last (None when there is none, or it is gone/changed)."""
        p = self.progress_state
        if p is None:
            return None
        path = p["cache"].get("path")
        if path and common.exists(path) and common.is_complete(path):
            src = self.validate(path)
            if src.digest == p["cache"].get("content_digest"):
                return src
        warn(f"the cache this run trained on last ({p['cache'].get('name')}) is gone or changed; moving on")
        self.progress_state = None
        return None

    def next_source(self) -> Source | None:
        """The cache to train on next in run-dir mode (None when there is none yet): the cache this run
        stopped in during its first pass; else the newest complete cache not trained on (older ones are
        skipped, and so are caches beyond --max-staleness); else more passes over the last cache when
        the run asks for them (``horizon``)."""
        assert self.source_run is not None
        cur = self._current_source()
        if cur is not None and self.steps_done(cur) < self.per_epoch(cur):
            return cur
        while True:
            seen = self._seen_round()
            candidates = [(i, p) for i, p in self.source_run.cache_rounds(complete_only=True) if i > seen]
            if not candidates:
                break
            for i, p in candidates[:-1]:
                err_console.print(f"skipping cache {p.name}: a newer cache ({candidates[-1][1].name}) is ready")
                self.skipped.append({"name": p.name, "path": str(p), "round": i, "reason": "newer cache"})
            src = self.validate(str(candidates[-1][1]))
            st = self.staleness(src)
            if self.cfg.max_staleness is not None and st > self.cfg.max_staleness:
                err_console.print(f"skipping cache {src.name}: its rollouts come from step {src.policy_step}, "
                                  f"{st} checkpoints behind the student (--max-staleness {self.cfg.max_staleness})")
                self.skipped.append({**src.ref(), "reason": f"staleness {st}"})
                continue
            return src
        if cur is not None and self.horizon(cur, self.steps_done(cur)) > self.steps_done(cur):
            return cur
        return None

    # ------------------------------------------------------------------ saving
    def marker_state(self) -> dict[str, Any]:
        return {
            "base_model": self.base_model,
            "student": self.student_path,
            "total_steps": self.trainer.total_steps,
            "consumed_caches": self.consumed,
            "skipped_caches": self.skipped,
            "progress": self.progress_state,
            "checkpoint_steps": self.checkpoint_steps,
            "layers": self.layers,
            "objective": self.cfg.objective,
            "oprd_form": self.cfg.oprd_form,
            "mu": self.cfg.oprd_coef,
            "tokenizer_digest": self.tok_digest,
            "metrics_path": str(self.target.metrics_path),
            "config": asdict(self.cfg),
        }

    def save(self) -> str:
        step = self.trainer.step
        if not self.trainer.params_finite():
            raise OprdError(f"step {step}: the weights are no longer finite (NaN/inf) after the update; nothing was "
                            f"saved. Last good checkpoint: {self.last_checkpoint or 'none'} (lower --lr?)")
        if step not in self.checkpoint_steps:
            self.checkpoint_steps.append(step)
        marker = self.marker_state()
        marker["weights_digest"] = M.weights_digest(self.model)
        path = save_checkpoint(self.target.checkpoints_dir, step, self.model, self.tokenizer,
                               self.trainer.state_dict(), marker)
        self.last_checkpoint = str(path)
        self.saved_step = step
        prune_checkpoints(self.target.checkpoints_dir, self.cfg.keep_last, protect=path)
        return str(path)

    # ------------------------------------------------------------------ training on one cache
    def needs(self) -> Needs:
        cfg = self.cfg
        return Needs(hidden=cfg.uses_oprd, teacher_logprobs=cfg.objective == "opd-top1",
                     support=cfg.objective == "opd-topk")

    def reached_max(self) -> bool:
        return self.cfg.max_steps is not None and self.trainer.step >= self.cfg.max_steps

    def train_source(self, src: Source, result: TrainResult, bar, task) -> int:
        """Train on ``src`` from where this run left it, up to ``horizon`` steps on it (or --max-steps);
        returns the number of steps taken."""
        cfg = self.cfg
        if self.layers is None:
            self.layers = list(src.cache.layers)
            self.trainer.layers = list(self.layers)
        per = self.per_epoch(src)
        start = self.steps_done(src)
        hz = self.horizon(src, start)
        plan = plan_steps(src.cache.num_samples, cfg.batch_size, -(-hz // per), cfg.seed, src.digest,
                          cfg.shuffle)[:hz]
        todo = plan[start:]
        if cfg.max_steps is not None:
            todo = todo[:max(0, cfg.max_steps - self.trainer.step)]
        if not todo:
            return 0
        if self._warn_constant_lr:
            warn("no planned length for the lr schedule (--total-steps or --max-steps): the lr stays constant")
            self._warn_constant_lr = False
        staleness = self.staleness(src)
        # On-policy only for the first update on a rollout made by exactly these weights; afterwards the
        # student has moved, and opd-top1 uses the behaviour log-probs for a clipped importance ratio.
        fresh = src.policy_digest is not None and start == 0 and src.policy_digest == M.weights_digest(self.model)
        if bar is not None and task is not None and cfg.max_steps is None:
            bar.update(task, total=self.trainer.step + len(todo))
        needs = self.needs()
        seq_lens = [src.rollout.seq_len(r) for r in range(len(src.rollout))]

        def produce(i: int):
            _, rows = todo[i]
            groups = split_micro_batches(rows, [seq_lens[r] for r in rows], cfg.micro_batch_tokens)
            mbs = [assemble(g, src.rollout, src.cache, needs) for g in groups]
            if self.device.type == "cuda":
                mbs = [m.pin_memory() for m in mbs]
            return mbs

        done = start
        self.progress_state = {"cache": src.ref(), "steps_done": done, "steps_per_epoch": per}
        said_epoch = todo[0][0] - 1 if start % per else -1
        with Prefetcher(produce, len(todo), depth=cfg.prefetch) as pf:
            for i, mbs in enumerate(pf):
                epoch, _ = todo[i]
                if epoch > 0 and epoch != said_epoch:
                    err_console.print(f"{src.name}: pass {epoch + 1} over its {src.cache.num_samples} samples "
                                      f"({per} steps per pass)")
                said_epoch = epoch
                on_policy = fresh and i == 0
                try:
                    m = self.trainer.train_step(mbs, on_policy=on_policy)
                except NonFiniteLoss as e:
                    raise OprdError(f"{e}. Last good checkpoint: {self.save_last_good() or 'none (no step was taken)'}"
                                    " (lower --lr, or check the cache)") from None
                done += 1
                self.progress_state["steps_done"] = done
                m.update({
                    "objective": cfg.objective, "oprd_form": cfg.oprd_form, "mu": cfg.oprd_coef,
                    "reduction": cfg.reduction, "cache": src.store_id, "cache_name": src.name,
                    "cache_path": src.path, "epoch": epoch, "staleness": staleness,
                    "off_policy": 0 if on_policy else 1, "policy_step": src.policy_step,
                    "data_wait_s": pf.wait_s, "time_s": time.monotonic() - self.t_start,
                })
                self.write_metrics(m)
                result.losses.append(float(m["loss"]))
                result.last_metrics = m
                if bar is not None:
                    bar.update(task, completed=self.trainer.step, stats=_live_line(m))
                else:
                    err_console.print(f"step {m['step']}: {_live_line(m)}")
                entry = next((c for c in self.consumed if _same_cache(c, src)), None)
                if entry is not None:
                    entry["steps"] = done
                elif done >= per:  # the first pass is complete: the cache counts as trained on
                    self.consumed.append({**src.ref(), "steps": done})
                    result.consumed_caches.append(src.name)
                if cfg.save_every and self.trainer.step % cfg.save_every == 0:
                    self.save()
                if self.reached_max():
                    break
        return done - start

    def save_last_good(self) -> str | None:
        """After a failed step: save the (finite) state before it when it is not saved yet; returns the
        newest good checkpoint."""
        last = self.saved_step if self.saved_step is not None else self.start_step
        if self.trainer.step != last and self.trainer.params_finite():
            return self.save()
        return self.last_checkpoint

    def write_metrics(self, m: dict[str, Any]) -> None:
        path = self.target.metrics_path
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "a") as f:
            f.write(json.dumps(_jsonable(m), sort_keys=False) + "\n")

    # ------------------------------------------------------------------ the whole invocation
    def run(self) -> TrainResult:
        cfg = self.cfg
        result = TrainResult(start_step=self.start_step, step=self.start_step,
                             checkpoints_dir=str(self.target.checkpoints_dir),
                             metrics_path=str(self.target.metrics_path))
        from rich.progress import TextColumn

        bar_ctx = progress(TextColumn("{task.fields[stats]}")) if self.show_progress else None
        try:
            if bar_ctx is not None:
                bar_ctx.__enter__()
                task = bar_ctx.add_task("train", total=cfg.max_steps, completed=self.trainer.step, stats="")
            else:
                task = None
            result.stopped = self._loop(result, bar_ctx, task)
        except KeyboardInterrupt:
            if bar_ctx is not None:
                bar_ctx.__exit__(None, None, None)
                bar_ctx = None
            # no save here: the interrupt may have hit the middle of an optimizer update
            err_console.print(f"interrupted at step {self.trainer.step}; newest checkpoint: "
                              f"{self.last_checkpoint or 'none'} (--save-every N saves more often)")
            raise
        finally:
            if bar_ctx is not None:
                bar_ctx.__exit__(None, None, None)
            result.step = self.trainer.step
            result.seconds = time.monotonic() - self.t_start
            result.skipped_caches = [s["name"] for s in self.skipped]
        last = self.saved_step if self.saved_step is not None else self.start_step
        if self.trainer.step != last:
            result.checkpoint = self.save()
        else:
            result.checkpoint = self.last_checkpoint
        result.step = self.trainer.step
        return result

    def _loop(self, result: TrainResult, bar, task) -> str:
        cfg = self.cfg
        if self.first_source is not None:  # explicit --cache
            if self.reached_max():
                return "max_steps"
            st = self.staleness(self.first_source)
            if cfg.max_staleness is not None and st > cfg.max_staleness:
                raise OprdError(f"cache {self.first_source.path} is {st} checkpoints behind the student "
                                f"(--max-staleness {cfg.max_staleness}); nothing to train on")
            if self.steps_done(self.first_source) >= self.horizon(self.first_source, self.steps_done(self.first_source)):
                err_console.print(f"nothing to train on: this run already took {self.steps_done(self.first_source)} "
                                  f"steps on {self.first_source.name} (raise --max-steps or --epochs for more passes)")
            self.train_source(self.first_source, result, bar, task)
            return "max_steps" if self.reached_max() else "caches_done"
        said_waiting = False
        started = time.monotonic()
        while True:
            if self.reached_max():
                return "max_steps"
            src = self.next_source()
            if src is None:
                if not cfg.follow:
                    if not result.consumed_caches and not self.source_run.cache_rounds(complete_only=True):
                        raise OprdError(f"no complete teacher cache in {self.source_run.cache_dir}; make one with "
                                        f"`oprd teacher-cache --run-dir {self.source_run.root}`")
                    if not result.consumed_caches:
                        err_console.print(f"nothing to train on in {self.source_run.root}: every complete cache was "
                                          "already trained on (or skipped)")
                    return "caches_done"
                elapsed = time.monotonic() - started
                if cfg.timeout is not None and elapsed >= cfg.timeout:
                    return "timeout"
                if not said_waiting:
                    err_console.print(f"waiting for new caches in {self.source_run.cache_dir} "
                                      f"(every {cfg.poll_seconds:g} s)")
                    said_waiting = True
                wait = cfg.poll_seconds if cfg.timeout is None else max(0.0, min(cfg.poll_seconds, cfg.timeout - elapsed))
                time.sleep(wait)
                continue
            said_waiting = False
            if not self.train_source(src, result, bar, task):  # pragma: no cover - next_source offers work only
                if not cfg.follow:
                    return "caches_done"
                time.sleep(cfg.poll_seconds)
                continue
            if self.saved_step != self.trainer.step:
                # in a run directory every trained cache ends in a checkpoint that the next rollout uses
                self.save()
            started = time.monotonic()  # --timeout counts waiting time without a new cache
            if not cfg.follow:
                return "max_steps" if self.reached_max() else "caches_done"
            if cfg.max_caches is not None and len(result.consumed_caches) >= cfg.max_caches:
                return "max_caches"


def _live_line(m: dict[str, Any]) -> str:
    parts = [f"loss {m['loss']:.4g}"]
    if "rep/cosine_similarity" in m:
        parts.append(f"cos {m['rep/cosine_similarity']:.3f}")
    if "opd/kl" in m:
        parts.append(f"kl {m['opd/kl']:.3g}")
    parts += [f"lr {m['lr']:.1e}", f"gn {m['grad_norm']:.2g}", f"{m['tokens_per_s']:,.0f} tok/s"]
    return " ".join(parts)


def _jsonable(m: dict[str, Any]) -> dict[str, Any]:
    out = {}
    for k, v in m.items():
        if isinstance(v, float) and not math.isfinite(v):
            out[k] = str(v)
        elif isinstance(v, (torch.Tensor,)):
            out[k] = float(v)
        else:
            out[k] = v
    return out


# ----------------------------------------------------------------------------- public API
def run_train(*, model: str | None = None, cache: str | None = None, run_dir: str | None = None,
              out: str | None = None, rollouts: str | None = None, config: TrainConfig | None = None,
              resume: bool = False, show_progress: bool = True) -> TrainResult:
    """What ``oprd train`` runs. See the module docstring for the two modes."""
    session = _Session(model=model, cache=cache, run_dir=run_dir, out=out, rollouts=rollouts,
                       config=config or TrainConfig(), resume=resume, show_progress=show_progress)
    return session.run()


def train_on_cache(student: str, cache_path: str, out_dir: str | None = None, config: TrainConfig | None = None, *,
                   run_dir: str | None = None, resume: bool = False, rollouts: str | None = None,
                   show_progress: bool = True) -> TrainResult:
    """Train ``student`` (hub id or folder; ignored when resuming) on one cache; checkpoints and metrics
    go to ``out_dir`` (laid out as a run directory) or, without it, to ``run_dir``."""
    if out_dir is None and run_dir is None:
        raise OprdError("train_on_cache needs out_dir or run_dir")
    return run_train(model=student, cache=cache_path, run_dir=run_dir, out=out_dir, rollouts=rollouts,
                     config=config, resume=resume, show_progress=show_progress)


def print_result(r: TrainResult) -> None:
    m = r.last_metrics
    if r.steps:
        line = f"[green]trained[/] steps {r.start_step + 1}..{r.step}"
        if m:
            line += f": loss {m.get('loss', float('nan')):.4g}"
            if "rep/cosine_similarity" in m:
                line += f", rep/cosine_similarity {m['rep/cosine_similarity']:.4f}"
            if "opd/kl" in m:
                line += f", opd/kl {m['opd/kl']:.4g}"
        err_console.print(line + f" ({r.seconds:.1f} s)")
    else:
        err_console.print(f"no training step taken (student at step {r.step}; stopped: {r.stopped})")
    if r.checkpoint:
        err_console.print(f"checkpoint {r.checkpoint}")
    err_console.print(f"metrics {r.metrics_path}")
