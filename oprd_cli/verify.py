"""``oprd verify STORE|CHECKPOINT|RUN``: check chunks, markers and digests, and name what is wrong.

For a store: the completion marker, every (inner) chunk of every array decoded (its crc32c checked),
and the content digest recomputed from the decoded values and compared with the marker's. For a
checkpoint: its marker, the files the marker and the model config imply, and the safetensors headers.
For a run directory: every round's stores and every checkpoint. Problems are one line each; a store
written before checksums existed is noted, not failed.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from oprd_cli.console import console, progress
from oprd_cli.errors import OprdError
from oprd_cli.stores import common, integrity
from oprd_cli.stores.rundir import CHECKPOINT_MARKER, RunDir
from oprd_cli.urlpath import UrlPath, as_path, local_copy

_CHECKPOINT_FILES = ("config.json", "trainer_state.pt")


def _scan_arrays(path: str, group) -> tuple[list[str], list[str], int]:
    """(problems, notes, chunks checked) of every chunk of every array of ``group``."""
    problems, notes, checked = [], [], 0
    names = integrity.array_names(group)
    with progress(transient=True) as bar:
        task = bar.add_task(f"verify {Path(path).name}", total=len(names))
        for name in names:
            arr = group[name]
            if not integrity.has_checksum(arr):
                notes.append(f"{name}: no crc32c checksums (written by an older oprd)")
            for idx, sel in integrity.chunk_slices(arr):
                checked += 1
                found = _one(arr, sel)
                if found:
                    problems.append(f"{path}: array {name}, {integrity.describe_chunk(idx, sel)} is corrupt "
                                    f"({found})")
            bar.advance(task)
    return problems, notes, checked


def _one(arr, sel) -> str | None:
    try:
        arr[sel]
    except integrity._DECODE_ERRORS as e:
        return integrity._reason(e)
    return None


def verify_store(path: str) -> dict[str, Any]:
    import zarr

    meta = common.read_meta(path)
    kind = meta.get("kind")
    if kind == "rollouts":
        from oprd_cli.stores.rollouts import open_rollouts as opener
    elif kind == "teacher_cache":
        from oprd_cli.stores.cache import open_cache as opener
    else:
        raise OprdError(f"{path} is an oprd store of unknown kind {kind!r}; upgrade oprd")
    store = opener(path, require_complete=False)
    problems, notes, checked = _scan_arrays(path, zarr.open_group(path, mode="r"))
    marker = common.completion(path)
    if marker is None:
        problems.append(f"{path}: incomplete (no {common.COMPLETE_MARKER}); resume or re-run the command that "
                        "writes it")
    elif not problems:
        digest = store.recompute_digest()
        if digest != marker.get("content_digest"):
            problems.append(f"{path}: content digest {digest} differs from the marker's "
                            f"{marker.get('content_digest')}")
    return {"path": path, "kind": kind, "complete": marker is not None, "chunks_checked": checked,
            "problems": problems, "notes": notes}


def verify_checkpoint(path: Path) -> dict[str, Any]:
    problems: list[str] = []
    if not (path / CHECKPOINT_MARKER).exists():
        problems.append(f"{path}: no {CHECKPOINT_MARKER} (an interrupted save)")
    for name in _CHECKPOINT_FILES:
        if not (path / name).is_file():
            problems.append(f"{path}: {name} is missing")
    problems += _check_weights(Path(local_copy(str(path))) if isinstance(path, UrlPath) else path)
    return {"path": str(path), "kind": "checkpoint", "complete": not problems, "problems": problems, "notes": []}


def _check_weights(path: Path) -> list[str]:
    """Every weights file the index names exists and has a readable safetensors header."""
    from safetensors import safe_open

    index = path / "model.safetensors.index.json"
    if index.is_file():
        try:
            files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (ValueError, KeyError) as e:
            return [f"{path}: {index.name} is unreadable ({e})"]
    else:
        files = ["model.safetensors"]
    problems = []
    for name in files:
        f = path / name
        if not f.is_file():
            problems.append(f"{path}: {name} is missing")
            continue
        try:
            with safe_open(str(f), framework="pt") as st:
                list(st.keys())
        except Exception as e:  # safetensors raises its own error types for a damaged header
            problems.append(f"{path}: {name} is unreadable ({type(e).__name__}: {str(e)[:100]})")
    return problems


def verify_path(path: str) -> list[dict[str, Any]]:
    """One result per store or checkpoint at ``path`` (a store, a checkpoint folder or a run directory)."""
    p = as_path(str(path))  # a local folder or an fsspec URL (a run directory on object storage)
    if p.is_dir() and not (p / "zarr.json").exists():
        if (p / CHECKPOINT_MARKER).exists() or (p / "config.json").exists():
            return [verify_checkpoint(p)]
        run = RunDir(p)
        if not any(d.is_dir() for d in (run.rollouts_dir, run.cache_dir, run.checkpoints_dir)):
            raise OprdError(f"{path} is neither an oprd store, a checkpoint nor a run directory")
        out = [verify_store(str(s)) for _, s in run.rollout_rounds(complete_only=False)]
        out += [verify_store(str(s)) for _, s in run.cache_rounds(complete_only=False)]
        if run.checkpoints_dir.is_dir():
            out += [verify_checkpoint(c) for c in sorted(run.checkpoints_dir.iterdir())
                    if c.is_dir() and c.name.startswith("step-")]
        return out
    if not common.exists(str(path)):
        raise OprdError(f"{path} does not exist")
    return [verify_store(str(path))]


def print_results(results: list[dict[str, Any]]) -> None:
    for r in results:
        if r["problems"]:
            for line in r["problems"]:
                console.print(f"[red]BAD[/] {line}", markup=True, highlight=False)
        else:
            extra = f", {r['chunks_checked']} chunks" if "chunks_checked" in r else ""
            console.print(f"[green]ok[/]  {r['path']} ({r['kind']}{extra})", markup=True, highlight=False)
        for note in r["notes"]:
            console.print(f"    note: {note}", highlight=False)


def run_verify(path: str, as_json: bool, show) -> int:
    """``oprd verify``: the results through the CLI's ``show``; the exit status (1 when anything is wrong)."""
    results = verify_path(path)
    ok = not any(r["problems"] for r in results)
    show({"ok": ok, "results": results}, as_json, lambda _: print_results(results))
    return 0 if ok else 1
