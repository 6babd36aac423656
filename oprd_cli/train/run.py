"""``oprd train``: update the student from cached teacher activations on its own rollouts.

Two ways in (see docs/training.md):

- ``run_train(model=M, cache=C, out=DIR, config=...)``: train on one cache; checkpoints go to
  ``DIR/checkpoints/step-NNNNNN`` and metrics to ``DIR/metrics.jsonl`` (DIR is laid out like a run
  directory); ``resume=True`` continues from DIR's latest checkpoint.
- ``run_train(run_dir=R, config=...)``: continue from the run's latest checkpoint (or the initial
  student: ``--model`` / ``[models] student``) and consume the newest complete cache in ``R/cache``
  that it has not trained on; ``config.run.follow`` keeps waiting for new caches (the decoupled setup).

How many steps one cache gives: one pass (``ceil(samples / batch_size)`` steps) by default;
``epochs`` passes when set; and without ``follow``, further passes until ``max_steps`` (each pass has
its own seeded order, a pure function of seed, pass and cache digest, so a resumed run replays the
same batches). The run remembers, per cache (round name + content digest), how many steps it took
on it, in every checkpoint's marker.

One invocation is a lifecycle (:class:`TrainRun`): ``setup`` (resume point, student, trainer,
checkpointer), ``train`` (caches one after another, chosen by :mod:`oprd_cli.train.selection`),
then the final save by the :class:`~oprd_cli.train.checkpoint.Checkpointer`.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch

from oprd_cli import models as M
from oprd_cli.bridge import training as bridging
from oprd_cli.console import err_console, progress, warn
from oprd_cli.errors import OprdError
from oprd_cli.lock import WriterLock
from oprd_cli.paths import check_output
from oprd_cli.stores.rundir import RunDir
from oprd_cli.train import selection as S
from oprd_cli.train.batches import (
    Needs,
    Prefetcher,
    assemble,
    plan_steps,
    split_micro_batches,
)
from oprd_cli.train.checkpoint import (
    Checkpointer,
    clean_temporaries,
    load_trainer_state,
    read_marker,
    set_rng_state,
)
from oprd_cli.train.config import TrainConfig, TrainResult
from oprd_cli.train import distributed as D
from oprd_cli.train.report import MetricsLog, show_step
from oprd_cli.train.step import NonFiniteLoss, Trainer, auto_checkpointing


def check_arguments(cfg: TrainConfig, cache: str | None, run_dir: str | None, out: str | None) -> None:
    cfg.validate()
    if cache is None and run_dir is None:
        raise OprdError("pass --cache CACHE.zarr (with --out DIR) or --run-dir RUN")
    if cfg.run.follow and (run_dir is None or cache is not None):
        raise OprdError("--follow waits for new caches in a run directory: pass --run-dir RUN without --cache")
    if cache is not None and out is None and run_dir is None:
        raise OprdError("pass --out DIR (where checkpoints and metrics go) with --cache")
    from oprd_cli.urlpath import as_path

    if run_dir is not None and not as_path(run_dir).is_dir():
        raise OprdError(f"run directory {as_path(run_dir)} does not exist" if not as_path(run_dir).exists()
                        else f"run directory {run_dir} is a file, not a folder")
    if out is not None:
        check_output(out, "--out", inputs=[cache])


def autocast_dtype(dtype: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype of ``--dtype`` (None: float32). Autocast is used on GPU only."""
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else None
    resolved = M.resolve_dtype(dtype, device)
    if resolved == torch.float32:
        return None
    if device.type != "cuda":
        warn(f"--dtype {dtype} (autocast) is only used on GPU; training runs in float32 on {device}")
        return None
    return resolved


class TrainRun:
    """One ``oprd train`` invocation: ``setup()``, then ``train(result, bar)``; ``ckpt`` saves."""

    def __init__(self, *, model: str | None, cache: str | None, run_dir: str | None, out: str | None,
                 rollouts: str | None, config: TrainConfig, resume: bool):
        check_arguments(config, cache, run_dir, out)
        self.cfg, self.model_arg, self.cache_arg, self.rollouts, self.resume = config, model, cache, rollouts, resume
        self.source_run = RunDir(Path(run_dir)) if run_dir is not None else None
        self.target = RunDir(Path(out) if out is not None else Path(run_dir))
        self.t_start = time.monotonic()
        self._sources: dict[str, S.Source] = {}  # opened caches by path (complete caches are immutable)
        self._warned_warp = False  # the warped-rollout warning is said once per invocation

    # ------------------------------------------------------------------ setup
    def setup(self) -> None:
        src_run = self.source_run
        if src_run is not None and self.cache_arg is None and not self.cfg.run.follow \
                and not src_run.cache_rounds(complete_only=True):
            raise OprdError(f"no complete teacher cache in {src_run.cache_dir}; make one with "
                            f"`oprd teacher-cache --run-dir {src_run.root}`")
        latest, marker = self._resume_point()
        self.state = S.RunState.from_marker(marker or {})
        self._setup_student(str(latest.path) if latest is not None else self._initial_student())
        self.base_model = marker.get("base_model", self.student_path) if marker is not None else self.student_path
        self.first_source = self.open(self.cache_arg) if self.cache_arg is not None else None
        self._latest = latest.path if latest is not None else None
        self.trainer = self._setup_trainer(marker, load_trainer_state(latest.path) if marker is not None else None)
        self.ckpt = Checkpointer(self.target.checkpoints_dir, self.trainer, self.tokenizer, self.marker_state,
                                 self.state.checkpoint_steps, save_every=self.cfg.checkpoint.save_every,
                                 keep_last=self.cfg.checkpoint.keep_last,
                                 latest=str(latest.path) if latest is not None else None,
                                 saved_step=self.trainer.step if marker is not None else None)
        self.metrics = MetricsLog(self.target.metrics_path)
        self._check_object_storage()
        from oprd_cli.tracking import open_tracker

        self.tracker = open_tracker(self.cfg.run.report_to, self.target.root, name=self.target.root.name,
                                    config=self.cfg.to_flat(), is_main=self.env.is_main)
        if self.env.is_main:
            self.metrics.truncate(self.trainer.step)

    def _check_object_storage(self) -> None:
        """What a run directory on object storage does not support yet, refused in one line."""
        from oprd_cli.urlpath import UrlPath

        if not isinstance(self.target.root, UrlPath):
            return
        if getattr(self.trainer, "sharding", None) is not None:
            raise OprdError(f"{self.target.root}: training under torchrun writes its checkpoints to a local or "
                            "shared folder; use --out on one (a run directory on object storage is for one process)")
        if self.cfg.run.report_to != "none":
            raise OprdError(f"--report-to {self.cfg.run.report_to} writes local files beside metrics.jsonl; with "
                            f"a run directory on object storage ({self.target.root}) use --report-to none")

    def _resume_point(self):
        """The checkpoint this invocation continues from, and its marker (None, None: a fresh start)."""
        clean_temporaries(self.target.checkpoints_dir)
        latest = self.target.latest_checkpoint()
        explicit = self.cache_arg is not None
        if explicit and latest is not None and not self.resume:
            raise OprdError(f"{self.target.checkpoints_dir} already has checkpoints (latest {latest.path.name}); "
                            "pass --resume to continue from it, or choose another --out")
        if explicit and self.resume and latest is None:
            raise OprdError(f"nothing to resume: no complete checkpoint in {self.target.checkpoints_dir}")
        if latest is None or not (self.resume or not explicit):
            return None, None
        if self.model_arg is not None and not self.resume and not S.same_path(self.model_arg, latest.path):
            raise OprdError(f"run {self.target.root} already has checkpoints (latest {latest.path.name}); drop "
                            "--model to continue from it, or start a new run directory")
        return latest, read_marker(latest.path)

    def _initial_student(self) -> str:
        student = self.model_arg
        if student is None and self.source_run is not None:
            from oprd_cli.config import load_run_config

            student = (load_run_config(self.source_run.root).get("models") or {}).get("student")
        if student is None:
            raise OprdError("pass --model (the initial student: a hub id or a save_pretrained folder); it is "
                            "required for the first training of a run")
        S.check_student_path(str(student))
        return str(student)

    def _setup_student(self, path: str) -> None:
        rt = self.cfg.runtime
        self.student_path = path
        self.env, self.device = D.init_distributed(M.resolve_device(rt.device))
        D.quiet_other_ranks(self.env)
        self.autocast = autocast_dtype(rt.dtype, self.device)
        self.tokenizer = M.load_tokenizer(path, rt.trust_remote_code)
        attn = rt.attn_implementation or M.choose_attn_implementation(self.device, torch.float32, training=True)
        self.model = M.load_model(path, self.device, torch.float32, rt.trust_remote_code, attn)
        self.student = S.Student(M.tokenizer_digest(self.tokenizer), M.num_layers(self.model.config),
                                 M.hidden_size(self.model.config))
        self.bridge = bridging.load_for_training(self.cfg.loss.bridge)
        if self.bridge is not None:
            bridging.check_student(self.bridge, self.cfg.loss.bridge, self.student.tokenizer_digest,
                                   self.student.num_layers, self.student.hidden_size)
        self.sharding = None
        if self.env.enabled:  # torchrun: FSDP2 over the ranks
            if rt.checkpointing_mode == "on" or (rt.checkpointing_mode == "auto" and auto_checkpointing(
                    self.model, self.cfg.batching.micro_batch_tokens)):  # auto: from the planned micro-batch
                self.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            self.sharding = D.Sharding(self.env, D.apply_fsdp(self.model), self.device)
            err_console.print(f"training sharded over {self.env.world_size} ranks (FSDP2, "
                              f"{'nccl' if self.device.type == 'cuda' else 'gloo'})")

    def _setup_trainer(self, marker: dict | None, trainer_state: dict | None) -> Trainer:
        """The trainer with the schedule's planned length: --total-steps, else --max-steps, else what the
        run planned before, else (one explicit cache) the steps of this invocation's passes over it."""
        cfg = self.cfg
        total = cfg.optim.total_steps or cfg.run.max_steps or (marker or {}).get("total_steps")
        if total is None and self.first_source is not None:
            total = S.horizon(self.first_source, 0, cfg, 0)
        self._warn_constant_lr = total is None  # said once, when a step is about to be taken
        self.state.layers = self.state.layers or (self.first_source.cache.layers if self.first_source else None)
        trainer = Trainer(self.model, cfg, self.state.layers or [], self.device, total, self.autocast, self.bridge,
                          sharding=self.sharding)
        torch.manual_seed(cfg.batching.seed)
        if trainer_state is not None:
            try:
                trainer.load_state_dict(trainer_state, checkpoint=self._latest)
            except (ValueError, KeyError, RuntimeError) as e:  # another model's optimizer state
                raise OprdError(f"checkpoint {self.student_path}: its trainer state does not fit its model (weights "
                                f"of another architecture or size?): {str(e).splitlines()[0][:120]}") from None
            set_rng_state(trainer_state.get("rng"))
        return trainer

    def marker_state(self) -> dict[str, Any]:
        cfg = self.cfg
        return {"base_model": self.base_model, "student": self.student_path, "total_steps": self.trainer.total_steps,
                **self.state.to_marker(), "objective": cfg.loss.objective, "oprd_form": cfg.loss.oprd_form,
                "mu": cfg.loss.oprd_coef, "tokenizer_digest": self.student.tokenizer_digest,
                "metrics_path": str(self.target.metrics_path), "config": cfg.to_flat()}

    # ------------------------------------------------------------------ caches
    def open(self, cache_path: str) -> S.Source:
        """Open (once) and check a cache; warns once when OPD trains on warped rollouts."""
        cache_path = str(cache_path)
        if cache_path not in self._sources:
            src = S.open_source(cache_path, student=self.student, cfg=self.cfg, layers=self.state.layers,
                                rollouts=self.rollouts, run=self.source_run)
            reasons = S.warped_reasons(src.sampling) if self.cfg.loss.uses_opd else None
            if reasons and not self._warned_warp:
                self._warned_warp = True
                warn(f"rollout store {src.rollout_path} was sampled with {reasons}: --objective "
                     f"{self.cfg.loss.objective} then estimates the reverse KL (and importance ratios) on a warped "
                     "distribution, not the student's own; sample rollouts at temperature 1 without top-k/top-p "
                     "for an unbiased estimate")
            self._sources[cache_path] = src
        return self._sources[cache_path]

    def weights_digest(self) -> str:
        return self.sharding.weights_digest() if self.sharding is not None else M.weights_digest(self.model)

    def staleness(self, src: S.Source) -> int:
        return S.staleness(src, self.weights_digest() if src.policy_digest else "",
                           self.state.checkpoint_steps, self.trainer.step)

    def steps_done(self, src: S.Source) -> int:
        return self.state.steps_done(src, S.per_epoch(src, self.cfg.batching.batch_size))

    def reached_max(self) -> bool:
        return self.cfg.run.max_steps is not None and self.trainer.step >= self.cfg.run.max_steps

    # ------------------------------------------------------------------ training on one cache
    def _plan(self, src: S.Source) -> tuple[list, int, int]:
        """The (pass, rows) of the steps to take on ``src`` now, its steps per pass, the steps done."""
        cfg = self.cfg
        if self.state.layers is None:
            self.state.layers = list(src.cache.layers)
            self.trainer.layers = list(self.state.layers)
        per = S.per_epoch(src, cfg.batching.batch_size)
        start = self.steps_done(src)
        hz = S.horizon(src, start, cfg, self.trainer.step)
        plan = plan_steps(src.cache.num_samples, cfg.batching.batch_size, -(-hz // per), cfg.batching.seed,
                          src.digest, cfg.batching.shuffle)[:hz]
        todo = plan[start:]
        if cfg.run.max_steps is not None:
            todo = todo[:max(0, cfg.run.max_steps - self.trainer.step)]
        return todo, per, start

    def _producer(self, src: S.Source, todo: list):
        """Micro-batches of step ``i`` of ``todo`` (run by the prefetch thread)."""
        b, loss = self.cfg.batching, self.cfg.loss
        needs = Needs(hidden=loss.uses_oprd, teacher_logprobs=loss.objective in ("opd-top1", "opd-plus", "tropd"),
                      support=loss.objective == "opd-topk", teacher_topk=loss.tropd_topk if loss.objective == "tropd"
                      else 0, trust_seed=(int(b.seed), int(src.round or 0)))
        seq_lens = [src.rollout.seq_len(r) for r in range(len(src.rollout))]

        def produce(i: int):
            _, rows = todo[i]
            mine = D.local_rows(rows, self.env)  # under torchrun: this rank's share of the step
            rows, empty = (mine, False) if len(mine) else (rows[:1], True)
            groups = split_micro_batches(rows, [seq_lens[r] for r in rows], b.micro_batch_tokens)
            mbs = [assemble(g, src.rollout, src.cache, needs) for g in groups]
            if self.bridge is not None and needs.hidden:
                for m in mbs:
                    m.teacher_hidden = bridging.teacher_targets(self.bridge, src.cache, m.teacher_hidden)
            mbs = [D.placeholder(m) for m in mbs] if empty else mbs
            return [m.pin_memory() for m in mbs] if self.device.type == "cuda" else mbs

        return produce

    def train_source(self, src: S.Source, result: TrainResult, bar, task) -> int:
        """Train on ``src`` from where this run left it, up to ``horizon`` steps on it (or --max-steps);
        returns the number of steps taken."""
        todo, per, start = self._plan(src)
        if not todo:
            return 0
        if self._warn_constant_lr:
            warn("no planned length for the lr schedule (--total-steps or --max-steps): the lr stays constant")
            self._warn_constant_lr = False
        staleness = self.staleness(src)
        # On-policy only for the first update on a rollout made by exactly these weights; afterwards the
        # student has moved, and opd-top1 uses the behaviour log-probs for a clipped importance ratio.
        fresh = src.policy_digest is not None and start == 0 and src.policy_digest == self.weights_digest()
        prefix = src.rollout.prefix_lengths
        fresh = fresh and (prefix is None or not prefix.any())  # teacher-written tokens are never on-policy
        if bar is not None and task is not None and self.cfg.run.max_steps is None:
            bar.update(task, total=self.trainer.step + len(todo))
        done = start
        self.state.progress = {"cache": src.ref(), "steps_done": done, "steps_per_epoch": per}
        said_epoch = todo[0][0] - 1 if start % per else -1
        with Prefetcher(self._producer(src, todo), len(todo), depth=self.cfg.batching.prefetch) as pf:
            for i, mbs in enumerate(pf):
                epoch = todo[i][0]
                if epoch > 0 and epoch != said_epoch:
                    err_console.print(f"{src.name}: pass {epoch + 1} over its {src.cache.num_samples} samples "
                                      f"({per} steps per pass)")
                said_epoch = epoch
                on_policy = fresh and i == 0
                m = self._step(mbs, on_policy)
                done += 1
                m.update({"objective": self.cfg.loss.objective, "oprd_form": self.cfg.loss.oprd_form,
                          "mu": self.cfg.loss.oprd_coef, "reduction": self.cfg.loss.reduction, "cache": src.store_id,
                          "cache_name": src.name, "cache_path": src.path, "epoch": epoch, "staleness": staleness,
                          "off_policy": 0 if on_policy else 1, "policy_step": src.policy_step,
                          "data_wait_s": pf.wait_s, "time_s": time.monotonic() - self.t_start})
                if self.env.is_main:
                    self.metrics.append(m)
                self.tracker.log(m, m["step"], prefix="train/")
                result.losses.append(float(m["loss"]))
                result.last_metrics = m
                show_step(bar, task, m)
                if self.state.record_step(src, done, per):  # the first pass is complete
                    result.consumed_caches.append(src.name)
                self.ckpt.after_step()
                if self.reached_max():
                    break
        return done - start

    def _step(self, mbs, on_policy: bool) -> dict:
        try:
            return self.trainer.train_step(mbs, on_policy=on_policy)
        except NonFiniteLoss as e:
            raise OprdError(f"{e}. Last good checkpoint: {self.ckpt.last_good() or 'none (no step was taken)'}"
                            " (lower --lr, or check the cache)") from None

    # ------------------------------------------------------------------ the whole invocation
    def train(self, result: TrainResult, bar, task) -> str:
        """Train on the explicit cache, or on the run directory's caches; returns why it stopped."""
        if self.first_source is not None:
            return self._train_explicit(result, bar, task)
        said_waiting, started = False, time.monotonic()
        while True:
            if self.reached_max():
                return "max_steps"
            src = S.next_source(self.state, self._complete_caches, self.open, self.staleness, self.cfg,
                                self.trainer.step)
            if src is None:
                stop = self._nothing_new(result, started, said_waiting)
                if self.sharding is not None:  # every rank stops (or waits) as rank 0 decides
                    stop = D.broadcast(stop)
                if stop:
                    return stop
                said_waiting = True
                continue
            said_waiting = False
            if not self.train_source(src, result, bar, task):  # pragma: no cover - next_source offers work only
                if not self.cfg.run.follow:
                    return "caches_done"
                time.sleep(self.cfg.run.poll_seconds)
                continue
            self.ckpt.save_pending()  # in a run directory every trained cache ends in a checkpoint
            started = time.monotonic()  # --timeout counts waiting time without a new cache
            if not self.cfg.run.follow:
                return "max_steps" if self.reached_max() else "caches_done"
            if self.cfg.run.max_caches is not None and len(result.consumed_caches) >= self.cfg.run.max_caches:
                return "max_caches"

    def _train_explicit(self, result: TrainResult, bar, task) -> str:
        src = self.first_source
        if self.reached_max():
            return "max_steps"
        st = self.staleness(src)
        if self.cfg.run.max_staleness is not None and st > self.cfg.run.max_staleness:
            raise OprdError(f"cache {src.path} is {st} checkpoints behind the student "
                            f"(--max-staleness {self.cfg.run.max_staleness}); nothing to train on")
        done = self.steps_done(src)
        if done >= S.horizon(src, done, self.cfg, self.trainer.step):
            err_console.print(f"nothing to train on: this run already took {done} steps on {src.name} "
                              "(raise --max-steps or --epochs for more passes)")
        self.train_source(src, result, bar, task)
        return "max_steps" if self.reached_max() else "caches_done"

    def _complete_caches(self):
        """The run's complete caches; under torchrun rank 0's view, so every rank picks the same cache."""
        rounds = self.source_run.cache_rounds(complete_only=True)
        return rounds if self.sharding is None else D.broadcast(rounds)

    def _nothing_new(self, result: TrainResult, started: float, said_waiting: bool) -> str | None:
        """No cache to train on now: the reason to stop, or None after waiting one poll (--follow)."""
        run, rcfg = self.source_run, self.cfg.run
        if not rcfg.follow:
            if not result.consumed_caches and not run.cache_rounds(complete_only=True):
                raise OprdError(f"no complete teacher cache in {run.cache_dir}; make one with "
                                f"`oprd teacher-cache --run-dir {run.root}`")
            if not result.consumed_caches:
                err_console.print(f"nothing to train on in {run.root}: every complete cache was already trained "
                                  "on (or skipped)")
            return "caches_done"
        elapsed = time.monotonic() - started
        if rcfg.timeout is not None and elapsed >= rcfg.timeout:
            return "timeout"
        if not said_waiting:
            err_console.print(f"waiting for new caches in {run.cache_dir} (every {rcfg.poll_seconds:g} s)")
        time.sleep(rcfg.poll_seconds if rcfg.timeout is None else max(0.0, min(rcfg.poll_seconds,
                                                                                rcfg.timeout - elapsed)))
        return None


# ----------------------------------------------------------------------------- public API
TRAIN_LOCK = "oprd-train.lock"  # one trainer per run directory (or --out)


def run_train(*, model: str | None = None, cache: str | None = None, run_dir: str | None = None,
              out: str | None = None, rollouts: str | None = None, config: TrainConfig | None = None,
              resume: bool = False, show_progress: bool = True) -> TrainResult:
    """What ``oprd train`` runs (holding the run directory's writer lock). See the module docstring for the
    two modes."""
    run = TrainRun(model=model, cache=cache, run_dir=run_dir, out=out, rollouts=rollouts,
                   config=config or TrainConfig(), resume=resume)
    from oprd_cli.torchrun import dist_env

    if not dist_env().is_main:  # under torchrun, rank 0 holds the run's lock for all ranks
        return _train(run, show_progress)
    with WriterLock(run.target.root / TRAIN_LOCK, "oprd train", f"run directory {run.target.root}"):
        return _train(run, show_progress)


def _train(run: TrainRun, show_progress: bool) -> TrainResult:
    from rich.progress import TextColumn

    run.setup()
    start = run.trainer.step
    result = TrainResult(start_step=start, step=start, checkpoints_dir=str(run.target.checkpoints_dir),
                         metrics_path=str(run.target.metrics_path))
    bar = progress(TextColumn("{task.fields[stats]}")) if show_progress and run.env.is_main else None
    try:
        if bar is not None:
            bar.__enter__()
        task = bar.add_task("train", total=run.cfg.run.max_steps, completed=start, stats="") if bar else None
        result.stopped = run.train(result, bar, task)
    except KeyboardInterrupt:
        if bar is not None:
            bar.__exit__(None, None, None)
            bar = None
        # no save here: the interrupt may have hit the middle of an optimizer update
        err_console.print(f"interrupted at step {run.trainer.step}; newest checkpoint: "
                          f"{run.ckpt.last or 'none'} (--save-every N saves more often)")
        raise
    finally:
        if bar is not None:
            bar.__exit__(None, None, None)
        run.tracker.close()
        result.step = run.trainer.step
        result.seconds = time.monotonic() - run.t_start
        result.skipped_caches = [s["name"] for s in run.state.skipped]
    result.checkpoint = run.ckpt.save_pending()
    result.step = run.trainer.step
    return result
