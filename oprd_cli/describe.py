"""``oprd info``: describe any store, checkpoint or run directory.

Dispatches on the store's recorded kind to the module that owns that format.
"""

from __future__ import annotations

from typing import Any

from rich.table import Table

from oprd_cli.console import console
from oprd_cli.errors import OprdError
from oprd_cli.stores import common
from oprd_cli.stores.rundir import CHECKPOINT_MARKER, RunDir
from oprd_cli.urlpath import as_path


def describe(path: str, verify: bool = False) -> dict[str, Any]:
    p = as_path(str(path))  # a local folder or an fsspec URL (a run directory on object storage)
    if p.is_dir() and (p / CHECKPOINT_MARKER).exists():
        return {"path": str(path), "kind": "checkpoint", **(common.read_json(str(p / CHECKPOINT_MARKER)) or {})}
    if p.is_dir() and not (p / "zarr.json").exists():
        if any((p / d).is_dir() for d in ("rollouts", "cache", "checkpoints")) or (p / "oprd.toml").exists():
            return _describe_run(RunDir(p))
        raise OprdError(f"{path} is neither an oprd store, a checkpoint nor a run directory")
    if not common.exists(str(path)):
        raise OprdError(f"{path} does not exist")
    meta = common.read_meta(str(path))
    kind = meta.get("kind")
    if kind == "rollouts":
        from oprd_cli.stores.rollouts import open_rollouts

        store = open_rollouts(str(path), require_complete=False)
        desc = store.info()
        if verify:
            desc["verified"] = store.complete and store.recompute_digest() == store.content_digest
        return desc
    if kind == "teacher_cache":
        from oprd_cli.stores.cache import open_cache

        cache = open_cache(str(path), require_complete=False)
        desc = cache.info()
        if verify:
            desc["verified"] = cache.verify()
        return desc
    raise OprdError(f"{path} is an oprd store of unknown kind {kind!r}; upgrade oprd")


def _describe_run(run: RunDir) -> dict[str, Any]:
    latest = run.latest_checkpoint()
    return {
        "path": str(run.root),
        "kind": "run",
        "rollouts": [p.name for _, p in run.rollout_rounds(complete_only=True)],
        "incomplete_rollouts": [p.name for _, p in run.rollout_rounds(complete_only=False)
                                if not common.is_complete(str(p))],
        "caches": [p.name for _, p in run.cache_rounds(complete_only=True)],
        "checkpoints": [c.path.name for c in run.checkpoints()],
        "latest_checkpoint": str(latest.path) if latest else None,
        "has_config": run.config_path.exists(),
    }


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    if isinstance(v, dict):
        return ", ".join(f"{k}={_fmt(x)}" for k, x in v.items())
    if isinstance(v, list) and len(v) > 12:
        return f"[{', '.join(map(str, v[:6]))}, ... {len(v)} items]"
    return str(v)


def print_description(desc: dict[str, Any]) -> None:
    table = Table(title=f"{desc.get('kind')}: {desc.get('path')}", show_header=False, title_justify="left")
    table.add_column("key", style="bold")
    table.add_column("value", overflow="fold")
    for k, v in desc.items():
        if k in ("path",):
            continue
        table.add_row(k, _fmt(v))
    console.print(table)
