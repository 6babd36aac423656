"""The bridge's layer map: which teacher hidden state each student block is compared with (Eq. 11)."""

from __future__ import annotations

import torch

from oprd_cli.errors import OprdError

__all__ = ["layer_map"]


def layer_map(n_student: int, n_teacher: int) -> list[int]:
    """Teacher HF hidden-state index for each student block ``1..n_student`` (Eq. 11).

    Computed exactly as the release does: the 0-based teacher block is
    ``torch.linspace(0, n_teacher - 1, n_student).round()`` in float32 on the CPU (``round`` is
    half-to-even), plus 1 for the HF index (``hidden_states[0]`` is the embedding output). For 3
    student and 4 teacher blocks that is ``[1, 3, 4]``; equal depths map to themselves.

    One student block (``n_student = 1``, where Eq. 11 divides by zero and ``linspace`` would give
    the teacher's first block) maps to the teacher's last block, as METHOD.md says.

    Float32 ``linspace`` is not exact: on a few pairs (none of the usual depths 12-94; e.g.
    ``(23, 14)``, ``(15, 118)``) a value that is exactly ``k + 0.5`` in rational arithmetic comes out
    a hair above and rounds up where exact half-even would round down. We keep the release's
    numbers, since the point is to supervise the layers its bridges were trained on.
    """
    if n_student < 1 or n_teacher < 1:
        raise OprdError(f"layer map needs at least one block on each side, got {n_student} student and "
                        f"{n_teacher} teacher blocks")
    if n_student == 1:
        return [int(n_teacher)]
    blocks = torch.linspace(0, n_teacher - 1, n_student, dtype=torch.float32, device="cpu").round()
    return [int(b) + 1 for b in blocks.tolist()]
