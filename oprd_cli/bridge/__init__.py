"""OPRD-Bridge (METHOD.md "OPRD-Bridge"): layer map, teacher PCA, student projectors, the bridge
folder, token alignment. Everything here is a function of tensors, token offsets or a folder; the
commands that run the models (``oprd bridge fit``, the teacher cache, the trainer) call it. The
loss itself is :func:`oprd_cli.losses.bridge_loss`.

- ``layers``: :func:`layer_map`, Eq. 11 as the authors' release computes it.
- ``pca``: :func:`fit_teacher_pca` (``P_T [r, d_T]`` and ``mu_T [d_T]`` from the covariance in
  float64) and :func:`project_teacher` (``z_T = P_T (h_T - mu_T)``, the only place that computes
  it; the cache stores exactly its output).
- ``fit``: stage 1. :func:`sample_rows`, :func:`rows_in_range` (the seeded choice of at most
  ``max_rows`` token rows to fit on: indices into the flat response-token axis of a rollout
  store); :func:`fit_student_proj` (``P_S [r, d_S]`` by Adam on the MSE, Eq. 13, with the
  closed-form least-squares optimum reported beside it); :func:`fit_bridge` (all of it for every
  supervised layer, giving a :class:`Bridge`).
- ``folder``: :class:`Bridge`, the ``bridge.json`` + ``bridge.safetensors`` folder (no pickle).
- ``align``: :func:`align_by_char_offsets`, :func:`align_response_positions`,
  :func:`encode_with_offsets`, :func:`offsets_for_ids`: cross-tokenizer pairing by character
  offsets of the response text.
"""

from oprd_cli.bridge.align import align_by_char_offsets, align_response_positions, encode_with_offsets, offsets_for_ids
from oprd_cli.bridge.fit import DEFAULT_MAX_ROWS, fit_bridge, fit_student_proj, rows_in_range, sample_rows
from oprd_cli.bridge.folder import BRIDGE_FORMAT, BRIDGE_FORMAT_VERSION, BRIDGE_JSON, BRIDGE_TENSORS, Bridge
from oprd_cli.bridge.layers import layer_map
from oprd_cli.bridge.pca import fit_teacher_pca, project_teacher

__all__ = [
    "BRIDGE_FORMAT",
    "BRIDGE_FORMAT_VERSION",
    "BRIDGE_JSON",
    "BRIDGE_TENSORS",
    "Bridge",
    "DEFAULT_MAX_ROWS",
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
