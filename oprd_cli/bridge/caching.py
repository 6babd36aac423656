"""The bridge in a teacher pass (``oprd teacher-cache --bridge``): which teacher layers run, the
requests of a unit (the teacher reading the response text under its own tokenizer when the
tokenizers differ), and what is stored per position: ``z_T = P_T (h_T - mu_T)`` of every supervised
layer (:func:`~oprd_cli.bridge.pca.project_teacher`, float32: ``r`` numbers instead of ``d_T``), plus
the validity of the position when the tokenizers differ (``position/valid``).

Cache metadata written here: ``bridge`` (:func:`~oprd_cli.bridge.command.bridge_identity`), ``layers``
= the bridge's teacher layers (one entry per supervised layer), ``hidden_size`` = ``r``, and
``alignment`` (``cross_tokenizer``, ``aligned_fraction`` of the stored positions, both tokenizers).
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import numpy as np
import torch

from oprd_cli import models
from oprd_cli.bridge.command import bridge_identity, check_teacher
from oprd_cli.bridge.folder import Bridge
from oprd_cli.bridge.view import TeacherView, teacher_view
from oprd_cli.errors import OprdError

__all__ = ["BridgePass", "bridged_config", "teacher_layers_spec"]


def teacher_layers_spec(bridge: Bridge) -> str:
    """The teacher layers a bridged pass runs: the distinct mapped ones."""
    return ",".join(str(x) for x in sorted(set(bridge.teacher_layers)))


def bridged_config(cfg):
    """``cfg`` (a ``TeacherCacheConfig``) with its layers taken from ``cfg.bridge`` (unchanged without one)."""
    if not getattr(cfg, "bridge", None):
        return cfg
    bridge = Bridge.load(cfg.bridge)
    if cfg.store_dtype not in ("auto", "float32"):
        raise OprdError(f"a bridged cache stores z_T in float32 (r numbers per position); drop --store-dtype "
                        f"{cfg.store_dtype}")
    return replace(cfg, layers=teacher_layers_spec(bridge), store_dtype="float32")


class BridgePass:
    """A bridge checked against the rollout and the loaded teacher, ready to shape a teacher pass."""

    def __init__(self, folder: str, store, tm, logprobs: str):
        self.folder, self.bridge = str(folder), Bridge.load(folder)
        self.tm = tm
        check_teacher(self.bridge, self.folder, tm.describe())
        want = self.bridge.student.get("tokenizer_digest")
        if want and want != store.tokenizer_digest:
            raise OprdError(f"bridge {folder} was fitted for a student with another tokenizer than rollout store "
                            f"{store.path}'s")
        self.cross = tm.tokenizer_digest != store.tokenizer_digest
        if self.cross and logprobs != "none":
            raise OprdError("teacher log-probs across tokenizers are not supported: the two vocabularies score "
                            "different tokens (use --logprobs none with a cross-tokenizer bridge)")
        self.cols = [tm.layers.index(x) for x in self.bridge.teacher_layers]
        self.store = store
        self.view: TeacherView | None = None

    def prepare(self, arrays, layout) -> dict[str, Any]:
        """Build the teacher's view of the rollout; returns the cache metadata entries of the bridge."""
        student_tok = None
        if self.cross:
            name = self.bridge.student.get("name") or self.store.typed_meta.tokenizer_name
            student_tok = models.load_tokenizer(str(name))
            if models.tokenizer_digest(student_tok) != self.store.tokenizer_digest:
                raise OprdError(f"cannot load the student's tokenizer ({name}) to align positions")
        self.view = teacher_view(self.store, arrays, student_tok, self.tm.tokenizer, self.store.tokenizer_digest,
                                 self.tm.tokenizer_digest)
        frac = self.view.aligned_fraction(layout.position_start, layout.num_positions)
        return {"bridge": bridge_identity(self.folder, self.bridge),
                "alignment": {"cross_tokenizer": self.cross, "aligned_fraction": frac,
                              "student_tokenizer_digest": self.store.tokenizer_digest,
                              "teacher_tokenizer_digest": self.tm.tokenizer_digest}}

    @property
    def n_layers(self) -> int:
        return len(self.bridge.teacher_layers)

    def batches(self, layout, unit, budget: int) -> list[list[tuple[int, Any]]]:
        """``(row, SeqRequest)`` batches of a unit (rows without a paired stored position left out)."""
        from oprd_cli.backbone import pack_by_length
        from oprd_cli.teacher_model import SeqRequest

        reqs = []
        for row in unit.rows:
            t0, n = int(layout.position_start[row]), int(layout.num_positions[row])
            idx = self.view.index[row][t0:t0 + n]
            if n == 0 or not (idx >= 0).any():
                continue
            need = int(idx.max()) + 1
            reqs.append((row, SeqRequest(ids=self.view.ids[row][:need], hidden_index=np.where(idx >= 0, idx, 0))))
        groups = pack_by_length([len(q.ids) for _, q in reqs], budget)
        return [[reqs[i] for i in g] for g in groups]

    def finish(self, layout, row: int, hidden: torch.Tensor | None) -> tuple[torch.Tensor, np.ndarray]:
        """What a sample stores: ``z [n, n_sup, r]`` float32 (0 where invalid) and validity ``[n]``."""
        t0, n = int(layout.position_start[row]), int(layout.num_positions[row])
        valid = self.view.index[row][t0:t0 + n] >= 0
        z = torch.zeros((n, self.n_layers, self.bridge.rank), dtype=torch.float32)
        if hidden is not None:
            for j, col in enumerate(self.cols):
                z[:, j] = self.bridge.project_teacher(j, hidden[:, col])
            z[torch.from_numpy(~valid)] = 0.0
        return z, valid
