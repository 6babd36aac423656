"""The fitted bridge: the :class:`Bridge` dataclass and its folder (``bridge.json`` +
``bridge.safetensors``, no pickle), with the checks that a loaded bridge and the models fit."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from oprd_cli.bridge.pca import project_teacher
from oprd_cli.errors import OprdError
from oprd_cli.io import atomic_write_bytes, read_json, url_to_fs, write_json

__all__ = ["BRIDGE_FORMAT", "BRIDGE_FORMAT_VERSION", "BRIDGE_JSON", "BRIDGE_TENSORS", "Bridge"]

BRIDGE_FORMAT = "oprd-bridge"
BRIDGE_FORMAT_VERSION = 1
BRIDGE_JSON = "bridge.json"
BRIDGE_TENSORS = "bridge.safetensors"
_ORTHO_TOL = 1e-3  # |P_T P_T^T - I| allowed on load (float32 storage)


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
        base = str(folder).rstrip("/")
        atomic_write_bytes(f"{base}/{BRIDGE_TENSORS}", data)
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
        write_json(f"{base}/{BRIDGE_JSON}", doc)

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
