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
from oprd_cli.demo.jobs import EvalJob, TrainJob, any_job, build_seed_assets, head_readout_job, run_jobs
from oprd_cli.demo.methods import DEFAULT_SEEDS, METHODS, QUICK_SEEDS, Budget, Method, demo_budget
from oprd_cli.demo.report import curve_bands, method_row, print_table, write_plot
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


def _work_dir(root: Path, assets: dict[int, Any], budget: Budget, methods: tuple[Method, ...], resume: bool) -> Path:
    """The runs folder of this (assets, budget, methods); started afresh unless ``resume``."""
    blob = json.dumps({"budget": asdict(budget), "methods": [asdict(m) for m in methods],
                       "assets": {s: a.key for s, a in assets.items()}}, sort_keys=True)
    work = root / "runs" / f"demo-{hashlib.sha256(blob.encode()).hexdigest()[:10]}"
    if work.exists() and not resume:
        shutil.rmtree(work)
    work.mkdir(parents=True, exist_ok=True)
    return work


def _lr_tag(lr: float) -> str:
    return f"lr{lr:g}".replace(".", "p").replace("-", "m")


class _Demo:
    """The demo's state between phases: assets, references, the lr search and the seeds' results."""

    def __init__(self, *, root: Path, seeds: tuple[int, ...], budget: Budget, methods: tuple[Method, ...],
                 quick: bool, spec, workers: int, threads: int, resume: bool):
        self.root, self.seeds, self.budget, self.methods, self.quick = root, seeds, budget, methods, quick
        self.spec, self.workers, self.threads, self.resume = spec, workers, threads, resume
        self.tune = seeds[: max(1, budget.tune_seeds)]
        self.refs: dict[int, dict[str, float]] = {}
        self.search: dict[str, dict[float, float]] = {}
        self.chosen: dict[str, float] = {}
        self.curves: dict[str, dict[int, dict[int, float]]] = {m.name: {} for m in methods}
        self.train_s: dict[str, dict[int, float]] = {m.name: {} for m in methods}
        self.head: dict[int, float] = {}

    def pool(self, fn, jobs, label, on_done=None):
        return run_jobs(fn, jobs, workers=self.workers, threads=self.threads, label=label, on_done=on_done)

    def run_dir(self, seed: int, m: Method, lr: float) -> Path:
        return self.work / f"s{seed}" / m.name / _lr_tag(lr)

    def build(self) -> None:
        jobs = [(self.root / "assets", s, self.quick, self.spec) for s in self.seeds]
        self.assets = dict(zip(self.seeds, self.pool(build_seed_assets, jobs, "assets (SFT per seed)")))
        self.work = _work_dir(self.root, self.assets, self.budget, self.methods, self.resume)

    def references(self) -> None:
        roles = ("teacher", "student") + (("bridge_teacher",) if any(m.bridge for m in self.methods) else ())
        keys = [(s, r) for s in self.seeds for r in roles]
        jobs = [self.eval_job(s, str(getattr(self.assets[s], r)), "eval", self.work / "ref" / f"s{s}-{r}.json")
                for s, r in keys]
        for (s, r), acc in zip(keys, self.pool(any_job, jobs, "reference evals")):
            self.refs.setdefault(s, {})[r] = acc
        for s in self.seeds:
            err_console.print(f"seed {s}: held-out teacher {100 * self.refs[s]['teacher']:.1f}%, student start "
                              f"{100 * self.refs[s]['student']:.1f}%")
            if self.refs[s]["teacher"] <= self.refs[s]["student"]:
                err_console.print(f"[yellow]warning:[/] seed {s}: the teacher is not above the student; its gap "
                                  "closed is undefined")

    def eval_job(self, seed: int, model: str, split: str, report: Path, head_from: str | None = None) -> EvalJob:
        a = self.assets[seed]
        return EvalJob(model=model, split=split, report=str(report), data=str(a.data[split]),
                       max_new_tokens=a.max_new_tokens, budget=self.budget, seed=seed, head_from=head_from)

    def tune_lrs(self) -> None:
        b = self.budget
        keys = [(s, m, lr) for m in self.methods for lr in b.lr_grid for s in self.tune]
        jobs = [TrainJob(method=m, lr=lr, seed=s, run_dir=str(self.run_dir(s, m, lr)), assets=self.assets[s],
                         budget=b, evals=(("val", b.total_steps),)) for s, m, lr in keys]
        vals: dict[tuple[str, float], list[float]] = {}
        for (s, m, lr), res in zip(keys, self.pool(any_job, jobs, f"lr search ({len(b.lr_grid)} rates on val)")):
            vals.setdefault((m.name, lr), []).append(res["acc"]["val"][b.total_steps])
            if len(b.lr_grid) == 1:  # no search: the tuning runs are the seed's runs
                self.train_s[m.name][s] = res["train_seconds"]
        for m in self.methods:
            self.search[m.name] = {lr: sum(vals[m.name, lr]) / len(vals[m.name, lr]) for lr in b.lr_grid}
            best = max(self.search[m.name].values())
            self.chosen[m.name] = min(lr for lr, v in self.search[m.name].items() if v == best)
            err_console.print(f"{m.label}: lr {self.chosen[m.name]:g} (val "
                              + ", ".join(f"{lr:g}: {100 * v:.1f}%" for lr, v in self.search[m.name].items()) + ")")

    def final_runs(self) -> None:
        """Held-out curves at the chosen rates: new runs on the other seeds, evals of the tuning runs."""
        b = self.budget
        steps = [st for st in b.curve_steps() if st > 0]
        jobs: list[Any] = []
        keys: list[tuple[str, int, Method]] = []
        for s in self.seeds:
            for m in self.methods:
                lr, rd = self.chosen[m.name], self.run_dir(s, m, self.chosen[m.name])
                job = TrainJob(method=m, lr=lr, seed=s, run_dir=str(rd), assets=self.assets[s], budget=b,
                               evals=tuple(("eval", st) for st in steps), head_readout=m.name == "oprd")
                if s not in self.tune:
                    jobs.append(job)
                    keys.append(("train", s, m))
                    continue
                for st in steps:
                    ck = rd / "checkpoints" / f"step-{st:06d}"
                    jobs.append(self.eval_job(s, str(ck), "eval", rd / "demo-eval" / f"eval-step-{st}.json"))
                    keys.append((f"eval:{st}", s, m))
                if m.name == "oprd":
                    jobs.append(head_readout_job(job, str(rd / "checkpoints" / f"step-{b.total_steps:06d}"),
                                                 b.total_steps))
                    keys.append(("head", s, m))
        for (kind, s, m), res in zip(keys, self.pool(any_job, jobs, "seeds at the chosen rates")):
            curve = self.curves[m.name].setdefault(s, {0: self.refs[s]["student"]})
            if kind == "train":
                curve.update(res["acc"]["eval"])
                self.train_s[m.name][s] = res["train_seconds"]
                if "eval-teacher-head" in res["acc"]:
                    self.head[s] = res["acc"]["eval-teacher-head"][b.total_steps]
            elif kind == "head":
                self.head[s] = res
            else:
                curve[int(kind.split(":")[1])] = res
        for m in self.methods:  # the tuning seeds' train time: their run at the chosen rate
            for s in self.tune:
                if s not in self.train_s[m.name]:
                    self.train_s[m.name][s] = _train_seconds(self.run_dir(s, m, self.chosen[m.name]))

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
            row["val_by_lr"] = {f"{lr:g}": round(v, 4) for lr, v in self.search[m.name].items()}
            rows.append(row)
        return rows


def _train_seconds(run_dir: Path) -> float | None:
    from oprd_cli.loop import read_log

    trains = [e for e in read_log(run_dir) if e["stage"] == "train"]
    return round(sum(e.get("train_seconds", e["seconds"]) for e in trains), 2) if trains else None


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
    d.build()
    d.references()
    d.tune_lrs()
    d.final_runs()
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
    from oprd_cli.models import machine_info

    from oprd_cli.demo.report import mean_std

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
