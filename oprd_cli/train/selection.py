"""Which cache to train on: a cache (and its rollout store) checked against the student and the
objective, its staleness, how many steps it gives, and the choice of the next cache in a run directory.

The run's memory of caches (:class:`RunState`) travels in every checkpoint marker. The functions here
take what they need as arguments (the run state, the complete cache rounds, a way to open a cache);
they load no model and write nothing.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from oprd_cli.console import err_console, warn
from oprd_cli.errors import OprdError
from oprd_cli.stores import common
from oprd_cli.stores.rundir import STEP_RE, RunDir, round_index
from oprd_cli.train.batches import RolloutData
from oprd_cli.train.checkpoint import read_marker
from oprd_cli.train.config import TrainConfig


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
    sampling: dict[str, Any] = field(default_factory=dict)

    def ref(self) -> dict[str, Any]:
        return {"name": self.name, "path": self.path, "round": self.round, "content_digest": self.digest,
                "rollout": self.rollout_path, "policy_step": self.policy_step}


@dataclass
class Student:
    """What a cache must fit: the student's tokenizer, depth and width."""

    tokenizer_digest: str
    num_layers: int
    hidden_size: int


def same_path(a: str | Path, b: str | Path) -> bool:
    from oprd_cli.urlpath import as_path

    try:
        return as_path(a).expanduser().resolve() == as_path(b).expanduser().resolve()
    except OSError:
        return False


def same_cache(ref: dict[str, Any], src: Source) -> bool:
    """A cache is known by its name (the round) and its content digest, so that a run directory can be
    moved, and a round that repeats another's content is still a new round."""
    return ref.get("content_digest") == src.digest and ref.get("name") == src.name


def check_student_path(model: str) -> None:
    """Refuse a folder that looks like an oprd checkpoint but is not a complete one."""
    p = Path(os.path.expanduser(str(model)))
    if p.is_dir() and STEP_RE.match(p.name) and p.parent.name == "checkpoints":
        read_marker(p)  # raises with a message when the marker is missing


# ----------------------------------------------------------------------------- opening a cache
def _check_cache(c, path: str, student: Student, cfg: TrainConfig, layers: list[int] | None) -> None:
    from oprd_cli.bridge import training as bridging

    meta = c.typed_meta
    loss = cfg.loss
    if loss.bridge:  # another depth, width or tokenizer: the bridge decides what fits
        meta.check_fits(tokenizer_digest=student.tokenizer_digest)
        bridging.check_cache(bridging.load_for_training(loss.bridge), loss.bridge, c, loss.objective)
    else:
        bridging.refuse_bridged_cache(c)
        meta.check_fits(tokenizer_digest=student.tokenizer_digest, student_layers=student.num_layers,
                        student_width=student.hidden_size)
    if layers is not None and list(layers) != list(c.layers) and loss.uses_oprd:
        raise OprdError(f"cache {path} holds layers {c.layers}, but this run trains on layers "
                        f"{layers}; make caches with the same --layers for one run")
    meta.check_fits(need_hidden=loss.uses_oprd, logprobs_for=loss.objective, teacher_topk=loss.tropd_topk)


def _check_rollouts(store, c, rpath: str, path: str, student: Student, cfg: TrainConfig) -> None:
    c.typed_meta.check_fits(rollout=store.typed_meta)
    if store.tokenizer_digest != student.tokenizer_digest:
        raise OprdError(f"rollout store {rpath} was sampled with another tokenizer ({store.tokenizer_digest}) "
                        f"than the student's ({student.tokenizer_digest})")
    if cfg.loss.objective == "opd-topk" and not store.record_topk:
        raise OprdError(f"--objective opd-topk needs the student's top-k ids, and rollout store {rpath} has "
                        "none; re-run `oprd rollout --record-topk K`")


def locate_rollouts(cache_path: str, cache, override: str | None, run: RunDir | None) -> str:
    """The rollout store of a cache: ``override``, else the recorded path, else the run's round."""
    if override:
        return str(override)
    recorded = cache.rollout.get("path")
    if recorded and common.exists(str(recorded)):
        # followed only to an absolute path or URL holding a rollout store: never where crafted metadata points
        rp = Path(str(recorded))
        if common.is_local(str(recorded)) and not (rp.is_absolute() and (rp / "zarr.json").is_file()):
            raise OprdError(f"cache {cache_path} records its rollout store as {recorded}, which is not an absolute "
                            "path to a rollout store (a moved or crafted cache?); pass --rollouts PATH")
        return str(recorded)
    if run is not None and round_index(cache_path) is not None:
        p = run.rollout_path_for(cache_path)
        if p.exists():
            return str(p)
    raise OprdError(f"cannot find the rollout store of cache {cache_path} (recorded as {recorded}); "
                    "pass --rollouts PATH")


def open_source(cache_path: str, *, student: Student, cfg: TrainConfig, layers: list[int] | None,
                rollouts: str | None = None, run: RunDir | None = None) -> Source:
    """Open a cache and its rollouts and check that they fit the student and the objective."""
    from oprd_cli.stores.cache import open_cache
    from oprd_cli.stores.rollouts import open_rollouts

    cache_path = str(cache_path)
    if not common.exists(cache_path):
        raise OprdError(f"no teacher cache at {cache_path}; make one with `oprd teacher-cache`")
    c = open_cache(cache_path)  # refuses an incomplete cache with its own message
    _check_cache(c, cache_path, student, cfg, layers)
    rpath = locate_rollouts(cache_path, c, rollouts, run)
    store = open_rollouts(rpath)
    _check_rollouts(store, c, rpath, cache_path, student, cfg)
    policy = store.meta.get("policy") or {}
    return Source(path=cache_path, name=Path(cache_path.rstrip("/")).name, round=round_index(cache_path),
                  cache=c, rollout_path=rpath, rollout=RolloutData.load(store), digest=str(c.content_digest),
                  store_id=str(c.content_digest).split(":")[-1][:16], policy_step=int(policy.get("step") or 0),
                  policy_digest=policy.get("weights_digest"), record_topk=store.record_topk,
                  sampling=dict(store.meta.get("sampling") or {}))


def warped_reasons(sampling: dict[str, Any]) -> str | None:
    """Why a rollout's sampling distribution is not the policy's own (None when it is): the reverse-KL
    estimate and the importance ratios of OPD then target the warped distribution."""
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
        return ", ".join(warped) or "settings that change the policy's distribution"
    return None


# ----------------------------------------------------------------------------- the run's memory of caches
@dataclass
class RunState:
    """Per cache, what this run did with it (carried in every checkpoint marker)."""

    consumed: list[dict] = field(default_factory=list)  # caches whose first pass is complete (+ steps)
    skipped: list[dict] = field(default_factory=list)
    progress: dict | None = None  # {"cache": ref, "steps_done": n, "steps_per_epoch": per}
    checkpoint_steps: list[int] = field(default_factory=list)
    layers: list[int] | None = None

    @classmethod
    def from_marker(cls, mk: dict[str, Any]) -> "RunState":
        return cls(consumed=list(mk.get("consumed_caches", [])), skipped=list(mk.get("skipped_caches", [])),
                   progress=mk.get("progress"), checkpoint_steps=list(mk.get("checkpoint_steps", [])),
                   layers=mk.get("layers"))

    def to_marker(self) -> dict[str, Any]:
        return {"consumed_caches": self.consumed, "skipped_caches": self.skipped, "progress": self.progress,
                "checkpoint_steps": self.checkpoint_steps, "layers": self.layers}

    def seen_round(self) -> int:
        rounds = [c.get("round") for c in self.consumed + self.skipped if c.get("round") is not None]
        return max(rounds) if rounds else 0

    def steps_done(self, src: Source, per: int) -> int:
        """Optimizer steps this run has already taken on ``src`` (over all passes)."""
        p = self.progress
        if p is not None and same_cache(p["cache"], src):
            return int(p["steps_done"])
        for c in self.consumed:
            if same_cache(c, src):
                return int(c.get("steps", per))
        return 0

    def record_step(self, src: Source, done: int, per: int) -> bool:
        """Note ``done`` steps on ``src``; True when this completes its first pass (newly consumed)."""
        self.progress["steps_done"] = done
        entry = next((c for c in self.consumed if same_cache(c, src)), None)
        if entry is not None:
            entry["steps"] = done
        elif done >= per:
            self.consumed.append({**src.ref(), "steps": done})
            return True
        return False


def per_epoch(src: Source, batch_size: int) -> int:
    """Optimizer steps of one pass over ``src``."""
    return -(-src.cache.num_samples // batch_size)


def horizon(src: Source, start: int, cfg: TrainConfig, step: int) -> int:
    """How many steps (counted from the cache's first step) this invocation may take on ``src`` at
    global step ``step``: ``--epochs E`` passes; or, by default, one pass, extended by further passes
    up to ``--max-steps`` when not following (see ``BatchingConfig.epochs``)."""
    per = per_epoch(src, cfg.batching.batch_size)
    if cfg.batching.epochs is not None:
        return cfg.batching.epochs * per
    if cfg.run.follow or cfg.run.max_steps is None:
        return per
    return max(per, start + max(0, cfg.run.max_steps - step))


def staleness(src: Source, weights_digest: str, checkpoint_steps: list[int], step: int) -> int:
    """How many checkpoints older than the current student (``weights_digest`` at ``step``) the cache's
    rollout policy is."""
    if src.policy_digest is not None and src.policy_digest == weights_digest:
        return 0
    return sum(1 for s in checkpoint_steps if src.policy_step < s <= step)


def current_source(state: RunState, open_src: Callable[[str], Source]) -> Source | None:
    """The cache this run trained on last (None when there is none, or it is gone/changed)."""
    p = state.progress
    if p is None:
        return None
    path = p["cache"].get("path")
    if path and common.exists(path) and common.is_complete(path):
        src = open_src(path)
        if src.digest == p["cache"].get("content_digest"):
            return src
    warn(f"the cache this run trained on last ({p['cache'].get('name')}) is gone or changed; moving on")
    state.progress = None
    return None


def next_source(state: RunState, rounds: Callable[[], list[tuple[int, Path]]], open_src: Callable[[str], Source],
                stale: Callable[[Source], int], cfg: TrainConfig, step: int) -> Source | None:
    """The cache to train on next in run-dir mode (None when there is none yet): the cache this run
    stopped in during its first pass; else the newest complete cache not trained on (older ones are
    skipped, and so are caches beyond --max-staleness); else more passes over the last cache when
    the run asks for them (``horizon``). ``rounds()`` lists the complete cache rounds; skips are
    recorded in ``state``."""
    bs = cfg.batching.batch_size
    cur = current_source(state, open_src)
    if cur is not None and state.steps_done(cur, per_epoch(cur, bs)) < per_epoch(cur, bs):
        return cur
    while True:
        candidates = [(i, p) for i, p in rounds() if i > state.seen_round()]
        if not candidates:
            break
        for i, p in candidates[:-1]:
            err_console.print(f"skipping cache {p.name}: a newer cache ({candidates[-1][1].name}) is ready")
            state.skipped.append({"name": p.name, "path": str(p), "round": i, "reason": "newer cache"})
        src = open_src(str(candidates[-1][1]))
        st = stale(src)
        if cfg.run.max_staleness is not None and st > cfg.run.max_staleness:
            err_console.print(f"skipping cache {src.name}: its rollouts come from step {src.policy_step}, "
                              f"{st} checkpoints behind the student (--max-staleness {cfg.run.max_staleness})")
            state.skipped.append({**src.ref(), "reason": f"staleness {st}"})
            continue
        return src
    if cur is not None:
        done = state.steps_done(cur, per_epoch(cur, bs))
        if horizon(cur, done, cfg, step) > done:
            return cur
    return None
