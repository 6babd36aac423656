"""Bad inputs as a corpus (issue 17, point 3): every ``tests/bad_inputs/*.toml`` case runs one real command.

A case names the command line (``args``), the files to create (``[files]`` as text, ``[hexfiles]`` as hex
bytes), fixtures to copy into its folder and changes to make to them (``[[setup]]``), and the fragment
the one error line must contain (``expect``). Every case must exit with status 2, print exactly one
non-empty line on stderr starting with ``error:`` (no traceback), and leave every file that existed
before the command byte for byte unchanged, with no new files beside them unless ``may_create``. A
case found only while data is read (``after_progress``, e.g. NaN inside a cache) may show the progress
drawn so far above its one error line.

Placeholders in args, files and setup values: ``@dir@`` (the case folder), ``@qwen@`` / ``@qwen_b@`` /
``@llama@`` / ``@deep@`` (tiny models), ``@aime@`` (the AIME 2024 jsonl). Fixtures for ``copy``:
``rollouts`` (a complete rollout store of @qwen@, top-4 ids), ``cache`` (its teacher cache from
@qwen_b@: all layers, last 4 positions, top-4 log-probs), ``run`` (a run directory holding both),
``checkpoint`` (a complete checkpoint of @qwen@ trained one step on ``cache``) and the model names.
"""

from __future__ import annotations

import hashlib
import shutil
import tomllib
from pathlib import Path

import numpy as np
import pytest
import zarr

from helpers import run_cli
from oprd_cli.teacher import cache_rollouts

CASES = sorted((Path(__file__).parent / "bad_inputs").glob("*.toml"))


@pytest.fixture(scope="module")
def fixtures(tmp_path_factory, tiny_dir, aime24_path) -> dict:
    root = tmp_path_factory.mktemp("bad_inputs")
    run = root / "run"
    run_cli("rollout", "--model", tiny_dir / "qwen2", "--prompts", aime24_path, "--run-dir", run, "--limit", 2,
            "--num-samples", 2, "--max-new-tokens", 6, "--record-topk", 4)
    rollouts, cache = run / "rollouts" / "r000001.zarr", run / "cache" / "r000001.zarr"
    cache_rollouts(str(tiny_dir / "qwen2-b"), rollouts, cache, layers="all", positions="last_k", k=4,
                   logprobs="topk", topk=4, show_progress=False)
    trained = root / "trained"
    run_cli("train", "--cache", cache, "--out", trained, "--model", tiny_dir / "qwen2", "--batch-size", 4,
            "--max-steps", 1, "--lr", "1e-3")
    return {"rollouts": rollouts, "cache": cache, "run": run, "checkpoint": trained / "checkpoints" / "step-000001",
            "qwen": tiny_dir / "qwen2", "qwen_b": tiny_dir / "qwen2-b", "llama": tiny_dir / "llama",
            "deep": tiny_dir / "qwen2-deep", "aime": aime24_path, "llama_config": tiny_dir / "llama" / "config.json",
            "llama_weights": tiny_dir / "llama" / "model.safetensors", "long": " ".join(["seven"] * 3000)}


def _subst(value, names: dict[str, Path]):
    if isinstance(value, str):
        for k, v in names.items():
            value = value.replace(f"@{k}@", str(v))
        return value
    if isinstance(value, list):
        return [_subst(v, names) for v in value]
    if isinstance(value, dict):
        return {k: _subst(v, names) for k, v in value.items()}
    return value


def _set_attrs(store: Path, values: dict) -> None:
    group = zarr.open_group(str(store), mode="r+")
    meta = dict(group.attrs["oprd"])
    for key, v in values.items():  # dotted keys reach into sub-dicts
        *parents, leaf = key.split(".")
        d = meta
        for p in parents:
            d = d.setdefault(p, {})
        d[leaf] = v
    group.attrs["oprd"] = meta


def _fill(store: Path, array: str, value: str) -> None:
    """Write ``value`` (nan, inf) into the first row of a float array, through zarr (checksums stay valid)."""
    arr = zarr.open_group(str(store), mode="r+")[array]
    row = np.asarray(arr[0:1])
    row[...] = float(value)
    arr[0:1] = row


def _setup(case: dict, folder: Path, fixtures: dict[str, Path]) -> None:
    names = {"dir": folder, **fixtures}
    for step in _subst(case.get("setup", []), names):
        if "copy" in step:
            src, dest = fixtures[step["copy"]], folder / step["to"]
            shutil.copytree(src, dest) if src.is_dir() else shutil.copy(src, dest)
        if "attrs" in step:
            _set_attrs(folder / step["attrs"], step["set"])
        if "fill" in step:
            _fill(folder / step["fill"], step["array"], step["value"])
        if "unlink" in step:
            target = folder / step["unlink"]
            shutil.rmtree(target) if target.is_dir() else target.unlink()
        if "mkdir" in step:
            (folder / step["mkdir"]).mkdir(parents=True, exist_ok=True)
    for name, text in case.get("files", {}).items():
        path = folder / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(_subst(text, names))
    for name, hexdata in case.get("hexfiles", {}).items():
        (folder / name).write_bytes(bytes.fromhex(hexdata))


def _snapshot(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def test_corpus_is_large_and_covers_every_command():
    commands = {tomllib.loads(p.read_text())["args"][0] for p in CASES}
    assert len(CASES) >= 50
    assert {"rollout", "teacher-cache", "train", "eval", "loop", "info", "verify", "report"} <= commands


@pytest.mark.parametrize("case_file", CASES, ids=[p.stem for p in CASES])
def test_bad_input(case_file: Path, fixtures, tmp_path):
    case = tomllib.loads(case_file.read_text())
    folder = tmp_path / "case"
    folder.mkdir()
    _setup(case, folder, fixtures)
    before = _snapshot(folder)
    result = run_cli(*_subst(case["args"], {"dir": folder, **fixtures}), expect=None)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.exit_code == 2, f"exit {result.exit_code}\n{result.stderr}\n{result.stdout}"
    assert "Traceback" not in result.stderr and [x for x in lines if x.startswith("error:")] == lines[-1:], result.stderr
    if not case.get("after_progress"):  # refused before any work: the error is the only output
        assert len(lines) == 1, result.stderr
    assert _subst(case["expect"], {"dir": folder, **fixtures}) in lines[-1], lines[-1]
    after = _snapshot(folder)
    changed = [name for name, digest in before.items() if after.get(name) != digest]
    assert not changed, f"changed or removed: {changed}"
    if not case.get("may_create"):
        assert sorted(set(after) - set(before)) == [], "new files"
