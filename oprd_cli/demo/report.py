"""The demo's numbers: mean and spread over seeds, the table, the JSON rows and the plot.

Per seed ``s``: accuracy ``a_s`` (held-out Avg@n after the last step) and gap closed
``g_s = (a_s - student_s) / (teacher_s - student_s)`` against that seed's own teacher and student
start (undefined when the teacher is not above the student). A row reports the mean and the sample
standard deviation (``ddof = 1``; 0 with one seed) of both over the seeds.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from oprd_cli.io import atomic_target


def mean_std(xs: Sequence[float | None]) -> tuple[float | None, float | None]:
    """Mean and sample standard deviation of the defined values (None when there are none)."""
    vals = [float(x) for x in xs if x is not None]
    if not vals:
        return None, None
    m = sum(vals) / len(vals)
    if len(vals) < 2:
        return m, 0.0
    return m, math.sqrt(sum((v - m) ** 2 for v in vals) / (len(vals) - 1))


def gap_closed(acc: float | None, student: float, teacher: float) -> float | None:
    if acc is None or teacher <= student:
        return None
    return (acc - student) / (teacher - student)


def _rnd(x: float | None, nd: int = 4) -> float | None:
    return None if x is None else round(x, nd)


def method_row(name: str, label: str, lr: float | None, accs: Mapping[int, float | None],
               refs: Mapping[int, Mapping[str, float]], train_seconds: Sequence[float] = ()) -> dict[str, Any]:
    """One entry of ``methods`` in ``--json``: ``accs[seed]`` is the seed's held-out accuracy."""
    seeds = sorted(accs)
    acc_m, acc_s = mean_std([accs[s] for s in seeds])
    gaps = [gap_closed(accs[s], refs[s]["student"], refs[s]["teacher"]) for s in seeds]
    gap_m, gap_s = mean_std(gaps)
    secs = [t for t in train_seconds if t is not None]
    return {"name": name, "label": label, "lr": lr,
            "accuracy_mean": _rnd(acc_m), "accuracy_std": _rnd(acc_s),
            "gap_closed_mean": _rnd(gap_m), "gap_closed_std": _rnd(gap_s),
            "train_seconds": round(sum(secs) / len(secs), 2) if secs else None,
            "per_seed": [{"seed": s, "accuracy": _rnd(accs[s]), "gap_closed": _rnd(g)} for s, g in zip(seeds, gaps)]}


def curve_bands(curves: Mapping[int, Mapping[int, float]]) -> list[dict[str, float | None]]:
    """``[{"step", "mean", "std"}]`` over seeds (``curves[seed][step]`` held-out accuracy)."""
    steps = sorted({st for c in curves.values() for st in c})
    out = []
    for st in steps:
        m, s = mean_std([c.get(st) for c in curves.values()])
        out.append({"step": st, "mean": _rnd(m), "std": _rnd(s)})
    return out


def _pct(m: float | None, s: float | None) -> str:
    if m is None:
        return "n/a"
    return f"{100 * m:.1f} ± {100 * (s or 0):.1f}"


def print_table(summary: Mapping[str, Any]) -> None:
    from rich.table import Table

    from oprd_cli.console import console

    ev, b = summary["eval"], summary["budget"]
    t = Table(title=f"oprd demo: held-out {ev['metric']} on {ev['problems']} problems (t={ev['temperature']}), "
                    f"{b['total_steps']} steps per method, mean ± std over seeds {summary['seeds']}",
              title_justify="left")
    for col, j in (("method", "left"), ("lr (val)", "right"), ("accuracy %", "right"), ("gap closed %", "right"),
                   ("train s", "right")):
        t.add_column(col, justify=j)  # type: ignore[arg-type]
    for m in summary["methods"]:
        gap = _pct(m["gap_closed_mean"], m["gap_closed_std"])
        if m["gap_closed_mean"] is not None and m["gap_closed_mean"] <= 0:
            gap = f"[red]{gap}[/]"
        t.add_row(m["label"], "" if m["lr"] is None else f"{m['lr']:g}",
                  _pct(m["accuracy_mean"], m["accuracy_std"]), gap,
                  "" if m["train_seconds"] is None else f"{m['train_seconds']:.1f}",
                  style="bold" if m["name"] == "teacher" else None)
    console.print(t)
    head = summary.get("lm_head_cap")
    if head:
        console.print(f"OPRD read out through the teacher's LM head (the ceiling of OPRD alone): "
                      f"{_pct(head['accuracy_mean'], head['accuracy_std'])}% accuracy, "
                      f"{_pct(head['gap_closed_mean'], head['gap_closed_std'])}% of the gap")
    mach = summary["machine"]
    console.print(f"{mach['cpu_cores']}-core CPU, {summary['workers']} worker(s) x {summary['threads']} torch "
                  f"thread(s), no GPU; total {summary['total_seconds']:.0f} s "
                  f"({len(summary['seeds'])} seed(s), lr grid {b['lr_grid']} on val of seed(s) "
                  f"{summary['tune_seeds']}). Plot: {summary.get('plot')}")


def write_plot(summary: Mapping[str, Any], path: Path) -> None:
    """Two panels against training step, mean over seeds with a band of ± one standard deviation:
    the share of the gap closed (each seed against its own teacher and student start), and the held-out
    accuracy."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_gap, ax_acc) = plt.subplots(1, 2, figsize=(12, 5.4), dpi=100)
    refs = {m["name"]: m for m in summary["methods"] if m["name"] in ("teacher", "student")}
    for m in summary["methods"]:
        for ax, key in ((ax_gap, "gap_curve"), (ax_acc, "curve")):
            pts = [c for c in m.get(key) or [] if c["mean"] is not None]
            if not pts:
                continue
            xs = [c["step"] for c in pts]
            ys = [100 * c["mean"] for c in pts]
            sd = [100 * (c["std"] or 0) for c in pts]
            line, = ax.plot(xs, ys, marker="o", ms=3, label=f"{m['label']} (lr {m['lr']:g})")
            ax.fill_between(xs, [y - s for y, s in zip(ys, sd)], [y + s for y, s in zip(ys, sd)],
                            color=line.get_color(), alpha=0.10, lw=0)
    ax_gap.axhline(100, color="black", ls="--", lw=1, label="teacher")
    ax_gap.axhline(0, color="gray", ls=":", lw=1, label="student start")
    if "teacher" in refs:
        ax_acc.axhline(100 * refs["teacher"]["accuracy_mean"], color="black", ls="--", lw=1)
    if "student" in refs:
        ax_acc.axhline(100 * refs["student"]["accuracy_mean"], color="gray", ls=":", lw=1)
    ax_gap.set_ylabel("share of the student-teacher gap closed (%)")
    ax_acc.set_ylabel(f"held-out accuracy, {summary['eval']['metric']} (%)")
    for ax in (ax_gap, ax_acc):
        ax.set_xlabel("training step")
        ax.grid(alpha=0.3)
    handles, labels = ax_gap.get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=5, fontsize=7)
    fig.suptitle("oprd demo" + (" --quick" if summary["quick"] else "") +
                 f": mean ± std over seeds {summary['seeds']}")
    fig.tight_layout(rect=(0, 0.1, 1, 1))
    with atomic_target(path) as tmp:
        fig.savefig(tmp)
    plt.close(fig)


__all__ = ["curve_bands", "gap_closed", "mean_std", "method_row", "print_table", "write_plot"]
