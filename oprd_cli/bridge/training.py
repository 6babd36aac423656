"""The bridge in ``oprd train --bridge``: which caches it accepts and the teacher targets it trains on.

- A cache projected with a bridge (``meta["bridge"]``) is accepted only with ``--bridge`` and only
  with that same bridge (same :func:`~oprd_cli.bridge.command.bridge_identity` digest); its ``hidden`` rows are ``z_T`` already.
- An unprojected cache of the bridge's teacher (same hidden size, holding every mapped teacher layer)
  is projected on the fly with the bridge's ``P_T``, ``mu_T`` (:func:`project_teacher`, the function the
  cache pass uses, so both give the same ``z_T`` bit for bit from the same states).
- Teacher log-prob objectives on a cross-tokenizer cache are refused (the vocabularies differ).
"""

from __future__ import annotations

import torch

from oprd_cli.bridge.command import bridge_identity, check_teacher
from oprd_cli.bridge.folder import Bridge
from oprd_cli.errors import OprdError

__all__ = ["check_cache", "check_student", "load_for_training", "refuse_bridged_cache", "teacher_targets"]


def load_for_training(folder: str | None) -> Bridge | None:
    return Bridge.load(folder) if folder else None


def check_student(bridge: Bridge, folder: str, tokenizer_digest: str, n_layers: int, width: int) -> None:
    bridge.check_models(d_student=width, n_student_layers=n_layers)
    fitted = bridge.student.get("n_layers")
    if fitted and int(fitted) != int(n_layers):
        raise OprdError(f"bridge {folder} was fitted for a student of {fitted} layers (its layer map), this student "
                        f"has {n_layers}; fit a bridge for it")
    want = bridge.student.get("tokenizer_digest")
    if want and want != tokenizer_digest:
        raise OprdError(f"bridge {folder} was fitted for a student with another tokenizer than this student's")


def refuse_bridged_cache(cache) -> None:
    """A projected cache holds ``z_T``, not hidden states: it trains only through its bridge."""
    if cache.meta.get("bridge"):
        raise OprdError(f"cache {cache.path} holds teacher states projected through bridge "
                        f"{cache.meta['bridge'].get('path')}; train it with --bridge")


def check_cache(bridge: Bridge, folder: str, cache, objective: str) -> None:
    """One-line refusal unless ``cache`` can be trained through ``bridge``."""
    check_teacher(bridge, folder, cache.teacher)
    meta = cache.meta
    if (meta.get("alignment") or {}).get("cross_tokenizer") and objective != "oprd":
        raise OprdError(f"--objective {objective} needs teacher log-probs of the student's tokens, and cache "
                        f"{cache.path} comes from a teacher with another tokenizer; use --objective oprd")
    recorded = meta.get("bridge")
    if recorded:
        if recorded.get("digest") != bridge_identity(folder, bridge)["digest"]:
            raise OprdError(f"cache {cache.path} was projected with another bridge ({recorded.get('path')}) than "
                            f"{folder}; train it with that bridge or re-run `oprd teacher-cache --bridge {folder}`")
        return
    missing = sorted(set(bridge.teacher_layers) - set(cache.layers))
    if missing or cache.hidden_size != bridge.d_teacher:
        raise OprdError(f"cache {cache.path} (layers {cache.layers}, hidden size {cache.hidden_size}) lacks the "
                        f"bridge's teacher layers {missing or bridge.teacher_layers} of hidden size {bridge.d_teacher}")


def teacher_targets(bridge: Bridge, cache, teacher_hidden: torch.Tensor) -> torch.Tensor:
    """``z_T [b, n_sup, P, r]`` from a micro-batch's ``teacher_hidden [b, Lc, P, d]``: as stored for a
    projected cache, projected here (float32) for an unprojected one."""
    if cache.meta.get("bridge"):
        return teacher_hidden
    cols = [list(cache.layers).index(x) for x in bridge.teacher_layers]
    return torch.stack([bridge.project_teacher(j, teacher_hidden[:, c]) for j, c in enumerate(cols)], dim=1)

