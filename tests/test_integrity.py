"""Checksums end to end (issue 17, point 2): crc32c on every array, one line naming store, array and chunk
when a chunk is corrupt, and `oprd verify` for stores, checkpoints and run directories."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import zarr

from helpers import run_cli
from oprd_cli.stores import common, integrity
from oprd_cli.teacher import cache_rollouts


@pytest.fixture(scope="module")
def run(tmp_path_factory, tiny_dir, aime24_path) -> Path:
    root = tmp_path_factory.mktemp("integrity") / "run"
    run_cli("rollout", "--model", tiny_dir / "qwen2", "--prompts", aime24_path, "--run-dir", root, "--limit", 2,
            "--num-samples", 2, "--max-new-tokens", 8)
    cache_rollouts(str(tiny_dir / "qwen2-b"), root / "rollouts" / "r000001.zarr", root / "cache" / "r000001.zarr",
                   layers="all", positions="last_k", k=4, show_progress=False)
    return root


def flip_byte(store: Path, array: str, offset: int = 10) -> Path:
    """Flip one byte of the first chunk (or shard) file of ``array``."""
    files = sorted(p for p in (store / array / "c").rglob("*") if p.is_file())
    target = files[0]
    data = bytearray(target.read_bytes())
    data[min(offset, len(data) - 1)] ^= 0xFF
    target.write_bytes(bytes(data))
    return target


def copy(src: Path, dest: Path) -> Path:
    shutil.copytree(src, dest)
    return dest


def error_line(result) -> str:
    """The one ``error:`` line a command stopped with (after any progress it had drawn), no traceback."""
    lines = [x for x in result.stderr.strip().splitlines() if x.strip()]
    assert "Traceback" not in result.stderr and [x for x in lines if x.startswith("error:")] == lines[-1:], result.stderr
    return lines[-1]


def test_every_array_of_every_store_carries_crc32c(run):
    for store in (run / "rollouts" / "r000001.zarr", run / "cache" / "r000001.zarr"):
        group = zarr.open_group(str(store), mode="r")
        names = integrity.array_names(group)
        assert len(names) >= 5
        missing = [n for n in names if not integrity.has_checksum(group[n])]
        assert not missing, (store, missing)


def test_corrupt_cache_chunk_stops_train_naming_store_and_chunk(run, tiny_dir, tmp_path):
    mine = copy(run, tmp_path / "run")
    cache = mine / "cache" / "r000001.zarr"
    flip_byte(cache, "hidden")
    out = tmp_path / "out"
    res = run_cli("train", "--cache", cache, "--out", out, "--model", tiny_dir / "qwen2", "--objective", "oprd",
                  "--batch-size", 2, "--max-steps", 2, "--lr", "1e-3", "--save-every", 1, expect=2)
    line = error_line(res)
    assert str(cache) in line and "array hidden" in line and "chunk 0" in line and "crc32c" in line, res.stderr
    # never trained on it: no step was logged, no checkpoint written
    assert not (out / "metrics.jsonl").exists() or not (out / "metrics.jsonl").read_text().strip()
    assert not list((out / "checkpoints").glob("step-*")) if (out / "checkpoints").exists() else True


def test_corrupt_rollout_chunk_stops_teacher_cache_in_one_line(run, tiny_dir, tmp_path):
    rollouts = copy(run / "rollouts" / "r000001.zarr", tmp_path / "r.zarr")
    flip_byte(rollouts, "token/response_ids", offset=6)
    out = tmp_path / "c.zarr"
    res = run_cli("teacher-cache", "--teacher", tiny_dir / "qwen2-b", "--rollouts", rollouts, "--out", out,
                  "--positions", "last", expect=2)
    line = error_line(res)
    assert str(rollouts) in line and "array token/response_ids" in line and "chunk 0" in line, line
    assert not common.is_complete(str(out))


def test_old_store_without_checksums_is_still_read(run, tmp_path):
    """A store written before crc32c (same format version) reads as before; verify notes it."""
    from zarr.codecs import ZstdCodec

    from oprd_cli.stores.rollouts import open_rollouts

    src = run / "rollouts" / "r000001.zarr"
    old = copy(src, tmp_path / "old.zarr")
    g = zarr.open_group(str(old), mode="r+")
    name = "token/logprobs"
    values = g[name][...]
    del g[name]
    g.create_array(name, data=values, chunks=(len(values),), compressors=[ZstdCodec(level=3)])
    assert not integrity.has_checksum(zarr.open_group(str(old), mode="r")[name])
    assert open_rollouts(str(old)).recompute_digest() == open_rollouts(str(src)).content_digest
    res = run_cli("verify", old, "--json", expect=0)
    notes = json.loads(res.stdout)["results"][0]["notes"]
    assert any("token/logprobs" in n and "no crc32c" in n for n in notes)


def test_verify_names_each_problem(run, tiny_dir, tmp_path):
    assert json.loads(run_cli("verify", run, "--json").stdout)["ok"]
    mine = copy(run, tmp_path / "run")
    cache = mine / "cache" / "r000001.zarr"
    flip_byte(cache, "hidden")
    rollouts = mine / "rollouts" / "r000001.zarr"
    (rollouts / common.COMPLETE_MARKER).unlink()
    res = run_cli("verify", mine, expect=1)
    out = res.stdout
    assert f"{cache}: array hidden, chunk 0.0.0" in out and "crc32c checksum mismatch" in out, out
    assert f"{rollouts}: incomplete" in out, out
    # a tampered marker digest
    good = copy(run / "cache" / "r000001.zarr", tmp_path / "good.zarr")
    marker = json.loads((good / common.COMPLETE_MARKER).read_text())
    marker["content_digest"] = "sha256:" + "0" * 64
    (good / common.COMPLETE_MARKER).write_text(json.dumps(marker))
    assert "differs from the marker" in run_cli("verify", good, expect=1).stdout


def test_verify_checkpoint_with_a_missing_file(tiny_dir, tmp_path):
    from oprd_cli.stores.rundir import CHECKPOINT_MARKER

    ck = copy(tiny_dir / "qwen2", tmp_path / "ck")
    (ck / CHECKPOINT_MARKER).write_text(json.dumps({"step": 1}))
    (ck / "trainer_state.pt").write_bytes(b"")
    assert json.loads(run_cli("verify", ck, "--json").stdout)["ok"]
    (ck / "model.safetensors").unlink()
    assert "model.safetensors is missing" in run_cli("verify", ck, expect=1).stdout


def test_a_store_deleted_under_its_reader_is_noticed(run, tmp_path):
    """zarr reads a missing chunk as its fill value: a vanished store must not read as zeros."""
    from oprd_cli.errors import OprdError
    from oprd_cli.stores.cache import open_cache
    from oprd_cli.stores.rollouts import open_rollouts

    cache_path = copy(run / "cache" / "r000001.zarr", tmp_path / "c.zarr")
    rollouts_path = copy(run / "rollouts" / "r000001.zarr", tmp_path / "r.zarr")
    cache, rollouts = open_cache(str(cache_path)), open_rollouts(str(rollouts_path))
    cache.read([0])  # a first read opens everything lazily
    shutil.rmtree(cache_path)
    shutil.rmtree(rollouts_path)
    for read in (lambda: cache.read([1]), lambda: rollouts.read_tokens("response_ids", 0, 1)):
        with pytest.raises(OprdError, match="deleted or replaced while it was being read"):
            read()
