"""Experiment tracking beside ``metrics.jsonl``: ``--report-to tensorboard|wandb|none``.

- ``tensorboard``: event files in ``RUN/tensorboard/`` (``torch.utils.tensorboard.SummaryWriter``,
  needs the ``tensorboard`` package): every numeric metric as a scalar at its global step.
- ``wandb``: files in ``RUN/wandb/``; offline (synced later with ``wandb sync``) unless
  ``WANDB_MODE`` says otherwise or an API key is configured (``WANDB_API_KEY``). One wandb run per
  run directory and kind (``train``, ``eval``): its id is kept in ``RUN/wandb/oprd-KIND.id`` (write
  one there to choose it) and every later ``oprd train`` (each round of ``oprd loop``) resumes it,
  so the rounds make one curve, as they do in TensorBoard (``wandb sync`` uploads a run's offline parts in order). Eval metrics are
  plotted against ``checkpoint_step``, so a report of an older checkpoint is never dropped.
- ``none``: nothing but ``metrics.jsonl``.

Only rank 0 of a torchrun job reports (other ranks get :class:`NoTracker`).
"""

from __future__ import annotations

import math
import os
import re
from pathlib import Path
from typing import Any

from oprd_cli.errors import OprdError

REPORT_TO = ("none", "tensorboard", "wandb")


def check_report_to(value: str) -> None:
    if value not in REPORT_TO:
        raise OprdError(f"--report-to must be one of {', '.join(REPORT_TO)}, got {value!r}")


def scalars(metrics: dict[str, Any]) -> dict[str, float]:
    """The finite numeric entries of a metrics dict (strings, lists and bookkeeping ids left out)."""
    out = {}
    for k, v in metrics.items():
        if isinstance(v, bool) or not isinstance(v, (int, float)) or k == "step":
            continue
        if math.isfinite(float(v)):
            out[k] = float(v)
    return out


class NoTracker:
    def log(self, metrics: dict[str, Any], step: int, prefix: str = "") -> None:
        pass

    def close(self) -> None:
        pass


class TensorBoardTracker(NoTracker):
    def __init__(self, log_dir: Path):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise OprdError("--report-to tensorboard needs the tensorboard package (pip install tensorboard)") from None
        self.writer = SummaryWriter(log_dir=str(log_dir))

    def log(self, metrics: dict[str, Any], step: int, prefix: str = "") -> None:
        for k, v in scalars(metrics).items():
            self.writer.add_scalar(prefix + k, v, global_step=int(step))
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


def wandb_run_id(log_dir: Path, kind: str) -> str:
    """The wandb run id of this run directory's ``kind`` runs (made once, then read)."""
    import secrets

    from oprd_cli.io import atomic_write_text

    path = Path(log_dir) / "wandb" / f"oprd-{kind}.id"
    if not (path.is_file() and path.read_text().strip()):
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(path, secrets.token_hex(4) + "\n")
    run_id = path.read_text().strip()
    if not re.fullmatch(r"[A-Za-z0-9_.-]{1,64}", run_id):
        raise OprdError(f"{path} must hold one wandb run id (letters, digits, '_', '-', '.'), not {run_id[:40]!r}")
    return run_id


class WandbTracker(NoTracker):
    def __init__(self, log_dir: Path, name: str, config: dict[str, Any] | None, kind: str = "train"):
        try:
            import wandb
        except ImportError:
            raise OprdError("--report-to wandb needs the wandb package (pip install wandb)") from None
        mode = os.environ.get("WANDB_MODE") or ("online" if os.environ.get("WANDB_API_KEY") else "offline")
        Path(log_dir).mkdir(parents=True, exist_ok=True)
        self.wandb, self.kind = wandb, kind
        run_id = wandb_run_id(Path(log_dir), kind)
        self.run = wandb.init(project=os.environ.get("WANDB_PROJECT", "oprd"), name=f"{name}-{kind}", id=run_id,
                              group=name, job_type=kind, dir=str(log_dir), mode=mode, config=config or {},
                              resume="allow")
        if kind == "eval":  # reports come in any checkpoint order: their own x-axis, not wandb's step
            self.run.define_metric("checkpoint_step")
            self.run.define_metric("eval/*", step_metric="checkpoint_step")

    def log(self, metrics: dict[str, Any], step: int, prefix: str = "") -> None:
        row = {prefix + k: v for k, v in scalars(metrics).items()}
        if self.kind == "eval":
            self.run.log({**row, "checkpoint_step": int(step)})
        else:
            self.run.log(row, step=int(step))

    def close(self) -> None:
        self.run.finish()


def open_tracker(report_to: str, run_root: Path, *, name: str = "oprd", config: dict[str, Any] | None = None,
                 is_main: bool = True, kind: str = "train") -> NoTracker:
    """The tracker of ``--report-to`` writing under ``run_root`` (``tensorboard/`` or ``wandb/``);
    ``kind`` (train, eval) names the wandb run of the run directory it logs to."""
    check_report_to(report_to)
    if report_to == "none" or not is_main:
        return NoTracker()
    if report_to == "tensorboard":
        return TensorBoardTracker(Path(run_root) / "tensorboard")
    return WandbTracker(Path(run_root), name, config, kind)


def report_eval(report_to: str, run_dir: str | None, reports: list[dict[str, Any]]) -> None:
    """Log ``oprd eval`` reports (one per model) at their checkpoint's step under ``eval/BENCH/``, in
    the run directory (else beside the first report)."""
    if report_to == "none" or not reports:
        return
    run_root = Path(run_dir) if run_dir else Path(reports[0].get("report_path") or "x").parent
    tracker = open_tracker(report_to, run_root, name=run_root.name, kind="eval")
    try:
        for r in reports:
            flat = {**r, **{f"pass_at_{k}": v for k, v in (r.get("pass_at_k") or {}).items()}}
            tracker.log(flat, int(r.get("step") or 0), prefix=f"eval/{r.get('bench') or 'eval'}/")
    finally:
        tracker.close()
