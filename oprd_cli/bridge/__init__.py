"""OPRD-Bridge: layer map, teacher PCA, student projectors, the bridge folder, token alignment.

METHOD.md "OPRD-Bridge". Everything here is a function of tensors, token offsets or a folder; the
commands that run the models (``oprd bridge fit``, the teacher cache, the trainer) call it.

- :func:`layer_map`: Eq. 11 as the authors' release computes it.
- :func:`sample_rows`, :func:`rows_in_range`: the seeded choice of (at most ``max_rows``) token rows
  that stage 1 fits on; indices into the flat response-token axis of a rollout store.
- :func:`fit_teacher_pca`: ``P_T [r, d_T]`` and ``mu_T [d_T]`` from the covariance in float64.
- :func:`project_teacher`: ``z_T = P_T (h_T - mu_T)``, the only place that computes it (the cache
  stores exactly its output).
- :func:`fit_student_proj`: ``P_S [r, d_S]`` by Adam on the MSE (Eq. 13), with the closed-form
  least-squares optimum reported beside it.
- :func:`fit_bridge`: the three above for every supervised layer, giving a :class:`Bridge`.
- :class:`Bridge`: the ``bridge.json`` + ``bridge.safetensors`` folder (no pickle).
- :func:`align_by_char_offsets`, :func:`align_response_positions`, :func:`encode_with_offsets`,
  :func:`offsets_for_ids`: cross-tokenizer pairing by character offsets of the response text.
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from oprd_cli.errors import OprdError
from oprd_cli.io import (
    atomic_target,
    atomic_write_bytes,
    is_local,
    read_json,
    url_to_fs,
    write_json,
)

__all__ = [
    "BRIDGE_FORMAT",
    "BRIDGE_FORMAT_VERSION",
    "Bridge",
    "align_by_char_offsets",
    "align_response_positions",
    "encode_with_offsets",
    "fit_bridge",
    "fit_student_proj",
    "fit_teacher_pca",
    "layer_map",
    "offsets_for_ids",
    "project_teacher",
    "rows_in_range",
    "sample_rows",
]

BRIDGE_FORMAT = "oprd-bridge"
BRIDGE_FORMAT_VERSION = 1
BRIDGE_JSON = "bridge.json"
BRIDGE_TENSORS = "bridge.safetensors"
DEFAULT_MAX_ROWS = 16_384
_ORTHO_TOL = 1e-3  # |P_T P_T^T - I| allowed on load (float32 storage)


# ------------------------------------------------------------------------------------ layer map
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


# ------------------------------------------------------------------------------------ row sampling
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


# ------------------------------------------------------------------------------------ teacher PCA
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


# ------------------------------------------------------------------------------------ student fit
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


# ------------------------------------------------------------------------------------ the bridge
@dataclass
class Bridge:
    """A fitted bridge (frozen after stage 1). Supervised layer ``j`` pairs student HF index
    ``student_layers[j]`` with teacher HF index ``teacher_layers[j]`` through ``teacher_proj[j]``
    ``[r, d_T]``, ``teacher_mean[j]`` ``[d_T]`` and ``student_proj[j]`` ``[r, d_S]`` (float32).

    ``student`` / ``teacher``: identities (``name``, ``n_layers``, ``hidden_size``,
    ``tokenizer_digest``, ``config_digest``, ``weights_digest``, whatever the fit command knows);
    ``stats``: fit statistics (JSON-able). The folder format is in :meth:`save`.
    """

    student_layers: list[int]
    teacher_layers: list[int]
    teacher_proj: list[Tensor]
    teacher_mean: list[Tensor]
    student_proj: list[Tensor]
    student: dict[str, Any] = field(default_factory=dict)
    teacher: dict[str, Any] = field(default_factory=dict)
    stats: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.student_layers = [int(x) for x in self.student_layers]
        self.teacher_layers = [int(x) for x in self.teacher_layers]
        self.teacher_proj = [t.detach().float().contiguous() for t in self.teacher_proj]
        self.teacher_mean = [t.detach().float().contiguous() for t in self.teacher_mean]
        self.student_proj = [t.detach().float().contiguous() for t in self.student_proj]
        self.validate()

    # -- derived
    @property
    def rank(self) -> int:
        return int(self.teacher_proj[0].shape[0])

    @property
    def d_student(self) -> int:
        return int(self.student_proj[0].shape[1])

    @property
    def d_teacher(self) -> int:
        return int(self.teacher_proj[0].shape[1])

    @property
    def cross_tokenizer(self) -> bool:
        """True when the recorded tokenizer digests differ (or one is unknown)."""
        a, b = self.student.get("tokenizer_digest"), self.teacher.get("tokenizer_digest")
        return a is None or b is None or a != b

    def project_teacher(self, j: int, h: Tensor) -> Tensor:
        """:func:`project_teacher` with supervised layer ``j``'s ``P_T, mu_T``: ``[..., d_T] -> [..., r]``."""
        return project_teacher(h, self.teacher_proj[j], self.teacher_mean[j])

    def validate(self, where: str = "bridge") -> None:
        """One-line :class:`OprdError` unless the lists and shapes are consistent."""
        n = len(self.student_layers)
        lens = {len(self.teacher_layers), len(self.teacher_proj), len(self.teacher_mean), len(self.student_proj)}
        if n == 0 or lens != {n}:
            raise OprdError(f"{where}: needs the same non-zero number of student layers, teacher layers and "
                            f"projections, got {n} student layers and {sorted(lens)}")
        if min(self.student_layers) < 1 or min(self.teacher_layers) < 1:
            raise OprdError(f"{where}: layers are HF hidden-state indices 1..L, got {self.student_layers} -> "
                            f"{self.teacher_layers}")
        p0, s0 = self.teacher_proj[0], self.student_proj[0]
        if p0.dim() != 2 or s0.dim() != 2 or p0.shape[0] < 1:
            raise OprdError(f"{where}: teacher_proj.0 must be [r, d_T] and student_proj.0 [r, d_S], got "
                            f"{tuple(p0.shape)} and {tuple(s0.shape)}")
        r, d_t, d_s = p0.shape[0], p0.shape[1], s0.shape[1]
        for j in range(n):
            for name, t, want in (("teacher_proj", self.teacher_proj[j], (r, d_t)),
                                  ("teacher_mean", self.teacher_mean[j], (d_t,)),
                                  ("student_proj", self.student_proj[j], (r, d_s))):
                if tuple(t.shape) != want:
                    raise OprdError(f"{where}: {name}.{j} has shape {list(t.shape)}, expected {list(want)}")
                if not torch.isfinite(t).all():
                    raise OprdError(f"{where}: {name}.{j} contains NaN or inf")
            gram = self.teacher_proj[j].double() @ self.teacher_proj[j].double().T
            if float((gram - torch.eye(r, dtype=torch.float64)).abs().max()) > _ORTHO_TOL:
                raise OprdError(f"{where}: teacher_proj.{j} rows are not orthonormal")

    def check_models(self, d_student: int | None = None, n_student_layers: int | None = None,
                     d_teacher: int | None = None, n_teacher_layers: int | None = None) -> None:
        """One-line :class:`OprdError` when a model does not fit the bridge (hidden size or depth)."""
        for who, d, want_d, n, layers in (("student", d_student, self.d_student, n_student_layers, self.student_layers),
                                          ("teacher", d_teacher, self.d_teacher, n_teacher_layers, self.teacher_layers)):
            if d is not None and int(d) != want_d:
                raise OprdError(f"the bridge was fitted for a {who} of hidden size {want_d}, this {who} has {d}")
            if n is not None and max(layers) > int(n):
                raise OprdError(f"the bridge supervises {who} layer {max(layers)}, this {who} has {n} layers")

    # -- folder
    def _tensors(self) -> dict[str, Tensor]:
        out: dict[str, Tensor] = {}
        for j in range(len(self.student_layers)):
            out[f"teacher_proj.{j}"] = self.teacher_proj[j].cpu().contiguous()
            out[f"teacher_mean.{j}"] = self.teacher_mean[j].cpu().contiguous()
            out[f"student_proj.{j}.weight"] = self.student_proj[j].cpu().contiguous()
        return out

    def save(self, folder: str, overwrite: bool = False) -> None:
        """Write ``folder/bridge.safetensors`` then ``folder/bridge.json`` (both atomically).

        ``bridge.safetensors`` (float32, no pickle): ``teacher_proj.{j}`` ``[r, d_T]``,
        ``teacher_mean.{j}`` ``[d_T]``, ``student_proj.{j}.weight`` ``[r, d_S]`` for supervised layer
        ``j``. ``bridge.json``: ``format``, ``format_version``, ``student_layers``, ``teacher_layers``
        (HF hidden-state indices), ``rank``, ``d_student``, ``d_teacher``, ``cross_tokenizer``,
        ``student``/``teacher`` identities, ``stats``, and ``tensors`` (file name and sha256, so a
        json never pairs with another fit's tensors). The json is written last: a folder without it
        is not a bridge. An existing bridge (or a stray ``bridge.safetensors``) is replaced only
        with ``overwrite``; other files in the folder are never touched; a path that is a file is
        refused.
        """
        from safetensors.torch import save

        self.validate()
        fs, root = url_to_fs(folder)
        json_path, tensors_path = f"{root}/{BRIDGE_JSON}", f"{root}/{BRIDGE_TENSORS}"
        if fs.exists(root) and not fs.isdir(root):
            raise OprdError(f"{folder} is a file, not a folder; choose another --out")
        if fs.exists(json_path) and not overwrite:
            raise OprdError(f"{folder} already holds a bridge; choose another --out or remove it first")
        if fs.exists(tensors_path) and not fs.exists(json_path) and not overwrite:
            raise OprdError(f"{folder} has a {BRIDGE_TENSORS} without {BRIDGE_JSON}; refusing to overwrite it")
        try:
            json.dumps([self.student, self.teacher, self.stats])
        except (TypeError, ValueError) as e:
            raise ValueError(f"Bridge.save: identities and stats must be JSON values ({e})") from None
        data = save(self._tensors(), metadata={"format": BRIDGE_FORMAT, "format_version": str(BRIDGE_FORMAT_VERSION)})
        digest = "sha256:" + hashlib.sha256(data).hexdigest()
        if is_local(folder):
            with atomic_target(tensors_path) as tmp:
                tmp.write_bytes(data)
        else:
            atomic_write_bytes(folder.rstrip("/") + "/" + BRIDGE_TENSORS, data)
        doc = {
            "format": BRIDGE_FORMAT,
            "format_version": BRIDGE_FORMAT_VERSION,
            "student_layers": self.student_layers,
            "teacher_layers": self.teacher_layers,
            "rank": self.rank,
            "d_student": self.d_student,
            "d_teacher": self.d_teacher,
            "cross_tokenizer": self.cross_tokenizer,
            "student": self.student,
            "teacher": self.teacher,
            "stats": self.stats,
            "tensors": {"file": BRIDGE_TENSORS, "sha256": digest},
        }
        target = json_path if is_local(folder) else folder.rstrip("/") + "/" + BRIDGE_JSON
        write_json(target, doc)

    @classmethod
    def load(cls, folder: str) -> Bridge:
        """Read a folder written by :meth:`save`; every problem is a one-line :class:`OprdError`."""
        from safetensors import SafetensorError
        from safetensors.torch import load

        base = str(folder).rstrip("/")
        try:
            doc = read_json(f"{base}/{BRIDGE_JSON}")
        except (ValueError, UnicodeDecodeError):
            raise OprdError(f"{base}/{BRIDGE_JSON} is not valid JSON") from None
        except (IsADirectoryError, NotADirectoryError, PermissionError) as e:
            raise OprdError(f"cannot read bridge {folder}: {e.__class__.__name__}") from None
        if doc is None:
            raise OprdError(f"{folder} is not a bridge folder (no {BRIDGE_JSON}); fit one with `oprd bridge fit`")
        if not isinstance(doc, dict) or doc.get("format") != BRIDGE_FORMAT:
            raise OprdError(f"{base}/{BRIDGE_JSON} is not an oprd bridge")
        if doc.get("format_version") != BRIDGE_FORMAT_VERSION:
            raise OprdError(f"bridge {folder} has format version {doc.get('format_version')!r}; this oprd reads "
                            f"version {BRIDGE_FORMAT_VERSION}")
        fs, root = url_to_fs(base)
        try:
            with fs.open(f"{root}/{BRIDGE_TENSORS}", "rb") as f:
                data = f.read()
        except FileNotFoundError:
            raise OprdError(f"bridge {folder} has no {BRIDGE_TENSORS}") from None
        want = (doc.get("tensors") or {}).get("sha256")
        if want != "sha256:" + hashlib.sha256(data).hexdigest():
            raise OprdError(f"bridge {folder}: {BRIDGE_TENSORS} does not match the digest in {BRIDGE_JSON}")
        try:
            tensors = load(data)
        except (SafetensorError, ValueError, RuntimeError) as e:
            raise OprdError(f"bridge {folder}: {BRIDGE_TENSORS} is not a safetensors file ({e.__class__.__name__})") from None
        try:
            s_layers = [int(x) for x in doc["student_layers"]]
            t_layers = [int(x) for x in doc["teacher_layers"]]
            rank, d_s, d_t = int(doc["rank"]), int(doc["d_student"]), int(doc["d_teacher"])
        except (KeyError, TypeError, ValueError):
            raise OprdError(f"bridge {folder}: {BRIDGE_JSON} lacks layers, rank or dims") from None
        n = len(s_layers)
        expected = {f"{k}.{j}" + (".weight" if k == "student_proj" else "")
                    for j in range(n) for k in ("teacher_proj", "teacher_mean", "student_proj")}
        if set(tensors) != expected:
            extra, missing = sorted(set(tensors) - expected), sorted(expected - set(tensors))
            raise OprdError(f"bridge {folder}: tensors do not match its {n} layers (missing {missing[:3]}, "
                            f"unexpected {extra[:3]})")
        for j in range(n):
            for name, want_shape in ((f"teacher_proj.{j}", (rank, d_t)), (f"teacher_mean.{j}", (d_t,)),
                                     (f"student_proj.{j}.weight", (rank, d_s))):
                t = tensors[name]
                if tuple(t.shape) != want_shape or not t.is_floating_point():
                    raise OprdError(f"bridge {folder}: {name} is {str(t.dtype).removeprefix('torch.')} "
                                    f"{list(t.shape)}, expected float {list(want_shape)}")
        bridge = cls.__new__(cls)
        bridge.student_layers, bridge.teacher_layers = s_layers, t_layers
        bridge.teacher_proj = [tensors[f"teacher_proj.{j}"].float() for j in range(n)]
        bridge.teacher_mean = [tensors[f"teacher_mean.{j}"].float() for j in range(n)]
        bridge.student_proj = [tensors[f"student_proj.{j}.weight"].float() for j in range(n)]
        bridge.student = dict(doc.get("student") or {})
        bridge.teacher = dict(doc.get("teacher") or {})
        bridge.stats = dict(doc.get("stats") or {})
        bridge.validate(where=f"bridge {folder}")
        return bridge


def fit_bridge(
    student_rows: Sequence[Tensor],
    teacher_rows: dict[int, Tensor],
    student_layers: Sequence[int],
    teacher_layers: Sequence[int],
    rank: int,
    epochs: int = 20,
    lr: float = 1e-3,
    seed: int = 0,
    batch_size: int = 256,
    init: str = "default",
    student: dict[str, Any] | None = None,
    teacher: dict[str, Any] | None = None,
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


# ------------------------------------------------------------------------------------ alignment
Offsets = Sequence[tuple[int, int]]


def _completing_ends(offsets: Offsets) -> dict[int, int]:
    """``{end offset: token index}`` for the tokens after which the text up to ``end`` is read whole.

    A token completes its end offset when its span is non-empty and no later non-empty token
    starts before that end. That excludes (a) special tokens and other empty spans, (b) a token
    that stops inside a character: fast byte-level tokenizers give every piece of a split
    multi-byte character the character's whole span, so the next piece starts before the end.
    """
    out: dict[int, int] = {}
    min_later_start = math.inf
    for i in range(len(offsets) - 1, -1, -1):
        start, end = int(offsets[i][0]), int(offsets[i][1])
        if end <= start:
            continue
        if min_later_start >= end and end not in out:
            out[end] = i
        min_later_start = min(min_later_start, start)
    return out


def align_by_char_offsets(student_offsets: Offsets, teacher_offsets: Offsets) -> Tensor:
    """Teacher token index for each student token of the same text, or -1: ``[n_student]`` int64.

    Offsets are ``(start, end)`` character spans of each token in the response text (as a fast
    tokenizer's ``return_offsets_mapping`` gives them). Student token ``i`` is paired with teacher
    token ``j`` when both *complete* the same end offset (see :func:`_completing_ends`): after
    either token, exactly ``text[:end]`` has been read. Every other student token gets -1 and is
    masked, never guessed: special tokens, pieces of a split multi-byte character, and tokens whose
    end falls inside a teacher token (the teacher merges what the student splits).

    This pairs the states that have *read* the paired tokens (the release's position convention,
    ``hidden_states[:, Lp + t]``); for oprd's response positions (index ``Lp - 1 + t``, the state
    that predicts ``y_t``) use :func:`align_response_positions`.
    """
    teacher_end = _completing_ends(teacher_offsets)
    student_end = _completing_ends(student_offsets)
    out = torch.full((len(student_offsets),), -1, dtype=torch.int64)
    for end, i in student_end.items():
        j = teacher_end.get(end)
        if j is not None:
            out[i] = j
    return out


def align_response_positions(student_offsets: Offsets, teacher_offsets: Offsets,
                             n_student_positions: int | None = None,
                             n_teacher_positions: int | None = None) -> Tensor:
    """Teacher response position for each student response position, or -1: ``[n_student_positions]``.

    oprd's response position ``t`` is the state at sequence index ``Lp - 1 + t``, which has read the
    prompt and the tokens ``y_<t``. Position 0 (prompt read, no response text) pairs with the
    teacher's position 0; position ``t > 0`` pairs with teacher position ``j + 1`` when token
    ``y_{t-1}`` is paired with teacher token ``j`` by :func:`align_by_char_offsets`. Pairs whose
    teacher position is ``>= n_teacher_positions`` (default: the teacher's token count) get -1.
    ``n_student_positions`` defaults to the student's token count.
    """
    n_s = len(student_offsets) if n_student_positions is None else int(n_student_positions)
    n_t = len(teacher_offsets) if n_teacher_positions is None else int(n_teacher_positions)
    tokens = align_by_char_offsets(student_offsets, teacher_offsets)
    out = torch.full((n_s,), -1, dtype=torch.int64)
    if n_s > 0 and n_t > 0:
        out[0] = 0
    for t in range(1, min(n_s, len(student_offsets) + 1)):
        j = int(tokens[t - 1])
        if j >= 0 and j + 1 < n_t:
            out[t] = j + 1
    return out


def _require_fast(tokenizer) -> None:
    if not getattr(tokenizer, "is_fast", False):
        raise OprdError(f"cross-tokenizer bridging needs a fast tokenizer (character offsets); "
                        f"{getattr(tokenizer, 'name_or_path', type(tokenizer).__name__)} is not one")


def encode_with_offsets(tokenizer, text: str) -> tuple[list[int], list[tuple[int, int]]]:
    """``(ids, offsets)`` of ``text`` under a fast tokenizer, without special tokens: how the teacher
    reads a response's text (its template adds the prompt around it).

    For a byte-level BPE the offsets are recomputed from the tokens' bytes
    (:func:`offsets_for_ids`), because a ``trim_offsets`` post-processor would move the end of a
    token with trailing whitespace before the whitespace the token has read; elsewhere they are the
    tokenizer's ``offset_mapping``."""
    _require_fast(tokenizer)
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids = list(enc["input_ids"])
    offsets = _byte_level_offsets(tokenizer, ids, text) if _is_byte_level(tokenizer) else None
    if offsets is None:
        offsets = [(int(a), int(b)) for a, b in enc["offset_mapping"]]
    return ids, offsets


@functools.lru_cache(maxsize=1)
def _unicode_to_bytes() -> dict[str, int]:
    """Inverse of GPT-2's byte -> printable character table (byte-level BPE vocabularies are
    written in those characters)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(bs, cs)}


def _is_byte_level(tokenizer) -> bool:
    """True when the fast tokenizer decodes with a ByteLevel decoder (GPT-2 style vocabulary)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    decoder = getattr(backend, "decoder", None)
    return type(decoder).__name__ == "ByteLevel"


def offsets_for_ids(tokenizer, ids: Sequence[int], text: str) -> list[tuple[int, int]] | None:
    """Character spans in ``text`` of the tokens ``ids`` (the student's sampled response), or None.

    ``text`` is the response as the rollout stored it (``decode(ids, skip_special_tokens=True)``);
    special tokens get an empty span. Sampled ids need not be the tokenizer's own tokenisation of
    the text, so offsets are not simply taken from re-encoding:
      - a byte-level BPE (GPT-2, Qwen, Llama 3 style): each token's bytes from the vocabulary,
        mapped to characters of the UTF-8 text (a piece of a split character gets the whole
        character's span, as the fast tokenizers give it); None unless the bytes decode to ``text``;
      - any other fast tokenizer: the ``offset_mapping`` of ``encode(text)`` when that gives the
        same ids (special tokens aside), else None.
    None means the caller masks the sample: no position is guessed.
    """
    _require_fast(tokenizer)
    ids = [int(i) for i in ids]
    if _is_byte_level(tokenizer):
        return _byte_level_offsets(tokenizer, ids, text)
    special = set(getattr(tokenizer, "all_special_ids", []) or [])
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    if list(enc["input_ids"]) != [i for i in ids if i not in special]:
        return None
    out, k, pos = [], 0, 0
    for i in ids:
        if i in special:
            out.append((pos, pos))
        else:
            a, b = enc["offset_mapping"][k]
            out.append((int(a), int(b)))
            pos = int(b)
            k += 1
    return out


def _byte_level_offsets(tokenizer, ids: Sequence[int], text: str) -> list[tuple[int, int]] | None:
    """Offsets of byte-level BPE tokens in ``text`` from their bytes; None unless they decode to it."""
    special = set(getattr(tokenizer, "all_special_ids", []) or [])
    table = _unicode_to_bytes()
    tokens = tokenizer.convert_ids_to_tokens(list(ids))
    pieces: list[bytes] = []
    for i, tok in zip(ids, tokens):
        if i in special or tok is None:
            pieces.append(b"")
            continue
        try:
            pieces.append(bytes(table[c] for c in tok))
        except KeyError:  # an added (non-special) token written in plain text
            pieces.append(tok.encode("utf-8"))
    try:
        decoded = b"".join(pieces).decode("utf-8")
    except UnicodeDecodeError:
        return None
    if decoded != text:
        return None
    char_of_byte: list[int] = []  # index of the character each byte belongs to
    for ci, ch in enumerate(decoded):
        char_of_byte.extend([ci] * len(ch.encode("utf-8")))
    out, b = [], 0
    for piece in pieces:
        if not piece:
            c = char_of_byte[b] if b < len(char_of_byte) else len(decoded)
            out.append((c, c))
            continue
        out.append((char_of_byte[b], char_of_byte[b + len(piece) - 1] + 1))
        b += len(piece)
    return out
