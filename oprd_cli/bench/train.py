"""``oprd bench train``: what the data path of ``oprd train`` costs over the loss step alone.

It generates a random Qwen2-style model and rollouts (the ``bench cache`` generators), caches the
model's own activations as the teacher (``oprd teacher-cache``), then runs the real ``oprd train``
(:func:`oprd_cli.train.run_train`: cache selection, the prefetching reader, batching, the step,
metrics) for ``steps`` optimizer steps. Per step the trainer records ``step_time_s`` (the actor update
alone: forward, backward, clipping, AdamW) and ``time_s`` (the run's clock when the step was logged).
``overhead`` = (wall time between the first and the last logged step - the step times in between) /
those step times: everything the command does besides the loss step (reading and decoding the cache,
building micro-batches, the host-to-device copy, metrics). Target: at most 10%.
"""

from __future__ import annotations

import json
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from oprd_cli.errors import OprdError

TARGET_OVERHEAD = 0.10


@dataclass
class BenchTrainConfig:
    objective: str = "oprd"
    steps: int = 6
    batch_size: int = 4
    tokens: int = 12000
    hidden_size: int = 512
    num_layers: int = 4
    vocab_size: int = 32000
    positions: str = "all"
    device: str = "auto"
    threads: int | None = None

    def validate(self) -> None:
        for name in ("steps", "batch_size", "tokens", "hidden_size", "num_layers", "vocab_size"):
            if getattr(self, name) < 1:
                raise OprdError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")
        if self.steps < 3:
            raise OprdError(f"--steps must be at least 3 (the first step is a warm-up), got {self.steps}")


def overhead_of(metrics: list[dict[str, Any]]) -> dict[str, Any]:
    """Data-path overhead from ``oprd train`` metrics rows (steps after the first)."""
    rows = metrics[1:]
    wall = metrics[-1]["time_s"] - metrics[0]["time_s"]
    step = sum(m["step_time_s"] for m in rows)
    return {"steps_measured": len(rows), "wall_s": wall, "step_s": step, "data_path_s": wall - step,
            "overhead": (wall - step) / step if step > 0 else None}


def run_bench_train(cfg: BenchTrainConfig, say=lambda msg: None) -> dict[str, Any]:
    import torch

    from oprd_cli import models as M
    from oprd_cli.bench.cache import generate_rollouts, generate_teacher
    from oprd_cli.teacher import cache_rollouts
    from oprd_cli.train import TrainConfig, run_train

    cfg.validate()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    dev = M.resolve_device(cfg.device)
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="oprd-bench-train-") as tmp:
        root = Path(tmp)
        say(f"generating a model (d={cfg.hidden_size}, {cfg.num_layers} layers) and ~{cfg.tokens} rollout tokens")
        model = generate_teacher(root / "model", cfg.hidden_size, cfg.num_layers, cfg.vocab_size)
        rollouts = generate_rollouts(root / "rollouts.zarr", model, cfg.tokens, cfg.vocab_size)
        say("caching the teacher's activations")
        logprobs = "none" if cfg.objective == "oprd" else ("sampled" if cfg.objective == "opd-top1" else "topk")
        cache = cache_rollouts(str(model), rollouts, root / "cache.zarr", positions=cfg.positions,
                               logprobs=logprobs, device=cfg.device, show_progress=False)
        say(f"oprd train: {cfg.steps} steps of {cfg.batch_size} samples")
        tcfg = TrainConfig.from_flat(objective=cfg.objective, batch_size=cfg.batch_size, max_steps=cfg.steps,
                                     epochs=None, device=cfg.device, lr=1e-5)
        result = run_train(model=str(model), cache=cache, out=str(root / "out"), config=tcfg, show_progress=False)
        metrics = [json.loads(line) for line in Path(result.metrics_path).read_text().splitlines() if line.strip()]
    if len(metrics) < 3:
        raise OprdError(f"bench train: only {len(metrics)} steps ran; pass more --tokens or fewer --steps")
    o = overhead_of(metrics)
    return {"benchmark": "train", "config": asdict(cfg), "device": str(dev), "machine": M.machine_info(dev),
            **o, "step_times_s": [m["step_time_s"] for m in metrics],
            "target": {"overhead_max": TARGET_OVERHEAD,
                       "met": None if o["overhead"] is None else o["overhead"] <= TARGET_OVERHEAD},
            "seconds": time.perf_counter() - t0}


def print_bench_train(r: dict[str, Any]) -> None:
    from oprd_cli.console import console

    console.print(f"oprd train, {r['steps_measured']} steps: {r['wall_s']:.2f} s wall, {r['step_s']:.2f} s in the "
                  f"loss step; data path {r['data_path_s']:.2f} s = {r['overhead']:.1%} over the step "
                  f"(target <= {TARGET_OVERHEAD:.0%}: {'met' if r['target']['met'] else 'NOT met'})")
