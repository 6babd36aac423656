"""``oprd demo``: every method distilled on the embedded task, through the real stages.

1. :func:`oprd_cli.demo.assets.build_assets` builds (or reuses) the task files, the tokenizer, the
   teacher and the student start (an early checkpoint of the teacher's SFT run).
2. The teacher and the student start are evaluated on the held-out ``eval`` split with the eval code
   (:func:`oprd_cli.eval.evaluate_target`).
3. For each method, :func:`oprd_cli.loop.run_loop` runs the same budget (rounds, prompts per round,
   samples per prompt, optimizer steps, one learning-rate rule) from the same student start in its
   own run directory, evaluating every ``eval_every`` rounds on the held-out split.
4. A table (accuracy, share of the student-teacher gap closed, train time, peak memory), a JSON
   summary and a PNG of accuracy against training step.

Nothing is tuned on the held-out split: the budget and the learning rate are fixed below (see
docs/demo.md for how they were chosen, on the ``val`` split).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from oprd_cli.console import console, err_console
from oprd_cli.errors import OprdError
from oprd_cli.io import atomic_target, write_json

DEFAULT_DIR_ENV = "OPRD_DEMO_DIR"


@dataclass(frozen=True)
class Method:
    name: str
    objective: str
    mu: float | None = None
    topk: int = 16

    @property
    def slug(self) -> str:
        return (self.objective + (f"-mu{self.mu:g}" if self.mu else "")).replace(".", "p")


METHODS = (
    Method("OPD top-1", "opd-top1"),
    Method("OPD top-16", "opd-topk", topk=16),
    Method("OPRD", "oprd"),
    Method("OPD top-1 + 1*OPRD", "opd-top1", mu=1.0),
)


@dataclass(frozen=True)
class Budget:
    """What every method gets: the same rounds, prompts, samples, optimizer steps and lr rule.

    The learning rate is one number for every method: the largest of {1e-4, 3e-4, 1e-3} at which no
    method fell below the student start on the ``val`` split (docs/demo.md has the sweep).
    """

    rounds: int = 4
    prompts_per_round: int = 256
    num_samples: int = 2  # per prompt, temperature 1.0 (the paper's rollout setting)
    batch_size: int = 16  # samples per optimizer step (8 prompts x 2 samples, as in the paper)
    lr: float = 3e-4
    warmup_ratio: float = 0.03
    oprd_form: str = "raw"
    eval_every: int = 1  # rounds
    eval_samples: int = 4  # per held-out problem (Avg@n)
    eval_temperature: float = 0.7

    @property
    def steps_per_round(self) -> int:
        return -(-self.prompts_per_round * self.num_samples // self.batch_size)

    @property
    def total_steps(self) -> int:
        return self.rounds * self.steps_per_round


def demo_budget(quick: bool) -> Budget:
    """The default budget, or the quick one (a smoke test of every stage: too short to close much)."""
    if quick:
        return Budget(rounds=2, prompts_per_round=128, eval_samples=1)
    return Budget()


def default_dir() -> Path:
    env = os.environ.get(DEFAULT_DIR_ENV)
    if env:
        return Path(env).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "oprd" / "demo"


@dataclass
class MethodResult:
    name: str
    objective: str
    mu: float
    run_dir: str
    acc: float | None = None
    gap_closed: float | None = None
    train_time_s: float = 0.0
    wall_time_s: float = 0.0
    peak_mem_bytes: int = 0
    steps: int = 0
    curve: list[dict[str, float]] = field(default_factory=list)  # {"step", "acc"}


def _gap(acc: float | None, student: float, teacher: float) -> float | None:
    if acc is None or teacher <= student:
        return None
    return (acc - student) / (teacher - student)


def _eval_model(model: str, label: str, out: Path, data, sampling, template, grader) -> dict[str, Any]:
    """Evaluate a model outside a run (teacher, student start); the report is kept for reuse."""
    from oprd_cli import eval as E

    target = E.EvalTarget(str(model))
    old = E.existing_report(out, target, data, sampling)
    if old is not None:
        return old
    err_console.rule(f"[bold]eval[/] · {label}", style="cyan")
    report = E.evaluate_target(target, data, sampling, template, grader=grader)
    E.write_report(report, out)
    return report


def _work_dir(root: Path, assets, budget: Budget, methods: tuple[Method, ...], eval_split: str, resume: bool) -> Path:
    """The runs folder of this (assets, split, budget, methods); started afresh unless ``resume``."""
    blob = json.dumps({"budget": asdict(budget), "methods": [asdict(m) for m in methods]}, sort_keys=True)
    tag = f"{assets.key}-{eval_split}-b{hashlib.sha256(blob.encode()).hexdigest()[:8]}"
    work = root / "runs" / tag
    if work.exists() and not resume:
        shutil.rmtree(work)
    work.mkdir(parents=True, exist_ok=True)
    return work


def _reference(root: Path, assets, budget: Budget, eval_split: str, data, sampling) -> tuple[float, float]:
    """Held-out accuracy of the teacher and of the starting student (reports kept across runs)."""
    from oprd_cli.eval import Grader

    ref = root / "runs" / f"{assets.key}-reference"  # kept across runs: the models do not change
    tail = f"-n{budget.eval_samples}-t{budget.eval_temperature:g}.json"
    with Grader(integer_answers=True) as grader:
        teacher_rep = _eval_model(str(assets.teacher), "teacher", ref / f"{eval_split}-teacher{tail}", data,
                                  sampling, assets.template, grader)
        student_rep = _eval_model(str(assets.student), "student start", ref / f"{eval_split}-student{tail}", data,
                                  sampling, assets.template, grader)
    teacher_acc = float(teacher_rep["avg_at_n"])
    student_acc = float(student_rep["avg_at_n"])
    err_console.print(f"held-out eval ({len(data.records)} problems, Avg@{budget.eval_samples} at t="
                      f"{budget.eval_temperature}): teacher {100 * teacher_acc:.1f}%, student start "
                      f"{100 * student_acc:.1f}%")
    if teacher_acc <= student_acc:
        err_console.print("[yellow]warning:[/] the teacher is not above the student on the held-out split; "
                          "the gap-closed column is undefined")
    return teacher_acc, student_acc


def _run_method(m: Method, run_dir: Path, assets, budget: Budget, data, sampling, *, seed: int, resume: bool,
                show_progress: bool, student_acc: float, teacher_acc: float) -> MethodResult:
    """One method through :func:`oprd_cli.loop.run_loop` with the demo budget; its curve and costs."""
    from oprd_cli.config import DataConfig, SamplingConfig
    from oprd_cli.loop import EvalSettings, read_log, run_loop
    from oprd_cli.train import TrainConfig

    tcfg = TrainConfig.from_flat(objective=m.objective, mu=m.mu, oprd_form=budget.oprd_form, lr=budget.lr,
                       warmup_ratio=budget.warmup_ratio, batch_size=budget.batch_size,
                       total_steps=budget.total_steps, seed=seed, device="cpu")
    samp = SamplingConfig(num_samples=budget.num_samples, temperature=1.0, max_new_tokens=assets.max_new_tokens,
                          seed=seed, batch_size=256)
    settings = {"positions": "all", "topk": m.topk, "max_batch_tokens": 8192}
    evaluation = EvalSettings(data=data, sampling=sampling, every=budget.eval_every, start=False)
    tm0 = time.monotonic()
    lr = run_loop(run_dir=run_dir, model=str(assets.student), teacher=str(assets.teacher),
                  data=DataConfig(prompts=str(assets.prompts)), sampling=samp, template=assets.template, train=tcfg,
                  rounds=budget.rounds, cache_settings=settings, prompts_per_round=budget.prompts_per_round,
                  evaluation=evaluation, device="cpu", show_progress=show_progress)
    log = read_log(run_dir)
    trains = [e for e in log if e["stage"] == "train"]
    res = MethodResult(name=m.name, objective=m.objective, mu=float(tcfg.loss.oprd_coef), run_dir=str(run_dir))
    res.train_time_s = round(sum(e.get("train_seconds", e["seconds"]) for e in trains), 2)
    res.peak_mem_bytes = int(max((e.get("peak_mem_bytes") or 0 for e in trains), default=0))
    res.wall_time_s = round(sum(e["seconds"] for e in log), 2) if resume else round(time.monotonic() - tm0, 2)
    res.steps = lr.step
    curve = {0: student_acc}
    for rep in sorted((run_dir / "eval").glob("*-step-*.json")):
        r = json.loads(rep.read_text())
        if r.get("step") is not None and r.get("avg_at_n") is not None:
            curve[int(r["step"])] = float(r["avg_at_n"])
    res.curve = [{"step": s, "acc": a} for s, a in sorted(curve.items())]
    res.acc = curve.get(lr.step)
    res.gap_closed = _gap(res.acc, student_acc, teacher_acc)
    err_console.print(f"{m.name}: held-out {100 * (res.acc or 0):.1f}% after {res.steps} steps "
                      f"(train {res.train_time_s:.1f} s)")
    return res


def _summary(*, seed: int, quick: bool, teacher_acc: float, student_acc: float, results: list[MethodResult],
             eval_split: str, data, budget: Budget, assets, threads: int, work: Path) -> dict[str, Any]:
    from oprd_cli.models import machine_info

    return {
        "oprd_demo_version": 1,
        "seed": seed,
        "quick": quick,
        "teacher_acc": teacher_acc,
        "student_acc": student_acc,
        "methods": {r.name: {"acc": r.acc, "gap_closed": r.gap_closed, "train_time_s": r.train_time_s,
                             "peak_mem_bytes": r.peak_mem_bytes, "wall_time_s": r.wall_time_s, "steps": r.steps,
                             "objective": r.objective, "mu": r.mu, "curve": r.curve, "run_dir": r.run_dir}
                    for r in results},
        "eval": {"split": "eval (held out)" if eval_split == "eval" else "val (tuning)", "problems": len(data.records), "n": budget.eval_samples,
                 "temperature": budget.eval_temperature, "max_new_tokens": assets.max_new_tokens,
                 "metric": f"Avg@{budget.eval_samples}"},
        "budget": {**asdict(budget), "steps_per_round": budget.steps_per_round,
                   "total_steps": budget.total_steps},
        "assets": {"dir": str(assets.dir), "key": assets.key, "reused": assets.reused,
                   "teacher_step": assets.teacher_step, "student_step": assets.student_step,
                   "val_accuracy": assets.accuracy, "build_seconds": assets.build_seconds,
                   "task": assets.spec.get("task"), "model": assets.spec.get("model")},
        "machine": {**machine_info("cpu"), "torch_threads": threads},
        "work_dir": str(work),
    }


def run_demo(*, out_dir: str | Path | None = None, quick: bool = False, seed: int = 0, threads: int | None = None,
             json_path: str | None = None, plot_path: str | None = None, resume: bool = False,
             methods: tuple[Method, ...] = METHODS, budget: Budget | None = None, spec=None,
             show_progress: bool = True, eval_split: str = "eval") -> dict[str, Any]:
    """Run the demo; returns the summary (also written to ``json_path`` when given).

    ``eval_split`` is ``eval`` (held out: what the demo reports) or ``val`` (how the budget and the
    learning rate were chosen; see docs/demo.md)."""
    import torch

    from oprd_cli.demo.assets import build_assets, default_threads
    from oprd_cli.eval import eval_sampling, load_eval_data

    t0 = time.monotonic()
    root = Path(out_dir).expanduser() if out_dir else default_dir()
    threads = threads or default_threads()
    if threads < 1:
        raise OprdError(f"--threads must be at least 1, got {threads}")
    budget = budget or demo_budget(quick)
    old_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        err_console.rule(f"[bold]oprd demo[/] {'--quick ' if quick else ''}(seed {seed}, {threads} threads, {root})")
        assets = build_assets(root / "assets", seed=seed, quick=quick, spec=spec, threads=threads,
                              show_progress=show_progress)
        err_console.print(("reusing" if assets.reused else "built") + f" assets {assets.dir} (teacher = SFT step "
                          f"{assets.teacher_step}, student start = step {assets.student_step}; val acc@t1.0 teacher "
                          f"{assets.teacher_accuracy:.2f}, student {assets.student_accuracy:.2f})")
        work = _work_dir(root, assets, budget, methods, eval_split, resume)
        if eval_split not in ("eval", "val"):
            raise OprdError(f"eval_split must be eval or val, got {eval_split!r}")
        data = replace(load_eval_data(bench=f"demo-{eval_split}", data=str(assets.data[eval_split])),
                       integer_answers=True)
        sampling = eval_sampling(None, num_samples=budget.eval_samples, temperature=budget.eval_temperature,
                                 max_new_tokens=assets.max_new_tokens, seed=seed, batch_size=256)
        teacher_acc, student_acc = _reference(root, assets, budget, eval_split, data, sampling)
        results: list[MethodResult] = []
        for i, m in enumerate(methods):
            err_console.rule(f"[bold magenta]method {i + 1}/{len(methods)}: {m.name}[/]", style="magenta")
            results.append(_run_method(m, work / m.slug, assets, budget, data, sampling, seed=seed, resume=resume,
                                       show_progress=show_progress, student_acc=student_acc,
                                       teacher_acc=teacher_acc))
        summary = _summary(seed=seed, quick=quick, teacher_acc=teacher_acc, student_acc=student_acc,
                           results=results, eval_split=eval_split, data=data, budget=budget, assets=assets,
                           threads=threads, work=work)
        png = Path(plot_path) if plot_path else (Path(json_path).with_suffix(".png") if json_path
                                                  else work / "accuracy_vs_step.png")
        write_plot(summary, png)
        summary["plot"] = str(png)
        summary["total_seconds"] = round(time.monotonic() - t0, 1)
        write_json(work / "summary.json", summary, sort_keys=False)
        if json_path:
            write_json(json_path, summary, sort_keys=False)
        return summary
    finally:
        torch.set_num_threads(old_threads)


def write_plot(summary: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=110)
    for name, m in summary["methods"].items():
        xs = [c["step"] for c in m["curve"]]
        ys = [100 * c["acc"] for c in m["curve"]]
        ax.plot(xs, ys, marker="o", ms=3, label=name)
    ax.axhline(100 * summary["teacher_acc"], color="black", ls="--", lw=1, label="teacher")
    ax.axhline(100 * summary["student_acc"], color="gray", ls=":", lw=1, label="student start")
    ax.set_xlabel("training step")
    ax.set_ylabel(f"held-out accuracy, {summary['eval']['metric']} (%)")
    ax.set_title("oprd demo" + (" --quick" if summary["quick"] else "") + f" (seed {summary['seed']})")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    fig.tight_layout()
    with atomic_target(path) as tmp:
        fig.savefig(tmp)
    plt.close(fig)


def _mib(n: int) -> str:
    return f"{n / 2**20:,.0f} MiB" if n else "-"


def print_summary(summary: dict[str, Any]) -> None:
    from rich.table import Table

    ev = summary["eval"]
    t = Table(title=f"oprd demo: held-out {ev['metric']} on {ev['problems']} problems (t={ev['temperature']}), "
                    f"{summary['budget']['total_steps']} steps per method",
              title_justify="left")
    t.add_column("method")
    t.add_column("accuracy", justify="right")
    t.add_column("gap closed", justify="right")
    t.add_column("train time", justify="right")
    t.add_column("peak mem", justify="right")
    t.add_row("teacher", f"{100 * summary['teacher_acc']:.1f}", "", "", "", style="bold")
    t.add_row("student (start)", f"{100 * summary['student_acc']:.1f}", "0%", "", "")
    for name, m in summary["methods"].items():
        acc = "-" if m["acc"] is None else f"{100 * m['acc']:.1f}"
        g = m["gap_closed"]
        gap = "n/a" if g is None else f"{100 * g:.0f}%"
        if g is not None and g <= 0:
            gap = f"[red]{gap}[/]"
        t.add_row(name, acc, gap, f"{m['train_time_s']:.1f} s", _mib(m["peak_mem_bytes"]))
    console.print(t)
    mach = summary["machine"]
    console.print(f"{mach['cpu_cores']}-core CPU ({mach['torch_threads']} torch threads), no GPU; total "
                  f"{summary['total_seconds']:.0f} s (assets {'reused' if summary['assets']['reused'] else 'built'}). "
                  f"Peak mem is the process's peak RSS during a train step (CPU), not a per-method delta.")
    console.print(f"plot {summary['plot']}")


__all__ = ["Budget", "METHODS", "Method", "default_dir", "demo_budget", "print_summary", "run_demo", "write_plot"]
