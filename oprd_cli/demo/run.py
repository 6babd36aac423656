"""``oprd demo``: every method distilled on the embedded task, over several seeds, through the real stages.

1. **Assets**, one set per seed (:func:`oprd_cli.demo.assets.build_assets`): task files, tokenizer, the
   teacher, the student start (an early checkpoint of the teacher's SFT run) and the OPRD-Bridge teacher
   (another width and depth). Each seed rebuilds all of them.
2. **References**: teacher and student start on the held-out ``eval`` split (and the bridge teacher).
3. **Learning rate** (:class:`oprd_cli.demo.methods.Budget`): every method trains at every rate of one
   grid on the first ``tune_seeds`` seeds, and keeps the rate with the best ``val`` accuracy.
4. **Seeds**: every method at its rate from every seed's student start; held-out accuracy at the curve
   steps; OPRD's last checkpoint also read out through the teacher's LM head (the ceiling of OPRD alone).
5. The table (mean ± std over seeds of accuracy and gap closed), ``--json``, and a plot with bands.

Jobs run side by side in worker processes (:mod:`oprd_cli.demo.jobs`); each method and rate trains in
its own run directory through :func:`oprd_cli.loop.run_loop` (rollout -> teacher-cache -> train).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

from oprd_cli.console import err_console
from oprd_cli.demo.jobs import (
    EvalJob,
    JobPool,
    TrainJob,
    any_job,
    build_seed_assets,
    checkpoint_eval_job,
    train_seconds,
)
from oprd_cli.demo.methods import (
    DEFAULT_SEEDS,
    METHODS,
    QUICK_SEEDS,
    Budget,
    Method,
    demo_budget,
)
from oprd_cli.demo.report import (
    curve_bands,
    gap_closed,
    method_row,
    print_table,
    write_plot,
)
from oprd_cli.errors import OprdError
from oprd_cli.io import write_json

DEFAULT_DIR_ENV = "OPRD_DEMO_DIR"
SUMMARY_VERSION = 2


def default_dir() -> Path:
    env = os.environ.get(DEFAULT_DIR_ENV)
    if env:
        return Path(env).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "oprd" / "demo"


def default_workers() -> int:
    """One worker per core (each with one torch thread), at most 8."""
    return max(1, min(8, os.cpu_count() or 1))


def _work_dir(root: Path, seeds, quick: bool, spec, budget: Budget, methods: tuple[Method, ...],
              resume: bool) -> Path:
    """The runs folder of this (seeds' assets, budget, methods); started afresh unless ``resume``."""
    from oprd_cli.demo.assets import assets_name

    blob = json.dumps({"budget": asdict(budget), "methods": [asdict(m) for m in methods],
                       "assets": [assets_name(s, quick, spec) for s in seeds]}, sort_keys=True)
    work = root / "runs" / f"demo-{hashlib.sha256(blob.encode()).hexdigest()[:10]}"
    if work.exists() and not resume:
        shutil.rmtree(work)
    work.mkdir(parents=True, exist_ok=True)
    return work


def _lr_tag(lr: float) -> str:
    return f"lr{lr:g}".replace(".", "p").replace("-", "m")


class _Demo:
    """The demo's jobs and what they found. One :class:`JobPool` runs everything; each finished job
    submits what it unblocks (a seed's assets -> its references and, on a tuning seed, its lr search;
    the whole lr search -> every seed's runs at the chosen rates)."""

    def __init__(self, *, root: Path, seeds: tuple[int, ...], budget: Budget, methods: tuple[Method, ...],
                 quick: bool, spec, workers: int, threads: int, resume: bool):
        self.root, self.seeds, self.budget, self.methods, self.quick = root, seeds, budget, methods, quick
        self.spec, self.resume = spec, resume
        self.pool = JobPool(workers=workers, threads=threads)
        self.workers, self.threads = workers, threads
        self.tune = seeds[: max(1, budget.tune_seeds)]
        self.work = _work_dir(root, seeds, quick, spec, budget, methods, resume)
        self.assets: dict[int, Any] = {}
        self.refs: dict[int, dict[str, float]] = {s: {} for s in seeds}
        self.val: dict[tuple[str, float], dict[int, float]] = {}
        self.search: dict[str, dict[float, float]] = {}
        self.chosen: dict[str, float] = {}
        self.curves: dict[str, dict[int, dict[int, float]]] = {m.name: {s: {} for s in seeds} for m in methods}
        self.train_s: dict[str, dict[int, float]] = {m.name: {} for m in methods}
        self.head: dict[int, float] = {}

    def run(self) -> None:
        for s in self.seeds:  # tuning seeds first: their lr search gates everything after it
            self.pool.submit(build_seed_assets, (self.root / "assets", s, self.quick, self.spec),
                             then=lambda a, s=s: self._on_assets(s, a))
        self.pool.run(f"oprd demo: {len(self.seeds)} seeds x {len(self.methods)} methods")

    def run_dir(self, seed: int, m: Method, lr: float) -> Path:
        return self.work / f"s{seed}" / m.name / _lr_tag(lr)

    def eval_job(self, seed: int, model: str, split: str, report: Path, head_from: str | None = None) -> EvalJob:
        a = self.assets[seed]
        return EvalJob(model=model, split=split, report=str(report), data=str(a.data[split]),
                       max_new_tokens=a.max_new_tokens, budget=self.budget, seed=seed, head_from=head_from)

    # ---- a seed's assets are built: its references, and its lr search (tuning seeds) or its runs
    def _on_assets(self, s: int, a) -> None:
        self.assets[s] = a
        roles = ("teacher", "student") + (("bridge_teacher",) if any(m.bridge for m in self.methods) else ())
        for r in roles:
            self.pool.submit(any_job, self.eval_job(s, str(getattr(a, r)), "eval", self.work / "ref" / f"s{s}-{r}.json"),
                             then=lambda acc, s=s, r=r: self._on_ref(s, r, acc))
        if s in self.tune:
            b = self.budget
            for m in self.methods:
                for lr in b.lr_grid:
                    job = TrainJob(method=m, lr=lr, seed=s, run_dir=str(self.run_dir(s, m, lr)), assets=a, budget=b,
                                   evals=(("val", b.total_steps),))
                    self.pool.submit(any_job, job, then=lambda res, s=s, m=m, lr=lr: self._on_tuned(s, m, lr, res))
        elif self.chosen:
            self._submit_final(s)

    def _on_ref(self, s: int, role: str, acc: float) -> None:
        self.refs[s][role] = acc
        if role == "student":
            for m in self.methods:
                self.curves[m.name][s][0] = acc
        if role in ("teacher", "student") and {"teacher", "student"} <= set(self.refs[s]):
            err_console.print(f"seed {s}: held-out teacher {100 * self.refs[s]['teacher']:.1f}%, student start "
                              f"{100 * self.refs[s]['student']:.1f}%")

    # ---- the lr search
    def _on_tuned(self, s: int, m: Method, lr: float, res: dict[str, Any]) -> None:
        self.val.setdefault((m.name, lr), {})[s] = res["acc"]["val"][self.budget.total_steps]
        if len(self.val) == len(self.methods) * len(self.budget.lr_grid) and \
                all(len(v) == len(self.tune) for v in self.val.values()):
            self._choose()
            for seed in self.assets:
                self._submit_final(seed)

    def _choose(self) -> None:
        for m in self.methods:
            self.search[m.name] = {lr: sum(self.val[m.name, lr].values()) / len(self.tune)
                                   for lr in self.budget.lr_grid}
            best = max(self.search[m.name].values())
            self.chosen[m.name] = min(lr for lr, v in self.search[m.name].items() if v == best)
            err_console.print(f"{m.label}: lr {self.chosen[m.name]:g} (val "
                              + ", ".join(f"{lr:g}: {100 * v:.1f}%" for lr, v in self.search[m.name].items()) + ")")

    # ---- every seed at the chosen rates: held-out curves (and OPRD through the teacher's head)
    def _submit_final(self, s: int) -> None:
        b = self.budget
        steps = [st for st in b.curve_steps() if st > 0]
        for m in self.methods:
            lr, rd = self.chosen[m.name], self.run_dir(s, m, self.chosen[m.name])
            job = TrainJob(method=m, lr=lr, seed=s, run_dir=str(rd), assets=self.assets[s], budget=b,
                           evals=tuple(("eval", st) for st in steps), head_readout=m.name == "oprd")
            if s not in self.tune:
                self.pool.submit(any_job, job, then=lambda res, s=s, m=m: self._on_final(s, m, res))
                continue
            for st in steps:
                self.pool.submit(any_job, checkpoint_eval_job(job, "eval", st),
                                 then=lambda acc, s=s, m=m, st=st: self.curves[m.name][s].update({st: acc}))
            if m.name == "oprd":
                self.pool.submit(any_job, checkpoint_eval_job(job, "eval", b.total_steps, head=True),
                                 then=lambda acc, s=s: self.head.update({s: acc}))
            self.train_s[m.name][s] = train_seconds(rd)

    def _on_final(self, s: int, m: Method, res: dict[str, Any]) -> None:
        self.curves[m.name][s].update(res["acc"]["eval"])
        self.train_s[m.name][s] = res["train_seconds"]
        if "eval-teacher-head" in res["acc"]:
            self.head[s] = res["acc"]["eval-teacher-head"][self.budget.total_steps]

    def rows(self) -> list[dict[str, Any]]:
        last = self.budget.total_steps
        rows = [method_row("teacher", "teacher", None, {s: self.refs[s]["teacher"] for s in self.seeds}, self.refs),
                method_row("student", "student (start)", None, {s: self.refs[s]["student"] for s in self.seeds},
                           self.refs)]
        for m in self.methods:
            curves = self.curves[m.name]
            row = method_row(m.name, m.label, self.chosen[m.name], {s: curves[s].get(last) for s in self.seeds},
                             self.refs, list(self.train_s[m.name].values()))
            row["curve"] = curve_bands(curves)
            row["gap_curve"] = curve_bands({s: {st: gap_closed(a, self.refs[s]["student"], self.refs[s]["teacher"])
                                                for st, a in c.items()} for s, c in curves.items()})
            row["val_by_lr"] = {f"{lr:g}": round(v, 4) for lr, v in self.search[m.name].items()}
            rows.append(row)
        return rows


def run_demo(*, out_dir: str | Path | None = None, quick: bool = False, seeds: tuple[int, ...] | None = None,
             threads: int | None = None, workers: int | None = None, json_path: str | None = None,
             plot_path: str | None = None, resume: bool = False, methods: tuple[Method, ...] = METHODS,
             budget: Budget | None = None, spec=None) -> dict[str, Any]:
    """Run the demo; returns the summary (also written to ``json_path`` when given)."""
    t0 = time.monotonic()
    root = Path(out_dir).expanduser() if out_dir else default_dir()
    seeds = tuple(seeds or (QUICK_SEEDS if quick else DEFAULT_SEEDS))
    if len(set(seeds)) != len(seeds):
        raise OprdError(f"--seeds has repeats: {','.join(map(str, seeds))}")
    workers = workers or default_workers()
    threads = threads or 1
    if threads < 1 or workers < 1:
        raise OprdError(f"--threads and --workers must be at least 1, got {threads} and {workers}")
    budget = budget or demo_budget(quick)
    err_console.rule(f"[bold]oprd demo[/] {'--quick ' if quick else ''}(seeds {','.join(map(str, seeds))}, "
                     f"{workers} workers x {threads} threads, {root})")
    d = _Demo(root=root, seeds=seeds, budget=budget, methods=methods, quick=quick, spec=spec, workers=workers,
              threads=threads, resume=resume)
    d.run()
    for s in seeds:
        if d.refs[s]["teacher"] <= d.refs[s]["student"]:
            err_console.print(f"[yellow]warning:[/] seed {s}: the teacher is not above the student; its gap closed "
                              "is undefined")
    summary = _summary(d, t0)
    png = Path(plot_path) if plot_path else (Path(json_path).with_suffix(".png") if json_path
                                              else d.work / "accuracy_vs_step.png")
    write_plot(summary, png)
    summary["plot"] = str(png)
    summary["total_seconds"] = round(time.monotonic() - t0, 1)
    write_json(d.work / "summary.json", summary, sort_keys=False)
    if json_path:
        write_json(json_path, summary, sort_keys=False)
    return summary


def _summary(d: _Demo, t0: float) -> dict[str, Any]:
    from oprd_cli.demo.report import mean_std
    from oprd_cli.models import machine_info

    a0 = d.assets[d.seeds[0]]
    b = d.budget
    head = None
    if d.head:
        row = method_row("oprd-teacher-head", "OPRD, teacher's head", None, d.head, d.refs)
        head = {k: row[k] for k in ("accuracy_mean", "accuracy_std", "gap_closed_mean", "gap_closed_std",
                                    "per_seed")}
    bt = [d.refs[s].get("bridge_teacher") for s in d.seeds]
    bt_m, bt_s = mean_std(bt)
    return {
        "oprd_demo_version": SUMMARY_VERSION,
        "methods": d.rows(),
        "seeds": list(d.seeds),
        "tune_seeds": list(d.tune),
        "budget": {**asdict(b), "steps_per_round": b.steps_per_round, "total_steps": b.total_steps,
                   "curve_steps": b.curve_steps()},
        "lm_head_cap": head,
        "bridge_teacher": {"accuracy_mean": bt_m, "accuracy_std": bt_s, "dims": a0.spec.get("bridge_model")},
        "quick": d.quick,
        "eval": {"split": "eval (held out)", "problems": _count_lines(a0.data["eval"]), "n": b.eval_samples,
                 "temperature": b.eval_temperature, "max_new_tokens": a0.max_new_tokens,
                 "metric": f"Avg@{b.eval_samples}"},
        "assets": {str(s): {"dir": str(a.dir), "reused": a.reused, "teacher_step": a.teacher_step,
                            "student_step": a.student_step, "build_seconds": a.build_seconds,
                            "val_accuracy": a.accuracy} for s, a in d.assets.items()},
        "machine": machine_info("cpu"),
        "workers": d.workers,
        "threads": d.threads,
        "work_dir": str(d.work),
    }


def _count_lines(path: Path) -> int:
    with open(path) as f:
        return sum(1 for line in f if line.strip())


print_summary = print_table

__all__ = ["default_dir", "default_workers", "print_summary", "run_demo"]
