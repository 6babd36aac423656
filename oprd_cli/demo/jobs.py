"""The demo's units of work, and a pool that runs them side by side on the CPU cores.

Every unit is a picklable job handed to a module-level function, so that a pool of spawned worker
processes (one torch thread each: the demo's models are too small for intra-op threads to pay) can
run them; with one worker they run in this process. A job's output folder is its own, so jobs never
share a file:

- :func:`build_seed_assets`: one seed's task files and models (:func:`oprd_cli.demo.assets.build_assets`);
- :func:`train_job`: one method at one learning rate from one seed's student start, through
  :func:`oprd_cli.loop.run_loop` (rollout -> teacher-cache -> train, round by round; OPRD-Bridge first
  fits its bridge on a rollout of the student start), then the evaluations it was asked for;
- :func:`eval_job`: one model on one split (a checkpoint, or a checkpoint read out through the teacher's
  LM head: :func:`with_teacher_head`).

Evaluation reports are kept beside the runs (JSON, the ``oprd eval`` report format) and reused when
the same question is asked again (``--resume``).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from oprd_cli.demo.methods import Budget, Method


@dataclass(frozen=True)
class EvalJob:
    model: str  # a save_pretrained folder
    split: str  # val | eval
    report: str  # where the report JSON goes (reused when it answers the same question)
    data: str  # the split's jsonl
    max_new_tokens: int
    budget: Budget
    seed: int
    head_from: str | None = None  # read out through this model's LM head (a folder made beside ``report``)


@dataclass(frozen=True)
class TrainJob:
    method: Method
    lr: float
    seed: int
    run_dir: str
    assets: Any  # DemoAssets of this seed
    budget: Budget
    evals: tuple[tuple[str, int], ...] = ()  # (split, step) evaluated once training is done
    head_readout: bool = False  # also the last checkpoint on ``eval`` through the teacher's LM head


def build_seed_assets(args: tuple) -> Any:
    """(root, seed, quick, spec) -> DemoAssets."""
    import torch

    from oprd_cli.demo.assets import build_assets

    root, seed, quick, spec = args
    # the worker's thread count (build_assets would otherwise take up to 4: oversubscribed cores stall OpenMP)
    return build_assets(root, seed=seed, quick=quick, spec=spec, threads=torch.get_num_threads(),
                        show_progress=False)


def _sampling(budget: Budget, max_new_tokens: int, seed: int):
    from oprd_cli.eval import eval_sampling

    return eval_sampling(None, num_samples=budget.eval_samples, temperature=budget.eval_temperature,
                         max_new_tokens=max_new_tokens, seed=seed, batch_size=256)


def with_teacher_head(model: str, teacher: str, out: Path) -> Path:
    """``out``: ``model`` with its LM head replaced by ``teacher``'s (same vocabulary and width).

    The readout OPRD alone cannot change: OPRD supervises hidden states, never the student's LM head,
    so the trained student read out through the teacher's head is the ceiling of OPRD's body."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from oprd_cli.errors import OprdError

    student = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32)
    head = AutoModelForCausalLM.from_pretrained(teacher, dtype=torch.float32).get_output_embeddings().weight
    mine = student.get_output_embeddings().weight
    if mine.shape != head.shape:
        raise OprdError(f"cannot read {model} out through {teacher}'s LM head: shapes {tuple(mine.shape)} and "
                        f"{tuple(head.shape)} differ")
    if student.config.tie_word_embeddings:
        raise OprdError(f"{model} ties its LM head to its embeddings; a head swap would change its input too")
    with torch.no_grad():
        mine.copy_(head)
    student.save_pretrained(out)
    AutoTokenizer.from_pretrained(model).save_pretrained(out)
    return out


def eval_job(job: EvalJob) -> float:
    """Avg@n of ``job.model`` on ``job.split`` (the report is written to, or reused from, ``job.report``)."""
    from oprd_cli import eval as E
    from oprd_cli.demo.task import demo_template

    model = job.model
    if job.head_from:
        head_dir = Path(job.report).parent / (Path(job.report).stem + "-model")
        if not (head_dir / "config.json").exists():
            with_teacher_head(job.model, job.head_from, head_dir)
        model = str(head_dir)
    data = replace(E.load_eval_data(bench=f"demo-{job.split}", data=job.data), integer_answers=True)
    sampling = _sampling(job.budget, job.max_new_tokens, job.seed)
    target = E.EvalTarget(model)
    old = E.existing_report(job.report, target, data, sampling)
    if old is not None:
        return float(old["avg_at_n"])
    with E.Grader(integer_answers=True) as grader:
        report = E.evaluate_target(target, data, sampling, demo_template(), grader=grader, device="cpu",
                                   show_progress=False)
    E.write_report(report, job.report)
    return float(report["avg_at_n"])


def _fit_bridge(job: TrainJob, run_dir: Path) -> str:
    """OPRD-Bridge's stage 1 on a rollout of the student start (kept in ``run_dir/bridge-fit``)."""
    from oprd_cli.bridge.command import run_bridge_fit
    from oprd_cli.config import DataConfig, SamplingConfig
    from oprd_cli.demo.task import demo_template
    from oprd_cli.rollout import run_rollout

    a, b = job.assets, job.budget
    out = run_dir / "bridge"
    if (out / "bridge.json").exists():
        return str(out)
    store = run_dir / "bridge-fit" / "rollouts.zarr"
    if not store.exists():
        run_rollout(model=str(a.student), data=DataConfig(prompts=str(a.prompts), limit=b.prompts_per_round),
                    sampling=SamplingConfig(num_samples=b.num_samples, temperature=1.0, max_new_tokens=a.max_new_tokens,
                                            seed=job.seed + 10_007, batch_size=256),
                    template=demo_template(), out=str(store), device="cpu")
    run_bridge_fit(student=str(a.student), teacher=str(a.bridge_teacher), rollouts=str(store), rank=b.bridge_rank,
                   out=str(out), seed=job.seed, device="cpu", overwrite=True, show_progress=False)
    return str(out)


def train_job(job: TrainJob) -> dict[str, Any]:
    """Train ``job.method`` at ``job.lr`` (resuming what its run directory holds), then evaluate."""
    from oprd_cli.config import DataConfig, SamplingConfig
    from oprd_cli.demo.task import demo_template
    from oprd_cli.loop import run_loop
    from oprd_cli.stores.rundir import RunDir
    from oprd_cli.train import TrainConfig

    m, a, b = job.method, job.assets, job.budget
    run_dir = Path(job.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    bridge = _fit_bridge(job, run_dir) if m.bridge else None
    teacher = str(a.bridge_teacher if m.bridge else a.teacher)
    tcfg = TrainConfig.from_flat(**m.train_settings(), oprd_form=b.oprd_form, lr=job.lr,
                                 warmup_ratio=b.warmup_ratio, batch_size=b.batch_size, total_steps=b.total_steps,
                                 seed=job.seed, device="cpu", bridge=bridge)
    samp = SamplingConfig(num_samples=b.num_samples, temperature=1.0, max_new_tokens=a.max_new_tokens,
                          seed=job.seed, batch_size=256)
    settings = {"positions": "all", "max_batch_tokens": 8192, **({"topk": m.topk} if m.topk else {})}
    guidance = {"schedule": "cosine"} if m.guidance else None
    run_loop(run_dir=run_dir, model=str(a.student), teacher=teacher, data=DataConfig(prompts=str(a.prompts)),
             sampling=samp, template=demo_template(), train=tcfg, rounds=b.rounds, cache_settings=settings,
             prompts_per_round=b.prompts_per_round, device="cpu", show_progress=False, guidance=guidance)
    accs: dict[str, dict[int, float]] = {}
    for split, step in job.evals:
        accs.setdefault(split, {})[step] = eval_job(checkpoint_eval_job(job, split, step))
    last = RunDir(run_dir).latest_checkpoint()
    if job.head_readout and last is not None:
        accs["eval-teacher-head"] = {last.step: eval_job(checkpoint_eval_job(job, "eval", last.step, head=True))}
    return {"train_seconds": train_seconds(run_dir), "steps": last.step if last else 0,
            "checkpoint": str(last.path) if last else None, "acc": accs}


def train_seconds(run_dir: str | Path) -> float | None:
    """Time in the loop's ``train`` stages of a run (None before any)."""
    from oprd_cli.loop import read_log

    trains = [e for e in read_log(Path(run_dir)) if e["stage"] == "train"]
    return round(sum(e.get("train_seconds", e["seconds"]) for e in trains), 2) if trains else None


def checkpoint_eval_job(job: TrainJob, split: str, step: int, head: bool = False) -> EvalJob:
    """The evaluation of ``job``'s checkpoint at ``step`` on ``split`` (``head``: read out through the
    same-width teacher's LM head); its report goes to ``RUN/demo-eval/``."""
    from oprd_cli.stores.rundir import checkpoint_name

    a, run_dir = job.assets, Path(job.run_dir)
    name = f"{split}-teacher-head" if head else split
    return EvalJob(model=str(run_dir / "checkpoints" / checkpoint_name(step)), split=split,
                   report=str(run_dir / "demo-eval" / f"{name}-step-{step}.json"), data=str(a.data[split]),
                   max_new_tokens=a.max_new_tokens, budget=job.budget, seed=job.seed,
                   head_from=str(a.teacher) if head else None)


def any_job(job: TrainJob | EvalJob) -> Any:
    """One pool, two kinds of job."""
    return train_job(job) if isinstance(job, TrainJob) else eval_job(job)


# ------------------------------------------------------------------ the pool
def _init_worker(threads: int) -> None:
    import warnings

    import torch

    from oprd_cli.console import err_console

    torch.set_num_threads(threads)
    err_console.quiet = True  # the parent shows one progress bar over the jobs
    warnings.filterwarnings("ignore", category=FutureWarning)  # transformers' deprecation notes, once per stage


class JobPool:
    """Jobs on ``workers`` spawned processes of ``threads`` torch threads each (in this process when
    ``workers`` is 1), behind one rich progress bar. A job's ``then(result)`` runs here when it is done
    and may submit further jobs, so that a phase starts as soon as what it needs exists (no worker waits
    for a whole phase to end). The first error stops the rest and is raised by :meth:`run`."""

    def __init__(self, *, workers: int, threads: int):
        self.workers, self.threads = workers, threads
        self._queue: list[tuple[Callable, Any, Callable | None]] = []
        self._submitted = 0

    def submit(self, fn: Callable[[Any], Any], job: Any, then: Callable[[Any], None] | None = None) -> None:
        self._queue.append((fn, job, then))
        self._submitted += 1

    def run(self, label: str) -> None:
        from oprd_cli.console import err_console, progress

        t0 = time.monotonic()
        with progress() as bar:
            task = bar.add_task(label, total=self._submitted)
            tick = lambda: bar.update(task, advance=1, total=self._submitted)
            if self.workers <= 1:
                self._run_here(bar, tick)
            else:
                self._run_pool(tick)
        err_console.print(f"{label}: {self._submitted} jobs in {time.monotonic() - t0:.0f} s")

    def _run_here(self, bar, tick) -> None:
        import torch

        from oprd_cli.console import err_console

        old_threads = torch.get_num_threads()
        old_quiet = err_console.quiet
        _init_worker(self.threads)
        err_console.quiet = old_quiet  # in this process the stages' own bars show
        bar.stop()
        try:
            while self._queue:
                fn, job, then = self._queue.pop(0)
                result = fn(job)
                if then:
                    then(result)
                tick()
        finally:
            torch.set_num_threads(old_threads)

    def _run_pool(self, tick) -> None:
        import multiprocessing as mp
        from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait

        with ProcessPoolExecutor(max_workers=self.workers, mp_context=mp.get_context("spawn"),
                                 initializer=_init_worker, initargs=(self.threads,)) as pool:
            running: dict[Any, Callable | None] = {}
            while self._queue or running:
                while self._queue:
                    fn, job, then = self._queue.pop(0)
                    running[pool.submit(fn, job)] = then
                done, _ = wait(running, return_when=FIRST_COMPLETED)
                for f in done:
                    then = running.pop(f)
                    if f.exception() is not None:
                        for other in running:
                            other.cancel()
                        raise f.exception()  # type: ignore[misc]
                    if then:
                        then(f.result())
                    tick()


__all__ = [
    "EvalJob",
    "JobPool",
    "TrainJob",
    "any_job",
    "build_seed_assets",
    "checkpoint_eval_job",
    "eval_job",
    "train_job",
    "train_seconds",
    "with_teacher_head",
]
