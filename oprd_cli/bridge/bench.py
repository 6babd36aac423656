"""``oprd bench cache``'s bridged figure: the same rollouts cached through a bridge (``z_T``, ``r``
numbers per layer and position), its stored bytes per position next to the full cache's.

With ``--bridge`` the given bridge (fitted for this teacher) is used; otherwise a rank-``r`` bridge is
made from the full cache just written (teacher PCA of its rows per cached layer, a placeholder student
projector): the cache's size depends only on the teacher side.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from oprd_cli.bridge.folder import Bridge
from oprd_cli.bridge.pca import fit_teacher_pca

__all__ = ["bridged_cache_size", "per_position"]


def per_position(info: dict[str, Any]) -> dict[str, Any]:
    """Stored (compressed) and raw bytes of ``hidden`` per cached position, all layers, from a cache's ``info()``."""
    values = len(info["layers"]) * int(info["hidden_size"])
    itemsize = {"float32": 4, "bfloat16": 2, "float16": 2}.get(info["encoding"].get("dtype"), 4)
    return {"hidden_size": info["hidden_size"], "layers": len(info["layers"]), "store_dtype": info["encoding"].get("dtype"),
            "stored_bytes_per_position": (info["bytes_per_value"] or 0.0) * values,
            "raw_bytes_per_position": itemsize * values}


def _placeholder_bridge(tm, full_cache, rank: int) -> Bridge:
    rows = full_cache.read(list(range(full_cache.num_samples)))
    mask = rows.mask.bool()
    t_proj, t_mean = [], []
    for j in range(len(full_cache.layers)):
        x = rows.hidden[:, j][mask].float()
        p, mu, _ = fit_teacher_pca(x, min(rank, x.shape[0] - 1, x.shape[1]))
        t_proj.append(p)
        t_mean.append(mu)
    r = t_proj[0].shape[0]
    ident = {"name": tm.name, "n_layers": tm.num_layers, "hidden_size": tm.hidden_size,
             "tokenizer_digest": tm.tokenizer_digest, "weights_digest": tm.weights_digest}
    return Bridge(list(range(1, len(t_proj) + 1)), list(full_cache.layers), t_proj, t_mean,
                  [torch.eye(r) for _ in t_proj], student={"tokenizer_digest": tm.tokenizer_digest}, teacher=ident,
                  stats={"placeholder": "bench cache"})


def bridged_cache_size(tm, rollouts: str, full_cache, workdir: Path, rank: int = 8, bridge: str | None = None,
                       **settings: Any) -> dict[str, Any]:
    """Cache ``rollouts`` through a bridge and return its and the full cache's bytes per position."""
    from oprd_cli.stores.cache import open_cache
    from oprd_cli.teacher import cache_rollouts

    folder = bridge
    if folder is None:
        folder = str(Path(workdir) / "bridge")
        _placeholder_bridge(tm, full_cache, rank).save(folder, overwrite=True)
    out = Path(workdir) / "bridged.zarr"
    cache_rollouts(tm, rollouts, out, bridge=folder, overwrite=True, show_progress=False,
                   **{k: v for k, v in settings.items() if k != "store_dtype"})
    bridged, full = per_position(open_cache(str(out)).info()), per_position(full_cache.info())
    return {"bridge": bridge or "placeholder (teacher PCA of the full cache)", "rank": bridged["hidden_size"],
            "full": full, "bridged": bridged,
            "shrink": full["stored_bytes_per_position"] / bridged["stored_bytes_per_position"]
            if bridged["stored_bytes_per_position"] else None}
