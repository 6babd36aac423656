"""Side-by-side tables of evaluation reports, and a metric-against-step plot for a run's checkpoints.

Rows are models (or checkpoints: ``run step N``), columns benchmarks, cells one metric in percent
(``avg_at_n`` by default), like Table 2 of the OPRD paper. Reports come from
:func:`oprd_cli.eval.write_report`; a folder (e.g. ``RUN/eval``) stands for every report in it.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from oprd_cli.console import console as default_console
from oprd_cli.console import warn
from oprd_cli.errors import OprdError
from oprd_cli.io import atomic_target

METRICS = ("avg_at_n", "best_at_n", "maj_at_n", "dist_4g", "mean_response_tokens", "truncated_fraction")
PERCENT_METRICS = {"avg_at_n", "best_at_n", "maj_at_n", "dist_4g", "truncated_fraction"}


def load_report(path: str | Path) -> dict[str, Any]:
    p = Path(os.path.expanduser(str(path)))
    if not p.is_file():
        raise OprdError(f"report {path} does not exist")
    try:
        report = json.loads(p.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise OprdError(f"{path} is not a JSON report: {e}") from None
    if not isinstance(report, dict) or "bench" not in report or "avg_at_n" not in report:
        raise OprdError(f"{path} is not an oprd eval report (no 'bench' / 'avg_at_n'); pass files written by oprd eval")
    report["_path"] = str(p)
    return report


def load_reports(paths: Sequence[str | Path]) -> list[dict[str, Any]]:
    """Reports from files and folders (every ``*.json`` report directly inside a folder)."""
    if not paths:
        raise OprdError("pass at least one report file (or a folder such as RUN/eval)")
    reports = []
    for path in paths:
        p = Path(os.path.expanduser(str(path)))
        if p.is_dir():
            found = sorted(q for q in p.glob("*.json") if not q.name.startswith("."))
            found = [q for q in found if _looks_like_report(q)]
            if not found:
                raise OprdError(f"no oprd eval reports (*.json) in {path}")
            reports.extend(load_report(q) for q in found)
        else:
            reports.append(load_report(p))
    return reports


def _looks_like_report(p: Path) -> bool:
    try:
        obj = json.loads(p.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError, UnicodeDecodeError):
        return False
    return isinstance(obj, dict) and "bench" in obj and "avg_at_n" in obj


def metric_value(report: Mapping[str, Any], metric: str) -> float | None:
    """``avg_at_n``, ``best_at_n``, ``maj_at_n``, ``dist_4g``, ``mean_response_tokens``,
    ``truncated_fraction`` or ``pass@K``."""
    if metric.startswith("pass@"):
        return (report.get("pass_at_k") or {}).get(metric[5:])
    return report.get(metric)


def check_metric(metric: str) -> str:
    if metric in METRICS or (metric.startswith("pass@") and metric[5:].isdigit()):
        return metric
    raise OprdError(f"unknown metric {metric!r}; use one of {', '.join(METRICS)} or pass@K (e.g. pass@4)")


def row_label(report: Mapping[str, Any]) -> str:
    if report.get("step") is not None:
        run = Path(str(report["run_dir"])).name if report.get("run_dir") else str(report.get("model"))
        return f"{run} step {report['step']}"
    return str(report.get("model"))


@dataclass
class Table:
    metric: str
    rows: list[str]
    columns: list[str]  # benchmarks
    cells: dict[tuple[str, str], float | None]
    mean_column: bool = False
    row_steps: dict[str, int | None] = field(default_factory=dict)

    def value(self, row: str, col: str) -> float | None:
        return self.cells.get((row, col))

    def row_mean(self, row: str) -> float | None:
        vals = [self.cells.get((row, c)) for c in self.columns]
        if any(v is None for v in vals) or not vals:
            return None
        return sum(vals) / len(vals)

    def to_json(self) -> dict[str, Any]:
        out = {"metric": self.metric, "benchmarks": self.columns, "rows": []}
        for r in self.rows:
            entry = {"label": r, "step": self.row_steps.get(r),
                     "values": {c: self.cells.get((r, c)) for c in self.columns}}
            if self.mean_column:
                entry["mean"] = self.row_mean(r)
            out["rows"].append(entry)
        return out


def tabulate_reports(reports: Sequence[Mapping[str, Any]], metric: str = "avg_at_n") -> Table:
    """Rows: models / checkpoints (checkpoints of one run in step order), columns: benchmarks.
    A later report for the same (row, benchmark) replaces an earlier one, with a warning; reports
    graded with different answer extraction (``grading.extract``) are tabulated with a warning."""
    check_metric(metric)
    modes = sorted({str((r.get("grading") or {}).get("extract") or "unrecorded") for r in reports})
    if len(modes) > 1:
        warn(f"the reports extract answers differently ({', '.join(modes)}; see grading.extract), so their "
             "scores are not comparable")
    keyed = [(row_label(r), r) for r in reports]
    # group rows by run (first appearance), checkpoints sorted by step inside a run
    group_order: dict[str, int] = {}
    for label, r in keyed:
        g = str(r.get("run_dir") or r.get("model"))
        group_order.setdefault(g, len(group_order))
    row_keys: dict[str, tuple] = {}
    steps: dict[str, int | None] = {}
    for label, r in keyed:
        if label not in row_keys:
            g = str(r.get("run_dir") or r.get("model"))
            row_keys[label] = (group_order[g], r.get("step") if r.get("step") is not None else -1, len(row_keys))
            steps[label] = r.get("step")
    rows = sorted(row_keys, key=lambda lab: row_keys[lab])
    columns: list[str] = []
    cells: dict[tuple[str, str], float | None] = {}
    for label, r in keyed:
        bench = str(r["bench"])
        if bench not in columns:
            columns.append(bench)
        if (label, bench) in cells:
            warn(f"two reports for {label} on {bench}; using {r.get('_path', 'the later one')}")
        cells[(label, bench)] = metric_value(r, metric)
    return Table(metric, rows, columns, cells, mean_column=len(columns) > 1, row_steps=steps)


def _fmt(metric: str, v: float | None) -> str:
    if v is None:
        return "-"
    return f"{100 * v:.1f}" if (metric in PERCENT_METRICS or metric.startswith("pass@")) else f"{v:.0f}"


def print_table(table: Table, console=None) -> None:
    from rich.table import Table as RichTable

    con = console or default_console
    unit = " (%)" if table.metric in PERCENT_METRICS or table.metric.startswith("pass@") else ""
    t = RichTable(title=f"{table.metric}{unit}", title_justify="left")
    t.add_column("model")
    for c in table.columns:
        t.add_column(c, justify="right")
    if table.mean_column:
        t.add_column("mean", justify="right")
    for r in table.rows:
        cells = [_fmt(table.metric, table.value(r, c)) for c in table.columns]
        if table.mean_column:
            cells.append(_fmt(table.metric, table.row_mean(r)))
        t.add_row(r, *cells)
    con.print(t)


def plot_against_step(reports: Sequence[Mapping[str, Any]], out_png: str | Path, metric: str = "avg_at_n") -> Path | None:
    """PNG of ``metric`` against training step: one line per benchmark (per run and benchmark when
    several runs appear); reports without a step (e.g. the base model, the teacher) become dashed
    horizontal reference lines. Returns None (and writes nothing) when no report has a step."""
    check_metric(metric)
    stepped = [r for r in reports if r.get("step") is not None]
    if not stepped:
        return None
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    scale = 100.0 if (metric in PERCENT_METRICS or metric.startswith("pass@")) else 1.0
    runs = list(dict.fromkeys(str(r.get("run_dir")) for r in stepped))
    series: dict[tuple[str, str], dict[int, float]] = {}
    for r in stepped:
        v = metric_value(r, metric)
        if v is not None:
            series.setdefault((str(r.get("run_dir")), str(r["bench"])), {})[int(r["step"])] = v * scale
    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=120)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    benches = list(dict.fromkeys(b for _, b in series))
    for (run, bench), pts in series.items():
        xs = sorted(pts)
        label = bench if len(runs) == 1 else f"{Path(run).name} {bench}"
        color = colors[benches.index(bench) % len(colors)] if len(runs) == 1 else None
        ax.plot(xs, [pts[x] for x in xs], marker="o", label=label, color=color)
    for r in reports:
        if r.get("step") is None:
            v = metric_value(r, metric)
            if v is not None:
                bench = str(r["bench"])
                color = colors[benches.index(bench) % len(colors)] if bench in benches else "gray"
                ax.axhline(v * scale, linestyle="--", linewidth=1, color=color, alpha=0.7,
                           label=f"{row_label(r)} ({bench})")
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("step")
    n = stepped[0].get("n")
    name = {"avg_at_n": f"Avg@{n}", "best_at_n": f"Best@{n}", "maj_at_n": f"maj@{n}"}.get(metric, metric)
    ax.set_ylabel(name + (" (%)" if scale == 100.0 else ""))
    if len(runs) == 1:
        ax.set_title(Path(runs[0]).name)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    out = Path(os.path.expanduser(str(out_png)))
    try:
        with atomic_target(out) as tmp:
            fig.savefig(tmp, format="png")
    finally:
        plt.close(fig)
    return out


def default_plot_path(reports: Sequence[Mapping[str, Any]], metric: str = "avg_at_n") -> Path:
    """``RUN/eval/<metric>_vs_step.png`` when the stepped reports share one existing run folder,
    else next to the first report."""
    runs = {r.get("run_dir") for r in reports if r.get("step") is not None}
    name = f"{metric.replace('@', '_at_')}_vs_step.png"
    if len(runs) == 1:
        run = next(iter(runs))
        if run and Path(run).is_dir():
            return Path(run) / "eval" / name
    first = reports[0].get("_path")
    return (Path(first).parent if first else Path(".")) / name


def run_report(paths: Sequence[str | Path], metric: str = "avg_at_n", plot: str | Path | None = None,
               no_plot: bool = False, json_output: bool = False, console=None) -> dict[str, Any]:
    """``oprd report``: load, tabulate, print (a rich table, or JSON with ``json_output``) and plot
    when the reports carry steps. Returns ``{"table": ..., "plot": path or None}``."""
    con = console or default_console
    metric = check_metric(metric)
    reports = load_reports(paths)
    table = tabulate_reports(reports, metric)
    png = None
    if not no_plot and any(r.get("step") is not None for r in reports):
        png = plot_against_step(reports, plot or default_plot_path(reports, metric), metric)
    result = {"table": table.to_json(), "plot": str(png) if png else None}
    if json_output:
        con.out(json.dumps(result, indent=2), highlight=False)
    else:
        print_table(table, con)
        if png:
            con.print(f"plot: {png}")
    return result


__all__ = ["METRICS", "Table", "check_metric", "default_plot_path", "load_report", "load_reports", "metric_value",
           "plot_against_step", "print_table", "row_label", "run_report", "tabulate_reports"]
