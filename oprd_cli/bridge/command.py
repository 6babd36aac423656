"""``oprd bridge fit`` (stage 1, both models frozen, on student rollouts) and the bridge's identity,
the checks that a bridge fits a teacher, a student or a cache.

The fit gathers, at sampled response positions of a rollout store, the student's hidden states at
every block and the teacher's at the mapped layers (Eq. 11), through the one truncated forward
(:class:`~oprd_cli.teacher_model.TeacherModel` runs either model), the teacher reading the response
text under its own tokenizer when the tokenizers differ (:mod:`oprd_cli.bridge.view`); then
:func:`~oprd_cli.bridge.fit.fit_bridge` and :meth:`Bridge.save`.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import numpy as np
import torch

from oprd_cli.bridge.fit import DEFAULT_MAX_ROWS, fit_bridge, sample_rows
from oprd_cli.bridge.folder import BRIDGE_JSON, Bridge
from oprd_cli.bridge.layers import layer_map
from oprd_cli.bridge.view import TeacherView, teacher_view
from oprd_cli.console import err_console, progress, warn
from oprd_cli.errors import OprdError

__all__ = ["bridge_identity", "check_teacher", "model_identity", "run_bridge_fit"]


def model_identity(tm) -> dict[str, Any]:
    """What a bridge records of a model (a loaded :class:`TeacherModel`)."""
    return {"name": tm.name, "n_layers": tm.num_layers, "hidden_size": tm.hidden_size,
            "tokenizer_digest": tm.tokenizer_digest, "config_digest": tm.config_digest,
            "weights_digest": tm.weights_digest}


def bridge_identity(folder: str, bridge: Bridge) -> dict[str, Any]:
    """What a cache records of the bridge it was projected with: ``digest``, rank, layers, path.

    ``digest`` is the sha256 of ``bridge.json``'s content without where things were (the fit's rollout
    path, the models' names): the tensors' sha256, the layers, the rank and both models' digests. So
    the same bridge fitted in another folder, or from models at other paths, has the same identity,
    and a cache (whose content digest, and so the trainer's batch order, includes it) does not depend
    on where the run lives."""
    from oprd_cli.io import url_to_fs

    fs, root = url_to_fs(str(folder).rstrip("/"))
    with fs.open(f"{root}/{BRIDGE_JSON}", "rb") as f:
        doc = json.loads(f.read())
    (doc.get("stats") or {}).pop("rollouts", None)
    for side in ("student", "teacher"):
        (doc.get(side) or {}).pop("name", None)
    digest = "sha256:" + hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()
    local = Path(str(folder))
    return {"digest": digest, "rank": bridge.rank, "path": str(local.resolve()) if local.exists() else str(folder),
            "student_layers": list(bridge.student_layers), "teacher_layers": list(bridge.teacher_layers),
            "cross_tokenizer": bridge.cross_tokenizer}


def check_teacher(bridge: Bridge, folder: str, teacher: dict[str, Any]) -> None:
    """Refuse a bridge fitted for another teacher (``teacher``: a cache's or a model's description)."""
    bridge.check_models(d_teacher=teacher.get("hidden_size"), n_teacher_layers=teacher.get("num_layers")
                        or teacher.get("n_layers"))
    for key in ("weights_digest", "config_digest"):
        want, got = bridge.teacher.get(key), teacher.get(key)
        if want and got and want != got:
            raise OprdError(f"bridge {folder} was fitted for another teacher ({bridge.teacher.get('name')}, "
                            f"{key} {want}) than {teacher.get('name')} ({got}); fit a bridge for this teacher")


def _rollout_path(rollouts: str | None, run_dir: str | None) -> str:
    from oprd_cli.stores.rundir import RunDir

    if (rollouts is None) == (run_dir is None):
        raise OprdError("give either --rollouts STORE.zarr or --run-dir RUN (its latest complete rollout)")
    if rollouts is not None:
        return str(rollouts)
    rounds = RunDir(Path(run_dir)).rollout_rounds(complete_only=True)
    if not rounds:
        raise OprdError(f"no complete rollout store in {run_dir}; run `oprd rollout --run-dir {run_dir}` first")
    return str(rounds[-1][1])


def _num_layers(name: str) -> int:
    from transformers import AutoConfig

    from oprd_cli import models

    try:
        return models.num_layers(AutoConfig.from_pretrained(name))
    except (OSError, ValueError) as e:
        raise OprdError(f"cannot read the config of teacher {name}: {str(e).splitlines()[0]}") from None


def _chosen(view: TeacherView, max_rows: int, seed: int) -> dict[int, np.ndarray]:
    """Sampled response positions per sample: ``max_rows`` of the flat axis of paired positions."""
    counts = np.array([len(x) for x in view.index], dtype=np.int64)
    flat = np.concatenate(view.index) if len(counts) else np.zeros(0, np.int64)
    paired = np.nonzero(flat >= 0)[0]
    if len(paired) == 0:
        raise OprdError("no response position of the rollouts has a teacher partner; nothing to fit on")
    pick = paired[sample_rows(len(paired), max_rows, seed).numpy()]
    offsets = np.concatenate([[0], np.cumsum(counts)])
    sample = np.searchsorted(offsets, pick, side="right") - 1
    out: dict[int, list[int]] = {}
    for s, f in zip(sample.tolist(), pick.tolist()):
        out.setdefault(s, []).append(f - int(offsets[s]))
    return {s: np.asarray(ts, dtype=np.int64) for s, ts in out.items()}


def _gather(tm, seqs: dict[int, tuple[np.ndarray, np.ndarray]], budget: int, bar, task) -> dict[int, torch.Tensor]:
    """Hidden states ``[n, n_layers, d]`` (float32, CPU) of each sample's ``(ids, seq_index)``."""
    from oprd_cli.backbone import pack_by_length
    from oprd_cli.teacher_model import SeqRequest

    rows = sorted(seqs)
    reqs = [SeqRequest(ids=seqs[r][0][:int(seqs[r][1].max()) + 1], hidden_index=seqs[r][1]) for r in rows]
    out: dict[int, torch.Tensor] = {}
    for group in pack_by_length([len(q.ids) for q in reqs], budget):
        res = tm.run([reqs[i] for i in group])
        for i, o in zip(group, res):
            out[rows[i]] = o["hidden"].float()
        if bar is not None:
            bar.advance(task, len(group))
    return out


def run_bridge_fit(*, student: str, teacher: str, rollouts: str | None = None, run_dir: str | None = None,
                   rank: int = 8, out: str, max_rows: int = DEFAULT_MAX_ROWS, epochs: int = 20, lr: float = 1e-3,
                   seed: int = 0, max_batch_tokens: int = 16384, device: str = "auto", dtype: str = "auto",
                   overwrite: bool = False, show_progress: bool = True) -> dict[str, Any]:
    """What ``oprd bridge fit`` runs; returns the summary ``--json`` prints."""
    from oprd_cli.stores.rollouts import load_arrays, open_rollouts
    from oprd_cli.teacher_model import TeacherModel

    if rank < 1 or max_rows < 1 or epochs < 0 or max_batch_tokens < 1:
        raise OprdError("--rank, --max-rows and --max-batch-tokens must be at least 1 and --epochs at least 0")
    if not overwrite and (Path(str(out)) / BRIDGE_JSON).exists():
        raise OprdError(f"{out} already holds a bridge; choose another --out or pass --overwrite")
    store = open_rollouts(_rollout_path(rollouts, run_dir))
    s_tm = TeacherModel(student, layers="all", device=device, dtype=dtype)
    if s_tm.tokenizer_digest != store.tokenizer_digest:
        raise OprdError(f"rollout store {store.path} was not sampled with {student}'s tokenizer; the bridge is fitted "
                        "on the student's own rollouts")
    n_s = s_tm.num_layers
    t_layers = layer_map(n_s, _num_layers(teacher))
    t_tm = TeacherModel(teacher, layers=",".join(str(x) for x in sorted(set(t_layers))), device=device, dtype=dtype)
    if rank > min(s_tm.hidden_size, t_tm.hidden_size):
        raise OprdError(f"--rank {rank} is more than a hidden size (student {s_tm.hidden_size}, "
                        f"teacher {t_tm.hidden_size})")
    arrays = load_arrays(store)
    view = teacher_view(store, arrays, s_tm.tokenizer, t_tm.tokenizer, s_tm.tokenizer_digest, t_tm.tokenizer_digest)
    chosen = _chosen(view, max_rows, seed)
    s_seqs = {r: (np.concatenate([arrays.prompt_ids[r], arrays.response_ids[r]]), len(arrays.prompt_ids[r]) + ts)
              for r, ts in chosen.items()}
    t_seqs = {r: (view.ids[r], view.index[r][ts]) for r, ts in chosen.items()}
    bar = progress(transient=False) if show_progress else None
    if bar is not None:
        bar.start()
    try:
        task = bar.add_task("bridge fit: student states", total=len(chosen)) if bar else None
        hs = _gather(s_tm, s_seqs, max_batch_tokens, bar, task)
        task = bar.add_task("bridge fit: teacher states", total=len(chosen)) if bar else None
        ht = _gather(t_tm, t_seqs, max_batch_tokens, bar, task)
        rows = sorted(chosen)
        h_s = torch.cat([hs[r] for r in rows])  # [N, L_S, d_S]
        h_t = torch.cat([ht[r] for r in rows])  # [N, n_distinct, d_T]
        del s_tm.model, t_tm.model
        s_layers = list(range(1, n_s + 1))
        student_rows = [h_s[:, layer - 1] for layer in s_layers]
        teacher_rows = {layer: h_t[:, k] for k, layer in enumerate(t_tm.layers)}
        task = bar.add_task("bridge fit: projectors", total=len(s_layers) * max(epochs, 1)) if bar else None
        bridge = fit_bridge(student_rows, teacher_rows, s_layers, t_layers, rank, epochs=epochs, lr=lr, seed=seed,
                            student=model_identity(s_tm), teacher=model_identity(t_tm),
                            on_epoch=(lambda j, e, loss: bar.advance(task)) if bar else None)
    finally:
        if bar is not None:
            bar.stop()
    bridge.stats.update({"rows": int(h_s.shape[0]), "max_rows": int(max_rows), "rollouts": store.path,
                         "rollout_digest": store.content_digest, "aligned_fraction": view.aligned_fraction()})
    bridge.save(str(out), overwrite=overwrite)
    layers = bridge.stats["layers"]
    for st in layers:
        if st["lstsq_gap"] > 0.05:
            warn(f"student layer {st['student_layer']}: the projector's cosine {st['cosine']:.3f} is "
                 f"{st['lstsq_gap']:.3f} below the least-squares optimum; raise --epochs or --lr")
    err_console.print(f"bridge {out}: rank {rank}, {len(s_layers)} layers, {bridge.stats['rows']} rows, mean fit "
                      f"cosine {np.mean([s['cosine'] for s in layers]):.3f}")
    return {"out": str(out), "rank": rank, "rows": bridge.stats["rows"], "cross_tokenizer": view.cross_tokenizer,
            "aligned_fraction": bridge.stats["aligned_fraction"], "layer_map": dict(zip(s_layers, t_layers)),
            "layers": [{"student_layer": s["student_layer"], "teacher_layer": s["teacher_layer"],
                        "explained_variance": s["explained_variance_total"], "cosine": s["cosine"],
                        "lstsq_cosine": s["lstsq_cosine"]} for s in layers]}
