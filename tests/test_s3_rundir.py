"""A whole run directory on object storage (``--run-dir s3://bucket/run``): rounds, caches, checkpoints,
metrics, locks and ``oprd.toml`` as objects on a moto S3 server started by the test (``test_s3.s3``),
reached through the standard AWS variables. Worker processes share the server (``memory://`` would not)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time

import pytest

from helpers import info_json, run_cli

pytest.importorskip("s3fs")
from test_s3 import BUCKET, ROOT, _oprd_proc, s3  # noqa: E402,F401,F811  (the moto server fixture)


def _keys(s3, prefix: str) -> list[str]:
    s3.invalidate_cache()
    return sorted(k[len(prefix) + 1:] for k in s3.find(prefix))


def _rollout(run: str, model, prompts, *extra):
    return run_cli("rollout", "--run-dir", run, "--prompts", prompts, "--limit", 3, "--num-samples", 2,
                   "--max-new-tokens", 10, *(["--model", model] if model is not None else []), *extra)


@pytest.mark.slow  # about 40-70 s on 2 shared cores (three processes load models)
def test_loop_over_a_run_directory_on_s3(s3, tiny_dir, aime24_path, tmp_path, monkeypatch):
    """rollout -> teacher-cache by two shard worker processes -> train -> rollout from the checkpoint."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))  # where checkpoints are copied to load them
    run, key = f"s3://{BUCKET}/rd1", f"{BUCKET}/rd1"
    _rollout(run, tiny_dir / "qwen2", aime24_path)
    assert info_json(f"{run}/rollouts/r000001.zarr")["complete"]
    assert "student" in s3.cat(f"{key}/oprd.toml").decode()
    procs = [_oprd_proc("teacher-cache", "--teacher", tiny_dir / "qwen2-b", "--run-dir", run, "--logprobs", "sampled",
                        "--unit-tokens", 16, "--shard", f"{i}/2") for i in range(2)]
    for p in procs:
        _, err = p.communicate(timeout=300)
        assert p.returncode == 0, err
    cache = info_json(f"{run}/cache/r000001.zarr")
    assert cache["complete"]
    workers = {json.loads(s3.cat(f))["worker"] for f in s3.glob(f"{key}/cache/r000001.zarr/units/u*.json")}
    assert workers == {"0/2", "1/2"}

    res = run_cli("train", "--run-dir", run, "--max-steps", 2, "--report-to", "tensorboard", expect=2)
    assert "use --report-to none" in res.stderr.strip().splitlines()[-1]  # local event files: refused
    res = run_cli("train", "--run-dir", run, "--max-steps", 2, "--batch-size", 4)  # student from oprd.toml
    assert "trained steps 1..2" in res.stderr
    keys = _keys(s3, key)
    assert "checkpoints/step-000002/oprd_checkpoint.json" in keys
    assert "checkpoints/step-000002/model.safetensors" in keys
    assert not [k for k in keys if k.endswith(".lock")]  # the writer locks were released
    lines = s3.cat(f"{key}/metrics.jsonl").decode().splitlines()
    assert [json.loads(x)["step"] for x in lines] == [1, 2]
    assert {json.loads(x)["cache_path"] for x in lines} == {f"{run}/cache/r000001.zarr"}

    _rollout(run, None, aime24_path)  # the next round samples from the checkpoint on S3
    second = info_json(f"{run}/rollouts/r000002.zarr")
    assert second["complete"]
    assert second["policy"]["step"] == 2 and second["policy"]["model"] == f"{run}/checkpoints/step-000002"
    desc = info_json(run)
    assert desc["kind"] == "run" and desc["rollouts"] == ["r000001.zarr", "r000002.zarr"]
    assert desc["latest_checkpoint"] == f"{run}/checkpoints/step-000002"
    res = run_cli("verify", run)
    assert res.stdout.count("ok") >= 4, res.stdout  # three stores and the checkpoint
    assert list((tmp_path / "xdg" / "oprd" / "remote").glob("*-step-000002/model.safetensors"))  # the local copy

    # the trainer's lock object excludes a second trainer on another process; a killed holder's lock is taken over
    e = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    holder = subprocess.Popen([sys.executable, str(ROOT / "tests" / "train_stall_worker.py"), "300", "--run-dir", run,
                               "--max-steps", "2"], env=e, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True)
    try:
        assert holder.stdout.readline().strip() == "lock held", holder.stderr.read()
        res = run_cli("train", "--run-dir", run, "--max-steps", 2, expect=2)
        assert "is in use by oprd train" in res.stderr.strip().splitlines()[-1]
    finally:
        holder.kill()
        holder.wait(timeout=30)
    s3.invalidate_cache()
    assert s3.exists(f"{key}/oprd-train.lock")  # left behind by the killed process
    res = run_cli("train", "--run-dir", run, "--max-steps", 2)  # takes the stale lock over; nothing new to train
    assert "in use" not in res.stderr
    s3.invalidate_cache()
    assert not s3.exists(f"{key}/oprd-train.lock")


@pytest.mark.slow
def test_killed_worker_in_a_run_directory_on_s3_resumes(s3, tiny_dir, aime24_path, tmp_path):
    run, key = f"s3://{BUCKET}/rd-killed", f"{BUCKET}/rd-killed"
    _rollout(run, tiny_dir / "qwen2", aime24_path)
    ref = tmp_path / "ref.zarr"
    run_cli("teacher-cache", "--teacher", tiny_dir / "qwen2-b", "--rollouts", f"{run}/rollouts/r000001.zarr",
            "--out", ref, "--logprobs", "sampled", "--unit-tokens", 16)
    args = ["teacher-cache", "--teacher", tiny_dir / "qwen2-b", "--run-dir", run, "--logprobs", "sampled",
            "--unit-tokens", 16]
    p = _oprd_proc(*args, pause_before_marker=4)
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and p.poll() is None and not s3.glob(f"{key}/cache/r000001.zarr/units/u*.json"):
        time.sleep(0.2)
        s3.invalidate_cache()
    assert p.poll() is None, p.communicate()[1]
    p.send_signal(signal.SIGKILL)
    p.wait(timeout=30)
    assert info_json(f"{run}/cache/r000001.zarr")["complete"] is False
    run_cli(*args)  # resumes the round: keeps the finished units, redoes the rest
    info = info_json(f"{run}/cache/r000001.zarr")
    assert info["complete"] and info["content_digest"] == info_json(ref)["content_digest"]


def test_writer_lock_on_s3_is_exclusive(s3):
    """The lock object is created with a conditional PUT: a second writer is refused in one line."""
    from oprd_cli.errors import OprdError
    from oprd_cli.lock import WriterLock

    url = f"s3://{BUCKET}/locks/oprd-train.lock"
    with WriterLock(url, "oprd train", "run directory s3://x"):
        assert s3.exists(url[5:])
        with pytest.raises(OprdError, match="is in use by oprd train"):
            WriterLock(url, "oprd rollout", "run directory s3://x").acquire()
    s3.invalidate_cache()
    assert not s3.exists(url[5:])


def test_writer_lock_without_exclusive_create_warns_in_one_line(monkeypatch, capsys):
    """A filesystem not known to honour exclusive create: the lock is written, and one warning line
    says that a second writer is not refused."""
    from oprd_cli import urlpath
    from oprd_cli.lock import WriterLock

    monkeypatch.setattr(urlpath, "EXCLUSIVE_PROTOCOLS", {"s3"})
    url = "memory://oprd-lock-test/run/oprd-train.lock"
    with WriterLock(url, "oprd train", "run directory memory://oprd-lock-test/run"):
        assert urlpath.as_path(url).exists()
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "has no exclusive create" in err and "not refused" in err
    assert not urlpath.as_path(url).exists()


def test_run_directory_on_s3_lists_rounds_and_checkpoints(s3):
    """``RunDir`` on a URL (also one that ``Path`` collapsed to ``s3:/``) lists through fsspec."""
    from pathlib import Path

    from oprd_cli.stores.rundir import RunDir

    key = f"{BUCKET}/rd-list"
    for name in ("rollouts/r000001.zarr/zarr.json", "rollouts/r000001.zarr/oprd_complete.json",
                 "rollouts/r000002.zarr/zarr.json", "checkpoints/step-000003/oprd_checkpoint.json",
                 "checkpoints/step-000004/config.json"):
        s3.pipe(f"{key}/{name}", b"{}")
    run = RunDir(Path(f"s3://{key}"))
    assert str(run.root) == f"s3://{key}"
    assert [i for i, _ in run.rollout_rounds()] == [1]
    assert str(run.next_rollout_path()) == f"s3://{key}/rollouts/r000003.zarr"
    assert [c.step for c in run.checkpoints()] == [3]  # step 4 has no marker: incomplete
    assert str(run.cache_path_for(run.rollout_rounds()[0][1])) == f"s3://{key}/cache/r000001.zarr"


@pytest.mark.slow  # about 30-50 s on 2 shared cores
def test_oprd_loop_over_a_run_directory_on_s3(s3, tiny_dir, aime24_path, tmp_path, monkeypatch):
    """``oprd loop`` runs two rounds on S3; a second invocation finds them done (read back from S3)."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    monkeypatch.chdir(tmp_path)
    run, key = f"s3://{BUCKET}/rd-loop", f"{BUCKET}/rd-loop"
    args = ["loop", "--run-dir", run, "--model", tiny_dir / "qwen2", "--teacher", tiny_dir / "qwen2-b",
            "--prompts", aime24_path, "--rounds", 2, "--limit", 2, "--num-samples", 2, "--max-new-tokens", 4,
            "--batch-size", 4, "--positions", "all", "--prompts-per-round", 1]
    run_cli(*args)
    keys = _keys(s3, key)
    for name in ("rollouts/r000002.zarr/oprd_complete.json", "cache/r000002.zarr/oprd_complete.json",
                 "prompts/r000002.jsonl", "oprd.toml", "loop.jsonl", "metrics.jsonl"):
        assert name in keys, keys
    assert [k for k in keys if k.startswith("checkpoints/") and k.endswith("oprd_checkpoint.json")]
    stages = [json.loads(x)["stage"] for x in s3.cat(f"{key}/loop.jsonl").decode().splitlines()]
    assert stages == ["rollout", "cache", "train"] * 2
    res = run_cli(*args)
    assert "already trained 2 round(s)" in res.stderr
    assert not [p for p in tmp_path.iterdir() if p.name != "xdg"]  # nothing written to a local ./s3:/ folder
    res = run_cli(*args, "--eval-data", aime24_path, "--eval-limit", 1, expect=2)
    assert "evaluate checkpoints with `oprd eval`" in res.stderr.strip().splitlines()[-1]
    ckpt = info_json(run)["latest_checkpoint"]
    assert ckpt.startswith(f"{run}/checkpoints/step-")
    run_cli("eval", "--data", aime24_path, "--model", ckpt, "--limit", 1, "--num-samples", 1, "--max-new-tokens", 4,
            "--out", tmp_path / "e.json")  # a checkpoint on S3 evaluated through its local copy
    assert json.loads((tmp_path / "e.json").read_text())["model"] == ckpt


@pytest.mark.slow  # about 30-50 s on 2 shared cores
def test_teacher_cache_follows_a_run_directory_on_s3(s3, tiny_dir, aime24_path):
    """``teacher-cache --follow`` in another process sees a round that appears on S3 after it started."""
    run, key = f"s3://{BUCKET}/rd-follow", f"{BUCKET}/rd-follow"
    _rollout(run, tiny_dir / "qwen2", aime24_path)
    common = ["--teacher", tiny_dir / "qwen2-b", "--run-dir", run, "--logprobs", "sampled", "--unit-tokens", 16]
    run_cli("teacher-cache", *common)  # round 1
    p = _oprd_proc("teacher-cache", *common, "--follow", "--poll-seconds", 0.3, "--max-rounds", 1)
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(p.stderr), daemon=True)
    reader.start()
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and p.poll() is None and not any("watching" in x for x in lines):
            time.sleep(0.2)
        assert any("watching" in x for x in lines), lines  # it listed the run and found nothing to do
        _rollout(run, tiny_dir / "qwen2", aime24_path)  # round 2 appears
        p.wait(timeout=240)
        reader.join(timeout=10)
    finally:
        if p.poll() is None:
            p.kill()
    err = "".join(lines)
    assert p.returncode == 0, err
    s3.invalidate_cache()
    assert s3.exists(f"{key}/cache/r000002.zarr/oprd_complete.json")


def test_checkpoint_on_s3_uploads_its_marker_last_in_one_put(s3, tiny_dir, monkeypatch):
    """A checkpoint on object storage: files uploaded first, then the marker in one PUT; pruning keeps
    the newest; a second save of the same step replaces it."""
    from oprd_cli import models as M
    from oprd_cli import urlpath
    from oprd_cli.stores.rundir import RunDir
    from oprd_cli.train.checkpoint import prune_checkpoints, read_marker, save_checkpoint

    model = M.load_model(tiny_dir / "qwen2", M.resolve_device("cpu"), M.resolve_dtype("float32", M.resolve_device("cpu")))
    order: list[str] = []

    class Logged:  # the filesystem urlpath uses, recording each file upload
        def __init__(self, fs):
            self.fs = fs

        def __getattr__(self, name):
            return getattr(self.fs, name)

        def put_file(self, lpath, rpath, **kw):
            order.append(rpath.rsplit("/", 1)[-1])
            return self.fs.put_file(lpath, rpath, **kw)

    to_fs, pipe = urlpath.url_to_fs, urlpath.atomic_write_bytes
    monkeypatch.setattr(urlpath, "url_to_fs", lambda url: (lambda fs, p: (Logged(fs), p))(*to_fs(url)))
    monkeypatch.setattr(urlpath, "atomic_write_bytes", lambda path, data: (order.append("PUT " + str(path).rsplit(
        "/", 1)[-1]), pipe(path, data))[1])
    run = RunDir(f"s3://{BUCKET}/rd-ckpt")
    for step in (1, 2, 2):
        order.clear()
        path = save_checkpoint(run.checkpoints_dir, step, model, None, {"step": step}, {"note": step})
        assert order[-1] == "PUT oprd_checkpoint.json" and "model.safetensors" in order
        assert "oprd_checkpoint.json" not in order[:-1]
    assert str(path) == f"s3://{BUCKET}/rd-ckpt/checkpoints/step-000002"
    assert read_marker(path)["step"] == 2 and [c.step for c in run.checkpoints()] == [1, 2]
    assert [p.name for p in prune_checkpoints(run.checkpoints_dir, 1, protect=path)] == ["step-000001"]
    assert [c.step for c in run.checkpoints()] == [2]
    s3.invalidate_cache()
    assert not s3.exists(f"{BUCKET}/rd-ckpt/checkpoints/step-000001")


def test_run_directory_in_a_missing_bucket_is_one_line(s3, tiny_dir, aime24_path, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    run = "s3://no-such-bucket/run"
    res = run_cli("rollout", "--model", tiny_dir / "qwen2", "--prompts", aime24_path, "--run-dir", run, expect=2)
    assert "bucket does not exist" in res.stderr.strip().splitlines()[-1] and "Traceback" not in res.stderr
    for args in (["train"], ["teacher-cache", "--teacher", tiny_dir / "qwen2-b"]):
        res = run_cli(*args, "--run-dir", run, expect=2)
        assert res.stderr.strip().splitlines()[-1] == f"error: run directory {run} does not exist"
    assert not any(tmp_path.iterdir())
