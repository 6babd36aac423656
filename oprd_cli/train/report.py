"""What a training run tells: ``metrics.jsonl`` (one JSON object per optimizer step; a resumed run
drops the lines of steps after its checkpoint), the live progress line, and the final summary.

On object storage (a run directory at an fsspec URL) an object cannot be appended to: the log keeps
the file's lines in memory and rewrites the object after each step, one PUT (atomic: a reader sees
the previous or the new version, never a torn line)."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch

from oprd_cli.console import err_console
from oprd_cli.io import atomic_write_text
from oprd_cli.train.config import TrainResult
from oprd_cli.urlpath import UrlPath, as_path


class MetricsLog:
    """``metrics.jsonl`` of a run."""

    def __init__(self, path: Path | UrlPath):
        self.path = as_path(path)
        self._text: str | None = None  # on object storage: the object's content, rewritten per step

    def truncate(self, step: int) -> None:
        """Drop metric lines of steps after ``step`` (a crashed run's tail beyond its checkpoint)."""
        if not self.path.exists():
            return
        keep, dropped = [], 0
        for line in self.path.read_text().splitlines():
            try:
                s = int(json.loads(line).get("step", 0))
            except (ValueError, AttributeError):
                continue
            if s <= step:
                keep.append(line)
            else:
                dropped += 1
        if dropped:
            atomic_write_text(str(self.path), "".join(line + "\n" for line in keep))
        self._text = None

    def append(self, m: dict[str, Any]) -> None:
        if isinstance(self.path, UrlPath):
            if self._text is None:
                self._text = self.path.read_text() if self.path.exists() else ""
            self._text += json.dumps(jsonable(m), sort_keys=False) + "\n"
            atomic_write_text(str(self.path), self._text)
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a") as f:
            f.write(json.dumps(jsonable(m), sort_keys=False) + "\n")


def jsonable(m: dict[str, Any]) -> dict[str, Any]:
    out = {}
    for k, v in m.items():
        if isinstance(v, float) and not math.isfinite(v):
            out[k] = str(v)
        elif isinstance(v, torch.Tensor):
            out[k] = float(v)
        else:
            out[k] = v
    return out


def live_line(m: dict[str, Any]) -> str:
    parts = [f"loss {m['loss']:.4g}"]
    if "rep/cosine_similarity" in m:
        parts.append(f"cos {m['rep/cosine_similarity']:.3f}")
    if "opd/kl" in m:
        parts.append(f"kl {m['opd/kl']:.3g}")
    parts += [f"lr {m['lr']:.1e}", f"gn {m['grad_norm']:.2g}", f"{m['tokens_per_s']:,.0f} tok/s"]
    return " ".join(parts)


def show_step(bar, task, m: dict[str, Any]) -> None:
    """The step on the progress bar, or one line when there is no bar."""
    if bar is not None:
        bar.update(task, completed=m["step"], stats=live_line(m))
    else:
        err_console.print(f"step {m['step']}: {live_line(m)}")


def print_result(r: TrainResult) -> None:
    m = r.last_metrics
    if r.steps:
        line = f"[green]trained[/] steps {r.start_step + 1}..{r.step}"
        if m:
            line += f": loss {m.get('loss', float('nan')):.4g}"
            if "rep/cosine_similarity" in m:
                line += f", rep/cosine_similarity {m['rep/cosine_similarity']:.4f}"
            if "opd/kl" in m:
                line += f", opd/kl {m['opd/kl']:.4g}"
        err_console.print(line + f" ({r.seconds:.1f} s)")
    else:
        err_console.print(f"no training step taken (student at step {r.step}; stopped: {r.stopped})")
    if r.checkpoint:
        err_console.print(f"checkpoint {r.checkpoint}")
    err_console.print(f"metrics {r.metrics_path}")
