"""Stage 1 of the bridge (both models frozen): the token rows it fits on, the student projector
``P_S`` (Eq. 13) and :func:`fit_bridge`, which fits every supervised layer into a :class:`Bridge`."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

from oprd_cli.bridge.folder import Bridge
from oprd_cli.bridge.pca import fit_teacher_pca, project_teacher
from oprd_cli.errors import OprdError

__all__ = ["DEFAULT_MAX_ROWS", "fit_bridge", "fit_student_proj", "rows_in_range", "sample_rows"]

DEFAULT_MAX_ROWS = 16_384


def sample_rows(n_rows: int, max_rows: int = DEFAULT_MAX_ROWS, seed: int = 0) -> Tensor:
    """Sorted int64 indices of at most ``max_rows`` of ``n_rows`` rows, drawn without replacement.

    All rows (``arange(n_rows)``) when ``n_rows <= max_rows``; otherwise a seeded uniform subset
    (``torch.randperm`` on a CPU generator seeded with ``seed``), so the same seed and row count
    always give the same rows on any machine. The indices address the flat response-token axis
    (student positions) of a rollout store; the student and teacher rows of a fit are the same
    positions, so one call serves both models.
    """
    if n_rows < 0 or max_rows < 1:
        raise OprdError(f"cannot sample {max_rows} of {n_rows} rows (--max-rows must be at least 1)")
    if n_rows <= max_rows:
        return torch.arange(n_rows, dtype=torch.int64)
    g = torch.Generator(device="cpu").manual_seed(int(seed))
    return torch.randperm(n_rows, generator=g)[:max_rows].sort().values


def rows_in_range(indices: Tensor, start: int, stop: int) -> Tensor:
    """The sampled ``indices`` (sorted, from :func:`sample_rows`) that fall in ``[start, stop)``,
    shifted to be local to that range: for picking the sampled rows out of one streamed batch."""
    lo = int(torch.searchsorted(indices, torch.tensor(start, dtype=indices.dtype)))
    hi = int(torch.searchsorted(indices, torch.tensor(stop, dtype=indices.dtype)))
    return indices[lo:hi] - start


def _row_cosine(a: Tensor, b: Tensor) -> Tensor:
    """Mean over rows of cos(a_i, b_i); ``a, b [N, r]`` (norms clamped at 1e-12)."""
    na = a.norm(dim=-1).clamp_min(1e-12)
    nb = b.norm(dim=-1).clamp_min(1e-12)
    return ((a * b).sum(dim=-1) / (na * nb)).mean()


def _lstsq(x: Tensor, y: Tensor, chunk_rows: int = 4096) -> Tensor:
    """Closed-form ``W [r, d_S]`` minimising ``||x W^T - y||^2`` (normal equations in float64 with a
    ridge of 1e-10 * mean diagonal, enough to make rank-deficient inputs solvable)."""
    d = x.shape[1]
    xtx = torch.zeros(d, d, dtype=torch.float64, device=x.device)
    xty = torch.zeros(d, y.shape[1], dtype=torch.float64, device=x.device)
    for i in range(0, x.shape[0], chunk_rows):
        xc = x[i:i + chunk_rows].to(torch.float64)
        xtx += xc.T @ xc
        xty += xc.T @ y[i:i + chunk_rows].to(torch.float64)
    ridge = 1e-10 * float(torch.diagonal(xtx).mean().clamp_min(1e-30))
    xtx += ridge * torch.eye(d, dtype=torch.float64, device=x.device)
    return torch.linalg.solve(xtx, xty).T  # [r, d]


def _fit_metrics(x: Tensor, y: Tensor, w: Tensor, chunk_rows: int = 4096) -> tuple[float, float]:
    """(MSE averaged over rows and the r features, mean row cosine) of ``x W^T`` against ``y``."""
    se, cos, n = 0.0, 0.0, x.shape[0]
    for i in range(0, n, chunk_rows):
        p = x[i:i + chunk_rows].to(torch.float64) @ w.to(torch.float64).T
        t = y[i:i + chunk_rows].to(torch.float64)
        se += float((p - t).square().sum())
        cos += float(_row_cosine(p, t)) * p.shape[0]
    return se / max(n * y.shape[1], 1), cos / max(n, 1)


def fit_student_proj(
    h_student: Tensor,
    z_teacher: Tensor,
    epochs: int = 20,
    lr: float = 1e-3,
    seed: int = 0,
    batch_size: int = 256,
    init: str = "default",
    on_epoch: Callable[[int, float], None] | None = None,
) -> tuple[Tensor, dict[str, float]]:
    """Train ``P_S [r, d_S]`` so that ``P_S h_S ~ z_T`` (Eq. 13); both models are frozen.

    - ``h_student``: ``[N, d_S]`` student hidden states at the sampled rows; ``z_teacher``: ``[N, r]``
      the teacher's projections :func:`project_teacher` at the same rows (paired row by row).
    - A plain bias-free linear map (Eq. 13 has no bias: ``z_T`` is centred, and a bias would move
      the direction that stage 2 compares), trained with Adam (``lr``) on the MSE averaged over the
      ``r`` features and the mini-batch, for ``epochs`` passes over the rows in a seeded order.
      Runs in float32 on ``h_student``'s device.
    - ``init="default"`` (the paper): ``nn.Linear``'s uniform ``+-1/sqrt(d_S)`` initialisation from
      a generator seeded with ``seed``. ``init="lstsq"``: start from the closed-form least-squares
      optimum (with ``epochs=0`` that optimum is the result).
    - ``on_epoch(epoch, mean_batch_loss)`` is called after every epoch (for a progress bar).

    Returns ``(weight [r, d_S] float32, stats)`` with ``stats``: ``mse`` and ``cosine`` (mean over
    rows of ``cos(P_S h_S, z_T)``, the stage-2 quantity) of the result over all rows;
    ``lstsq_mse``/``lstsq_cosine`` of the closed-form optimum on the same rows (the best any linear
    map reaches on them: a check that the training converged; ``lstsq_gap`` = ``lstsq_cosine -
    cosine``, which a command should warn about when it is large); ``r2`` = 1 - mse / mean var(z_T);
    ``rows``, ``epochs``.

    Why Adam and not only the closed form: it is what the paper does (20 epochs of a linear layer),
    and early stopping from a small initialisation is an implicit regulariser. Measured (2-core CPU):
    on tiny random Qwen2/Llama pairs (16,384 rows, d_S 64, r 8) lr 1e-3 ends within 0.001 cosine of
    the optimum; on synthetic data whose map needs larger weights (|W| ~ 1) lr 1e-3 stops at cosine
    0.92 after 20 epochs of 4,096 rows while lr 1e-2 reaches the optimum, hence ``lstsq_gap``.
    """
    if h_student.dim() != 2 or z_teacher.dim() != 2 or h_student.shape[0] != z_teacher.shape[0]:
        raise OprdError(f"student fit needs paired rows [N, d_S] and [N, r], got {tuple(h_student.shape)} "
                        f"and {tuple(z_teacher.shape)}")
    if init not in ("default", "lstsq"):
        raise ValueError(f"init must be 'default' or 'lstsq', got {init!r}")
    n, d_s = h_student.shape
    r = z_teacher.shape[1]
    if n < 1:
        raise OprdError("student fit needs at least one token row")
    if not torch.isfinite(h_student).all():
        raise OprdError("student hidden states contain NaN or inf; cannot fit the bridge")
    device = h_student.device
    x = h_student.float()
    y = z_teacher.to(device=device, dtype=torch.float32)
    w_ls = _lstsq(x, y)
    g = torch.Generator(device="cpu").manual_seed(int(seed))
    if init == "lstsq":
        w0 = w_ls.float()
    else:
        bound = 1.0 / math.sqrt(d_s)
        w0 = (torch.rand(r, d_s, generator=g, dtype=torch.float32) * 2 - 1) * bound
    weight = torch.nn.Parameter(w0.to(device).clone())
    opt = torch.optim.Adam([weight], lr=lr)
    bs = max(1, int(batch_size))
    for epoch in range(int(epochs)):
        order = torch.randperm(n, generator=g).to(device)
        total, batches = 0.0, 0
        for i in range(0, n, bs):
            idx = order[i:i + bs]
            loss = torch.nn.functional.mse_loss(x[idx] @ weight.T, y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total += float(loss.detach())
            batches += 1
        if on_epoch is not None:
            on_epoch(epoch, total / max(batches, 1))
    w = weight.detach().float().contiguous()
    mse, cos = _fit_metrics(x, y, w)
    ls_mse, ls_cos = _fit_metrics(x, y, w_ls)
    var = float(y.double().var(dim=0, unbiased=False).mean()) if n > 1 else 0.0
    stats = {
        "rows": int(n),
        "epochs": int(epochs),
        "mse": mse,
        "cosine": cos,
        "r2": 1.0 - mse / var if var > 0 else 0.0,
        "lstsq_mse": ls_mse,
        "lstsq_cosine": ls_cos,
        "lstsq_gap": ls_cos - cos,
    }
    return w, stats


def fit_bridge(
    student_rows: Sequence[Tensor], teacher_rows: dict[int, Tensor],
    student_layers: Sequence[int], teacher_layers: Sequence[int], rank: int,
    epochs: int = 20, lr: float = 1e-3, seed: int = 0, batch_size: int = 256, init: str = "default",
    student: dict[str, Any] | None = None, teacher: dict[str, Any] | None = None,
    on_layer: Callable[[int, dict[str, Any]], None] | None = None,
    on_epoch: Callable[[int, int, float], None] | None = None,
) -> Bridge:
    """Stage 1 on gathered rows: PCA per distinct teacher layer, then one student projector per
    supervised layer.

    - ``student_rows[j]``: ``[N, d_S]`` student states at student layer ``student_layers[j]``;
    - ``teacher_rows[l]``: ``[N, d_T]`` teacher states at teacher HF index ``l``, for every ``l`` in
      ``teacher_layers`` (row ``i`` of every tensor is the same aligned token);
    - ``on_layer(j, layer_stats)`` after each supervised layer; ``on_epoch(j, epoch, loss)`` per epoch.

    A teacher layer that several student layers map to (``L_S > L_T``) gets one PCA.
    ``stats["layers"][j]``: ``student_layer``, ``teacher_layer``, ``explained_variance`` (per
    component), ``explained_variance_total`` and the :func:`fit_student_proj` statistics.
    """
    if len(student_rows) != len(student_layers) or len(teacher_layers) != len(student_layers):
        raise OprdError("fit_bridge: one row tensor and one teacher layer per student layer are needed")
    pcas: dict[int, tuple[Tensor, Tensor, Tensor]] = {}
    for t_layer in dict.fromkeys(int(x) for x in teacher_layers):
        if t_layer not in teacher_rows:
            raise OprdError(f"fit_bridge: no teacher rows for teacher layer {t_layer}")
        pcas[t_layer] = fit_teacher_pca(teacher_rows[t_layer], rank)
    t_proj, t_mean, s_proj, layer_stats = [], [], [], []
    for j, (s_layer, t_layer) in enumerate(zip(student_layers, teacher_layers)):
        p, mu, explained = pcas[int(t_layer)]
        z = project_teacher(teacher_rows[int(t_layer)], p, mu)
        cb = (lambda e, loss, j=j: on_epoch(j, e, loss)) if on_epoch is not None else None
        w, st = fit_student_proj(student_rows[j], z, epochs=epochs, lr=lr, seed=seed + j,
                                 batch_size=batch_size, init=init, on_epoch=cb)
        st = {"student_layer": int(s_layer), "teacher_layer": int(t_layer),
              "explained_variance": [float(v) for v in explained],
              "explained_variance_total": float(explained.sum()), **st}
        t_proj.append(p)
        t_mean.append(mu)
        s_proj.append(w)
        layer_stats.append(st)
        if on_layer is not None:
            on_layer(j, st)
    stats = {"rank": int(rank), "epochs": int(epochs), "lr": float(lr), "seed": int(seed),
             "batch_size": int(batch_size), "init": init, "layers": layer_stats}
    return Bridge(list(student_layers), list(teacher_layers), t_proj, t_mean, s_proj,
                  student=dict(student or {}), teacher=dict(teacher or {}), stats=stats)
