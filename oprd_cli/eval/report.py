"""One evaluation report: its path, writing it (report JSON + ``<stem>.responses.jsonl``), its summary
and its rich table."""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from oprd_cli.console import console as default_console
from oprd_cli.errors import OprdError
from oprd_cli.io import atomic_write_text

REPORT_VERSION = 1


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("_") or "model"


def default_report_path(bench: str, model: str, run_dir: str | Path | None = None, step: int | None = None,
                        out_dir: str | Path | None = None) -> Path:
    """``RUN/eval/<bench>-step-NNNNNN.json`` for a run's checkpoint, else ``eval/<bench>-<model>.json``."""
    if run_dir is not None and step is not None:
        return Path(out_dir or Path(run_dir) / "eval") / f"{_slug(bench)}-step-{int(step):06d}.json"
    name = Path(str(model)).name if os.path.exists(os.path.expanduser(str(model))) else str(model)
    return Path(out_dir or "eval") / f"{_slug(bench)}-{_slug(name)}.json"


def responses_path_for(report_path: str | Path) -> Path:
    p = Path(report_path)
    stem = p.name.removesuffix(".json")
    return p.with_name(stem + ".responses.jsonl")

def write_report(report: Mapping[str, Any], out_path: str | Path) -> tuple[Path, Path | None]:
    """Write the JSON report (without the per-sample rows) and the per-sample rows to
    ``<stem>.responses.jsonl`` next to it; both atomically, the report last. Existing files are
    replaced. Returns (report path, responses path or None when there are no rows).

    Report schema (v1): ``oprd_report_version``, ``bench``, ``model``, ``run_dir``, ``step``,
    ``data``, ``created``, ``num_problems``, ``num_samples``, ``n``, ``avg_at_n``,
    ``pass_at_k`` ({"1": .., "2": .., ..., str(n): ..}), ``best_at_n``, ``maj_at_n``, ``dist_4g``,
    ``dist_4g_unit``, ``mean_response_tokens``, ``length_unit``, ``truncated_fraction``,
    ``no_answer_fraction``, ``sampling``, ``grading`` {extract, integer_answers, timeout_s, timeouts,
    errors, math_verify_calls, seconds}, ``responses_file``, ``per_problem`` [{index, id, answer, n,
    num_correct, accuracy, best, maj_answer, maj_correct, pass_at_k, no_answer, dist_4g,
    mean_response_tokens, truncated_fraction}].
    """
    out = Path(os.path.expanduser(str(out_path)))
    if out.is_dir():
        raise OprdError(f"{out_path} is a folder; pass a file name like {Path(out_path) / 'report.json'}")
    body = {k: v for k, v in report.items() if k != "samples"}
    samples = report.get("samples")
    rpath = None
    if samples:
        rpath = responses_path_for(out)
        atomic_write_text(rpath, "".join(json.dumps(s, ensure_ascii=False) + "\n" for s in samples))
        body["responses_file"] = rpath.name
    atomic_write_text(out, json.dumps(body, indent=2, ensure_ascii=False) + "\n")
    return out, rpath


def summary(report: Mapping[str, Any]) -> dict[str, Any]:
    """The report without per-sample rows and per-problem entries (for ``--json`` on stdout)."""
    return {k: v for k, v in report.items() if k not in ("samples", "per_problem")}


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.1f}"


def print_report(report: Mapping[str, Any], console=None, per_problem: bool = False) -> None:
    """A rich summary table (percentages), optionally with one row per problem."""
    from rich.table import Table

    con = console or default_console
    n = report.get("n")
    title = f"{report.get('bench')} - {report.get('model')}"
    if report.get("step") is not None:
        title += f" (step {report['step']})"
    t = Table(title=title, title_justify="left")
    t.add_column("metric")
    t.add_column("value", justify="right")
    t.add_row("problems", str(report.get("num_problems")))
    t.add_row("samples", f"{report.get('num_samples')} ({n} per problem)")
    t.add_row(f"Avg@{n}", _pct(report.get("avg_at_n")))
    for k, v in (report.get("pass_at_k") or {}).items():
        t.add_row(f"Pass@{k}", _pct(v))
    t.add_row(f"Best@{n}", _pct(report.get("best_at_n")))
    t.add_row(f"maj@{n}", _pct(report.get("maj_at_n")))
    t.add_row("Dist-4g", _pct(report.get("dist_4g")))
    mrt = report.get("mean_response_tokens")
    unit = report.get("length_unit", "tokens")
    t.add_row(f"mean length ({unit})", "-" if mrt is None else f"{mrt:.0f}")
    t.add_row("truncated", _pct(report.get("truncated_fraction")))
    t.add_row("no answer", _pct(report.get("no_answer_fraction")))
    g = report.get("grading") or {}
    if g.get("extract"):
        t.add_row("answer extraction", str(g["extract"]))
    if g.get("timeouts") or g.get("errors"):
        t.add_row("grader timeouts / errors", f"{g.get('timeouts', 0)} / {g.get('errors', 0)}")
    con.print(t)
    if per_problem and report.get("per_problem"):
        pt = Table(title="per problem", title_justify="left")
        for col, just in (("id", "left"), ("answer", "left"), ("correct", "right"), ("acc", "right"),
                          ("maj", "left"), ("tokens", "right")):
            pt.add_column(col, justify=just)
        for p in report["per_problem"]:
            mrt = p.get("mean_response_tokens")
            pt.add_row(str(p["id"]), str(p["answer"]), f"{p['num_correct']}/{p['n']}", _pct(p["accuracy"]),
                       f"{p.get('maj_answer')} {'ok' if p.get('maj_correct') else 'x'}",
                       "-" if mrt is None else f"{mrt:.0f}")
        con.print(pt)


def headline(report: Mapping[str, Any]) -> str:
    """One line of the main metrics (per checkpoint, with --all-checkpoints)."""
    n = report.get("n")
    mrt = report.get("mean_response_tokens")
    return (f"Avg@{n} {_pct(report.get('avg_at_n'))}  Best@{n} {_pct(report.get('best_at_n'))}  "
            f"maj@{n} {_pct(report.get('maj_at_n'))}  Dist-4g {_pct(report.get('dist_4g'))}  "
            f"mean length {'-' if mrt is None else f'{mrt:.0f}'}  truncated {_pct(report.get('truncated_fraction'))}")
