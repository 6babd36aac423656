"""The run directory layout (see docs/architecture.md)::

    RUN/
      oprd.toml                 run configuration (optional; CLI flags override)
      rollouts/r000001.zarr     one round of student samples
      cache/r000001.zarr        teacher activations for that round
      checkpoints/step-000050/  save_pretrained folder + trainer state
      metrics.jsonl             one JSON object per optimizer step
      eval/                     one JSON report per (benchmark, checkpoint)

"Latest" always means the newest store (or checkpoint) whose completion marker
exists. A checkpoint is complete once ``oprd_checkpoint.json`` exists in it
(the trainer writes it last).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from oprd_cli.stores.common import is_complete, read_json
from oprd_cli.urlpath import UrlPath, as_path

ROUND_RE = re.compile(r"^r(\d{6})\.zarr$")
STEP_RE = re.compile(r"^step-(\d+)$")
CHECKPOINT_MARKER = "oprd_checkpoint.json"


def round_name(index: int) -> str:
    return f"r{index:06d}.zarr"


def round_index(path: str | Path) -> int | None:
    m = ROUND_RE.match(Path(str(path).rstrip("/")).name)
    return int(m.group(1)) if m else None


def _round_of(path: str | Path) -> int:
    idx = round_index(path)
    if idx is None:
        raise ValueError(f"{path} is not a round store (rNNNNNN.zarr)")
    return idx


def checkpoint_name(step: int) -> str:
    return f"step-{step:06d}"


@dataclass(frozen=True)
class Checkpoint:
    step: int
    path: Path | UrlPath

    @property
    def state(self) -> dict:
        return read_json(str(self.path / CHECKPOINT_MARKER)) or {}


def is_checkpoint(path: Path | UrlPath) -> bool:
    return (as_path(path) / CHECKPOINT_MARKER).exists()


def _under(name: str) -> property:
    """A fixed path of the run directory: ``root / name``."""
    return property(lambda self: self.root / name, doc=f"``RUN/{name}``")


@dataclass(frozen=True)
class RunDir:
    """A run directory: a local folder (``root`` a ``Path``) or an fsspec URL (``root`` a ``UrlPath``,
    also when the caller wrapped ``s3://b/run`` in ``Path``); the layout is the same."""

    root: Path | UrlPath

    def __post_init__(self) -> None:
        object.__setattr__(self, "root", as_path(self.root))

    # ---- fixed paths
    config_path = _under("oprd.toml")
    rollouts_dir = _under("rollouts")
    cache_dir = _under("cache")
    checkpoints_dir = _under("checkpoints")
    metrics_path = _under("metrics.jsonl")
    eval_dir = _under("eval")

    # ---- rounds
    def _rounds(self, folder, complete_only: bool) -> list[tuple[int, Path]]:
        if not folder.is_dir():
            return []
        out = []
        for p in folder.iterdir():
            idx = round_index(p)
            if idx is not None and (not complete_only or is_complete(str(p))):
                out.append((idx, p))
        return sorted(out)

    def rollout_rounds(self, complete_only: bool = True) -> list[tuple[int, Path]]:
        return self._rounds(self.rollouts_dir, complete_only)

    def cache_rounds(self, complete_only: bool = True) -> list[tuple[int, Path]]:
        return self._rounds(self.cache_dir, complete_only)

    def next_rollout_path(self) -> Path:
        """The first round number after every existing rollout store (complete or not)."""
        existing = self.rollout_rounds(complete_only=False)
        nxt = (existing[-1][0] + 1) if existing else 1
        return self.rollouts_dir / round_name(nxt)

    def cache_path_for(self, rollout_path: str | Path) -> Path:
        return self.cache_dir / round_name(_round_of(rollout_path))

    def rollout_path_for(self, cache_path: str | Path) -> Path:
        return self.rollouts_dir / round_name(_round_of(cache_path))

    # ---- checkpoints
    def checkpoints(self) -> list[Checkpoint]:
        if not self.checkpoints_dir.is_dir():
            return []
        out = []
        for p in self.checkpoints_dir.iterdir():
            m = STEP_RE.match(p.name)
            if m and is_checkpoint(p):
                out.append(Checkpoint(int(m.group(1)), p))
        return sorted(out, key=lambda c: c.step)

    def latest_checkpoint(self) -> Checkpoint | None:
        cks = self.checkpoints()
        return cks[-1] if cks else None

    def checkpoint(self, name_or_step: str | int) -> Checkpoint | None:
        step = int(str(name_or_step).removeprefix("step-"))
        for c in self.checkpoints():
            if c.step == step:
                return c
        return None
