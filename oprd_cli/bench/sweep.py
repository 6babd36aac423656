"""``oprd bench sweep``: how the actor update's cost grows with the response length T.

``oprd bench loss`` (one fresh process per objective and length) at each ``--seq-lens`` value for the
chosen objectives (default OPRD and top-16), with the last-k window covering the whole response.
Prints step time and Δpeak per (objective, T), the per-token slopes, and writes a PNG plot of both
against T (``--plot``). Expected: both linear in T (chunked LM head, fused AdamW, no T^2 attention
buffers with SDPA), the memory gap between top-16 and OPRD growing with T.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from oprd_cli.bench.loss import BenchLossConfig, run_bench_loss
from oprd_cli.errors import OprdError


def parse_lengths(text: str) -> list[int]:
    try:
        out = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise OprdError(f"--seq-lens takes comma-separated integers, got {text!r}") from None
    if not out or min(out) < 1:
        raise OprdError(f"--seq-lens takes comma-separated positive integers, got {text!r}")
    return sorted(set(out))


def run_sweep(base: BenchLossConfig, lengths: list[int], show_progress: bool = True) -> dict[str, Any]:
    rows, reports = [], []
    for T in lengths:
        cfg = dataclasses.replace(base, seq_len=T, last_k=T)
        r = run_bench_loss(cfg, show_progress=show_progress)
        reports.append(r)
        for name in r["objectives"]:
            o = r[name]
            rows.append({"objective": name, "seq_len": T, "step_time_s": o["step_time_s"],
                         "delta_peak_bytes": o["delta_peak_bytes"], "grad_bytes": o["grad_bytes"],
                         "delta_peak_over_grads": o["delta_peak_over_grads"], "breakdown": o["breakdown"],
                         "trained_parameters": o["trained_parameters"]})
    return {"benchmark": "sweep", "seq_lens": lengths, "objectives": base.objective_list(), "rows": rows,
            "machine": reports[0]["machine"] if reports else None,
            "speedup_vs_top16": [r.get("speedup_vs_top16") for r in reports], "memory_measure":
            reports[0]["memory_measure"] if reports else None, "config": dataclasses.asdict(base),
            "slopes": _slopes(rows)}


def _slopes(rows: list[dict[str, Any]]) -> dict[str, dict[str, float]]:
    """Least-squares slope per objective: seconds and bytes per response token."""
    import numpy as np

    out = {}
    for name in dict.fromkeys(r["objective"] for r in rows):
        pts = [r for r in rows if r["objective"] == name]
        if len(pts) < 2:
            continue
        T = np.array([r["seq_len"] for r in pts], dtype=float)
        out[name] = {"s_per_token": float(np.polyfit(T, [r["step_time_s"] for r in pts], 1)[0]),
                     "bytes_per_token": float(np.polyfit(T, [r["delta_peak_bytes"] for r in pts], 1)[0])}
    return out


def plot_sweep(r: dict[str, Any], path: str | Path) -> None:
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    from oprd_cli.io import atomic_target

    fig, axes = plt.subplots(1, 2, figsize=(9, 3.6), dpi=120)
    for name in r["objectives"]:
        pts = [x for x in r["rows"] if x["objective"] == name]
        T = [x["seq_len"] for x in pts]
        axes[0].plot(T, [x["step_time_s"] for x in pts], marker="o", label=name)
        axes[1].plot(T, [x["delta_peak_bytes"] / 2**30 for x in pts], marker="o", label=name)
    axes[0].set(xlabel="response tokens T", ylabel="step time (s)", title="actor update time")
    axes[1].set(xlabel="response tokens T", ylabel="Δpeak (GiB)", title="actor update Δpeak memory")
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend()
    m = r.get("machine") or {}
    c = r["config"]
    fig.suptitle(f"{c['num_layers']} layers, d={c['hidden_size']}, |V|={c['vocab_size']}; "
                 f"{m.get('cpu', '?')}, {m.get('cpu_cores', '?')} cores", fontsize=8)
    fig.tight_layout()
    with atomic_target(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)


def print_sweep(r: dict[str, Any]) -> None:
    from rich.table import Table

    from oprd_cli.console import console

    t = Table(title="actor update against T")
    for col in ("objective", "T", "step time", "Δpeak", "Δpeak / grads"):
        t.add_column(col, justify="left" if col == "objective" else "right")
    for x in r["rows"]:
        t.add_row(x["objective"], str(x["seq_len"]), f"{x['step_time_s']:.3f} s",
                  f"{x['delta_peak_bytes'] / 2**20:,.0f} MiB", f"{x['delta_peak_over_grads']:.2f}x")
    console.print(t)
    for name, s in r["slopes"].items():
        console.print(f"{name}: {s['s_per_token'] * 1e3:.2f} ms and {s['bytes_per_token'] / 2**10:.0f} KiB per token")
