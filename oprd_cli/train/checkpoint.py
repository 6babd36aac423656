"""Checkpoints: ``checkpoints/step-NNNNNN/``, a ``save_pretrained`` folder plus the trainer state.

Layout of one checkpoint::

    step-000050/
      config.json, generation_config.json, model.safetensors   the student (transformers loads it as is)
      tokenizer.json, tokenizer_config.json, ...               its tokenizer
      trainer_state.pt        optimizer, scheduler, step and RNG states (torch.save)
      oprd_checkpoint.json    the marker, written LAST: step, consumed caches, progress, config, digests

Everything is written into a hidden temporary folder next to the final one (``.step-000050.tmp-PID``),
the marker last, and the folder is then renamed into place, so a crash never leaves a folder that
looks complete (readers only trust folders with the marker, see :mod:`oprd_cli.stores.rundir`).

On object storage (``checkpoints_dir`` an fsspec URL) there is no rename: the checkpoint is written
into a local temporary folder, its files are uploaded, and the marker is uploaded last in one PUT
(an older write of the same step loses its marker first). Readers load it through a local copy
(:func:`oprd_cli.urlpath.local_copy`).
"""

from __future__ import annotations

import os
import pickle
import random
import re
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from oprd_cli.errors import OprdError
from oprd_cli.io import read_json, write_json
from oprd_cli.stores.common import now_iso
from oprd_cli.stores.rundir import CHECKPOINT_MARKER, STEP_RE, checkpoint_name, is_checkpoint
from oprd_cli.urlpath import UrlPath, as_path, local_copy, remove_tree, upload_folder

TRAINER_STATE = "trainer_state.pt"
CHECKPOINT_FORMAT = 1


def rng_state() -> dict[str, Any]:
    name, keys, pos, has_gauss, gauss = np.random.get_state()  # plain values: loadable with weights_only=True
    state = {"python": random.getstate(), "numpy": [name, torch.from_numpy(np.asarray(keys, np.int64)), int(pos),
                                                     int(has_gauss), float(gauss)], "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    if not state:
        return
    random.setstate(state["python"])
    name, keys, *rest = state["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), *rest))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        try:
            torch.cuda.set_rng_state_all(state["cuda"])
        except (RuntimeError, IndexError):  # another number of GPUs: not fatal
            pass


def save_checkpoint(checkpoints_dir: Path, step: int, model, tokenizer, trainer_state: dict,
                    marker: dict[str, Any], tmp: Path | None = None) -> Path:
    """Write ``checkpoints_dir/step-NNNNNN`` atomically (temp folder, marker last, rename). ``tmp``: a
    temporary folder that already holds part of it (a sharded run's DCP shards)."""
    checkpoints_dir = as_path(checkpoints_dir)
    if isinstance(checkpoints_dir, UrlPath):
        return _save_remote(checkpoints_dir, step, model, tokenizer, trainer_state, marker, tmp)
    checkpoints_dir.mkdir(parents=True, exist_ok=True)
    final = checkpoints_dir / checkpoint_name(step)
    made = tmp is None
    tmp = tmp or checkpoints_dir / f".{final.name}.tmp-{os.getpid()}-{time.monotonic_ns()}"
    try:
        if made:
            tmp.mkdir(parents=True)
        model.save_pretrained(tmp, safe_serialization=True)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        torch.save({**trainer_state, "rng": rng_state()}, tmp / TRAINER_STATE)
        write_json(str(tmp / CHECKPOINT_MARKER),
                   {"format_version": CHECKPOINT_FORMAT, "step": step, "created_at": now_iso(), **marker})
        if final.exists():  # an older write of the same step (complete or not): replace it
            old = checkpoints_dir / f".{final.name}.old-{os.getpid()}-{time.monotonic_ns()}"
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise OprdError(f"cannot write checkpoint {final}: {e.strerror or e}") from None
    return final


def _save_remote(checkpoints_dir: UrlPath, step: int, model, tokenizer, trainer_state: dict,
                 marker: dict[str, Any], tmp: Path | None) -> UrlPath:
    """The checkpoint written locally (:func:`save_checkpoint`), then uploaded, its marker last."""
    import tempfile

    final = checkpoints_dir / checkpoint_name(step)
    staging = Path(tempfile.mkdtemp(prefix="oprd-checkpoint-"))
    try:
        local = save_checkpoint(staging, step, model, tokenizer, trainer_state, marker, tmp=tmp)
        (final / CHECKPOINT_MARKER).unlink(missing_ok=True)  # an older write of this step: incomplete first
        remove_tree(final)
        upload_folder(local, final, last=CHECKPOINT_MARKER)
    except OSError as e:
        raise OprdError(f"cannot write checkpoint {final}: {e.strerror or e}") from None
    finally:
        shutil.rmtree(staging, ignore_errors=True)
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
    return final


def clean_temporaries(checkpoints_dir: Path) -> None:
    """Remove temporary folders that an interrupted writer left behind."""
    d = as_path(checkpoints_dir)
    if isinstance(d, UrlPath) or not d.is_dir():  # on object storage the temporaries are local
        return
    for p in d.iterdir():
        if p.name.startswith(".step-") and (".tmp-" in p.name or ".old-" in p.name):
            shutil.rmtree(p, ignore_errors=True)


def prune_checkpoints(checkpoints_dir: Path, keep_last: int | None, protect: Path | None = None) -> list[Path]:
    """Delete all but the newest ``keep_last`` complete checkpoints; returns what was deleted."""
    if not keep_last:
        return []
    d = as_path(checkpoints_dir)
    found = []
    for p in d.iterdir() if d.is_dir() else []:
        m = STEP_RE.match(p.name)
        if m and is_checkpoint(p):
            found.append((int(m.group(1)), p))
    found.sort()
    removed = []
    for _, p in found[:-keep_last]:
        if protect is not None and p.resolve() == as_path(protect).resolve():
            continue
        # drop the marker first so that a half-deleted folder never looks complete
        try:
            (p / CHECKPOINT_MARKER).unlink()
        except OSError:
            pass
        remove_tree(p)
        removed.append(p)
    return removed


def read_marker(path: Path) -> dict[str, Any]:
    """The marker of a complete checkpoint; a folder without one is refused with a message."""
    path = as_path(path)
    if not path.is_dir():
        raise OprdError(f"checkpoint {path} does not exist")
    if not is_checkpoint(path):
        raise OprdError(f"{path} is not a complete oprd checkpoint (no {CHECKPOINT_MARKER}; an interrupted save "
                        "or not a checkpoint at all)")
    marker = read_json(str(path / CHECKPOINT_MARKER)) or {}
    if marker.get("format_version") not in (None, CHECKPOINT_FORMAT):
        raise OprdError(f"checkpoint {path} has format version {marker.get('format_version')}; this oprd reads "
                        f"version {CHECKPOINT_FORMAT}")
    return marker


def load_trainer_state(path: Path) -> dict[str, Any]:
    f = Path(local_copy(str(path))) / TRAINER_STATE  # a checkpoint on object storage: its local copy
    if not f.exists():
        raise OprdError(f"checkpoint {path} has no {TRAINER_STATE}; it cannot be resumed (it can still be used as "
                        "--model for a new run)")
    try:  # never unpickle code: tensors and plain values only (numpy arrays for older checkpoints' RNG state)
        with torch.serialization.safe_globals([np.ndarray, np.dtype, np.dtypes.UInt32DType,
                                               np._core.multiarray._reconstruct]):
            return torch.load(f, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:  # it asks for code (or objects) beyond tensors and plain values
        found = re.search(r"Unsupported global: GLOBAL (\S+)", str(e))
        raise OprdError(f"cannot read {f}: it asks to run {found.group(1) if found else 'code'} while loading; "
                        "oprd reads tensors and plain values only (is it an oprd checkpoint?)") from None
    except Exception as e:  # a truncated or foreign file
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise OprdError(f"cannot read {f}: {type(e).__name__}: {first}") from None


class Checkpointer:
    """The one owner of the checkpoint policy of a run: every ``save_every`` steps, after each cache
    in a run directory, at the end, and the last good state after a failed step; ``keep_last``
    pruning. ``marker()`` gives the run's bookkeeping for the marker; ``steps`` (the run state's list
    of checkpointed steps) is appended to before each save."""

    def __init__(self, checkpoints_dir: Path, trainer, tokenizer, marker, steps: list[int], *,
                 save_every: int | None, keep_last: int | None, latest: str | None, saved_step: int | None):
        self.dir = as_path(checkpoints_dir)
        self.trainer, self.tokenizer, self.marker, self.steps = trainer, tokenizer, marker, steps
        self.save_every, self.keep_last = save_every, keep_last
        self.last = latest  # newest complete checkpoint of this run
        self.start_step = trainer.step
        self.saved_step = saved_step  # step of the state saved last (None: not saved by this run yet)

    @property
    def pending(self) -> bool:
        """Steps taken since the last save (or since the start)."""
        last = self.saved_step if self.saved_step is not None else self.start_step
        return self.trainer.step != last

    def save(self) -> str:
        from oprd_cli.models import weights_digest

        step = self.trainer.step
        if not self.trainer.params_finite():
            raise OprdError(f"step {step}: the weights are no longer finite (NaN/inf) after the update; nothing was "
                            f"saved. Last good checkpoint: {self.last or 'none'} (lower --lr?)")
        if step not in self.steps:
            self.steps.append(step)
        sharded = getattr(self.trainer, "sharding", None)  # under torchrun: DCP shards + rank 0's folder
        digest = sharded.weights_digest() if sharded is not None else weights_digest(self.trainer.model)
        marker = {**self.marker(), "weights_digest": digest}
        if sharded is not None:
            path = sharded.save_checkpoint(self.dir, step, self.tokenizer, self.trainer.state_dict(), marker)
        else:
            path = save_checkpoint(self.dir, step, self.trainer.model, self.tokenizer, self.trainer.state_dict(), marker)
        self.last, self.saved_step = str(path), step
        if sharded is None or sharded.is_main:
            prune_checkpoints(self.dir, self.keep_last, protect=path)
        return str(path)

    def after_step(self) -> None:
        if self.save_every and self.trainer.step % self.save_every == 0:
            self.save()

    def save_pending(self) -> str | None:
        """Save when there are unsaved steps; the newest checkpoint either way."""
        return self.save() if self.pending else self.last

    def last_good(self) -> str | None:
        """After a failed step: save the (finite) state before it when it is not saved yet; returns the
        newest good checkpoint."""
        if self.pending and self.trainer.params_finite():
            return self.save()
        return self.last
