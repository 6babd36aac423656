"""``oprd bench all``: every stage against its bare engine in one run, one line of ratios.

- ``loss``: ``oprd bench loss``: per objective Δpeak / fp32 gradient bytes of what it trains (target
  at most 1.6x) and OPRD's speed-up over top-16 (target at least 2x);
- ``rollout``: ``oprd bench rollout``: ``oprd rollout`` tokens/s / the fastest bare ``generate``
  (target at least 0.9);
- ``train``: ``oprd bench train``: the data path of ``oprd train`` over the loss step (at most 10%);
- ``cache``: ``oprd bench cache``: the writer's overhead over the bare truncated forward (at most 10%).

The report carries the machine and the load average before and after (timing figures are only
meaningful on an idle machine).
"""

from __future__ import annotations

import os
import time
from typing import Any

from oprd_cli.bench.loss import BenchLossConfig, run_bench_loss
from oprd_cli.bench.rollout import BenchRolloutConfig, run_bench_rollout
from oprd_cli.bench.train import BenchTrainConfig, run_bench_train

TARGET_GRAD_RATIO = 1.6


def _load() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def run_bench_all(loss: BenchLossConfig, rollout: BenchRolloutConfig, train: BenchTrainConfig,
                  cache: dict[str, Any], say=lambda msg: None) -> dict[str, Any]:
    from oprd_cli.bench.cache import run_bench
    from oprd_cli.models import machine_info, resolve_device

    t0, load_before = time.perf_counter(), _load()
    say("loss")
    rl = run_bench_loss(loss, show_progress=False)
    say("rollout")
    rr = run_bench_rollout(rollout)
    say("train")
    rt = run_bench_train(train)
    say("cache")
    rc = run_bench(show_progress=False, **cache)
    ratios: dict[str, Any] = {f"loss/{n}/delta_peak_over_grads": rl[n]["delta_peak_over_grads"]
                              for n in rl["objectives"]}
    ratios["loss/oprd_speedup_vs_top16"] = rl.get("speedup_vs_top16")
    ratios["rollout/oprd_over_fastest_bare"] = rr["ratio"]
    ratios["train/data_path_overhead"] = rt["overhead"]
    ratios["cache/writer_overhead"] = rc["writer_overhead"]
    met = {f"loss/{n}/delta_peak_over_grads": (rl[n]["delta_peak_over_grads"] or 0) <= TARGET_GRAD_RATIO
           for n in rl["objectives"]}
    if rl.get("speedup_vs_top16") is not None:
        met["loss/oprd_speedup_vs_top16"] = rl["speedup_vs_top16"] >= 2.0
    met["rollout/oprd_over_fastest_bare"] = rr["target"]["met"]
    met["train/data_path_overhead"] = rt["target"]["met"]
    met["cache/writer_overhead"] = rc["writer_overhead"] <= 0.10
    return {"benchmark": "all", "machine": machine_info(resolve_device(loss.device)), "gpu": None,
            "load_average": {"before": load_before, "after": _load()}, "ratios": ratios, "targets_met": met,
            "loss": rl, "rollout": rr, "train": rt, "cache": rc, "seconds": time.perf_counter() - t0}


def print_bench_all(r: dict[str, Any]) -> None:
    from rich.table import Table

    from oprd_cli.console import console

    t = Table(title="oprd bench all: every stage against its bare engine")
    t.add_column("ratio")
    t.add_column("value", justify="right")
    t.add_column("target", justify="right")
    for k, v in r["ratios"].items():
        ok = r["targets_met"].get(k)
        t.add_row(k, "-" if v is None else f"{v:.3f}", "-" if ok is None else ("met" if ok else "NOT met"))
    console.print(t)
    m = r["machine"]
    console.print(f"machine: {m['cpu']}, {m['cpu_cores']} cores, " + (m.get("gpu") or "no GPU")
                  + f"; load average before {r['load_average']['before']}, after {r['load_average']['after']}")
