"""The teacher side of the bridge: PCA of one layer's centred hidden states (``P_T``, ``mu_T``)
and the projection ``z_T = P_T (h_T - mu_T)`` that the cache stores and stage 2 compares with."""

from __future__ import annotations

import torch
from torch import Tensor

from oprd_cli.errors import OprdError

__all__ = ["fit_teacher_pca", "project_teacher"]


def fit_teacher_pca(rows: Tensor, rank: int, dtype: torch.dtype = torch.float32,
                    chunk_rows: int = 4096) -> tuple[Tensor, Tensor, Tensor]:
    """PCA of the centred teacher hidden states of one layer (METHOD.md OPRD-Bridge, step 2).

    - ``rows``: ``[N, d_T]`` hidden states at sampled response positions, any float dtype/device.
    - returns ``P_T [r, d_T]`` (rows: the top-``r`` unit eigenvectors of the covariance, by
      decreasing eigenvalue), ``mu_T [d_T]`` (the row mean), both in ``dtype`` on ``rows``' device,
      and ``explained [r]`` float64: the fraction of the total variance (trace of the covariance)
      each component captures.

    The mean and the covariance ``(X - mu)^T (X - mu) / (N - 1)`` are accumulated in float64 over
    chunks of ``chunk_rows`` rows (two passes; no float64 copy of all rows, and no
    ``E[x x^T] - mu mu^T`` cancellation, which matters with the large-mean channels of real hidden
    states), then ``torch.linalg.eigh``. Sign convention: each row of ``P_T`` is flipped so that its
    entry of largest magnitude (the first such, on a tie) is positive; the result is deterministic.
    """
    if rows.dim() != 2:
        raise OprdError(f"teacher PCA needs rows of shape [N, d], got {tuple(rows.shape)}")
    n, d = rows.shape
    if not 1 <= rank <= d:
        raise OprdError(f"bridge rank {rank} must be between 1 and the teacher's hidden size {d}")
    if n <= rank:
        raise OprdError(f"teacher PCA of rank {rank} needs more than {rank} token rows, got {n} "
                        "(sample more rollouts or lower --rank)")
    mean = torch.zeros(d, dtype=torch.float64, device=rows.device)
    for i in range(0, n, chunk_rows):
        mean += rows[i:i + chunk_rows].to(torch.float64).sum(dim=0)
    mean /= n
    if not torch.isfinite(mean).all():
        raise OprdError("teacher hidden states contain NaN or inf; cannot fit the bridge")
    cov = torch.zeros(d, d, dtype=torch.float64, device=rows.device)
    for i in range(0, n, chunk_rows):
        x = rows[i:i + chunk_rows].to(torch.float64) - mean
        cov += x.T @ x
    cov /= n - 1
    evals, evecs = torch.linalg.eigh(cov)  # ascending
    top = evecs[:, -rank:].flip(-1).T.contiguous()  # [r, d], decreasing eigenvalue
    top_vals = evals[-rank:].flip(-1).clamp_min(0.0)
    top = _sign_fix(top)
    total = torch.diagonal(cov).sum()
    explained = top_vals / total if float(total) > 0 else torch.zeros_like(top_vals)
    return top.to(dtype), mean.to(dtype), explained


def _sign_fix(vecs: Tensor) -> Tensor:
    """Flip each row so that its largest-magnitude entry (first on a tie) is positive."""
    idx = vecs.abs().argmax(dim=-1, keepdim=True)
    sign = torch.sign(torch.gather(vecs, -1, idx))
    sign[sign == 0] = 1
    return vecs * sign


def project_teacher(h: Tensor, proj: Tensor, mean: Tensor, out_dtype: torch.dtype = torch.float32) -> Tensor:
    """``z_T = P_T (h_T - mu_T)``: ``h [..., d_T]``, ``proj [r, d_T]``, ``mean [d_T]`` -> ``[..., r]``.

    Computed as ``((h - mu) @ P_T^T)`` in float64 and rounded once to ``out_dtype``. Float64 makes
    the stored value independent of how rows were batched (a float32 GEMM's summation order
    depends on the batch shape and the BLAS; its float64 rounding almost never survives the final
    cast), so a cache written in any batching holds, bit for bit, what this function returns for
    the same hidden states. The cost is negligible: ``r`` is 4-8.
    """
    if h.shape[-1] != proj.shape[-1] or mean.shape != proj.shape[-1:]:
        raise OprdError(f"teacher projection expects hidden size {proj.shape[-1]}, got {h.shape[-1]}")
    x = h.to(torch.float64) - mean.to(device=h.device, dtype=torch.float64)
    return (x @ proj.to(device=h.device, dtype=torch.float64).T).to(out_dtype)
