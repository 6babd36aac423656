"""Stores on object storage: a moto S3 server on 127.0.0.1, started by the test, reached through s3fs
with the standard AWS variables (``AWS_ENDPOINT_URL``, keys, region), as a user would configure it.

``memory://`` is per process, so multi-process tests use this server instead."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from helpers import info_json, run_cli

pytest.importorskip("s3fs")
moto_server = pytest.importorskip("moto.server")

ROOT = Path(__file__).resolve().parents[1]
BUCKET = "oprd-test"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def s3():
    """A moto S3 server with one bucket; the AWS variables point every process at it."""
    port = _free_port()
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    env = {"AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}", "AWS_ACCESS_KEY_ID": "test",
           "AWS_SECRET_ACCESS_KEY": "test", "AWS_DEFAULT_REGION": "us-east-1"}
    with pytest.MonkeyPatch.context() as mp:
        for k, v in env.items():
            mp.setenv(k, v)
        import s3fs

        s3fs.S3FileSystem.clear_instance_cache()
        fs = s3fs.S3FileSystem(endpoint_url=env["AWS_ENDPOINT_URL"])
        fs.makedirs(BUCKET, exist_ok=True)  # moto keeps its state per process: another module may have made it
        yield fs
        s3fs.S3FileSystem.clear_instance_cache()
    server.stop()


def _oprd_proc(*args, pause_before_marker: float | None = None) -> subprocess.Popen:
    e = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1",
         "PYTHONPATH": str(ROOT)}
    head = ["-m", "oprd_cli"] if pause_before_marker is None else \
        [str(Path(__file__).with_name("cache_pause_worker.py")), str(pause_before_marker)]
    return subprocess.Popen([sys.executable, *head, *map(str, args)], cwd=ROOT, env=e, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


@pytest.fixture(scope="module")
def rollouts(s3, tiny_dir, aime24_path) -> str:
    url = f"s3://{BUCKET}/run/rollouts/r000001.zarr"
    run_cli("rollout", "--model", tiny_dir / "qwen2", "--prompts", aime24_path, "--out", url, "--limit", 3,
            "--num-samples", 2, "--max-new-tokens", 10)
    return url


@pytest.fixture(scope="module")
def reference(rollouts, tiny_dir, tmp_path_factory) -> str:
    """The content digest of one local worker's cache of the S3 rollouts."""
    out = tmp_path_factory.mktemp("s3ref") / "c.zarr"
    run_cli("teacher-cache", "--teacher", tiny_dir / "qwen2-b", "--rollouts", rollouts, "--out", out,
            "--logprobs", "sampled", "--unit-tokens", 16)
    return info_json(out)["content_digest"]


@pytest.mark.slow  # about 30-60 s on 2 shared cores
def test_rollout_two_shard_workers_and_train_on_s3(s3, rollouts, reference, tiny_dir, tmp_path):
    info = info_json(rollouts)
    assert info["complete"]
    assert s3.exists(f"{rollouts[5:]}/oprd_complete.json")
    cache = f"s3://{BUCKET}/run/cache/r000001.zarr"
    procs = [_oprd_proc("teacher-cache", "--teacher", tiny_dir / "qwen2-b", "--rollouts", rollouts, "--out", cache,
                        "--logprobs", "sampled", "--unit-tokens", 16, "--shard", f"{i}/2") for i in range(2)]
    for p in procs:
        _, err = p.communicate(timeout=300)
        assert p.returncode == 0, err
    info = info_json(cache)
    assert info["complete"] and info["content_digest"] == reference  # the same store as one worker
    workers = {json.loads(s3.cat(f))["worker"] for f in s3.glob(f"{cache[5:]}/units/u*.json")}
    assert workers == {"0/2", "1/2"}
    res = run_cli("train", "--model", tiny_dir / "qwen2", "--cache", cache, "--out", tmp_path / "t",
                  "--max-steps", 2, "--batch-size", 4)
    assert "trained steps 1..2" in res.stderr
    lines = (tmp_path / "t" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(x)["cache_path"] for x in lines] == [cache, cache]


@pytest.mark.slow
def test_killed_worker_on_s3_resumes_to_the_same_store(s3, rollouts, reference, tiny_dir):
    cache = f"s3://{BUCKET}/killed/c.zarr"
    args = ["teacher-cache", "--teacher", tiny_dir / "qwen2-b", "--rollouts", rollouts, "--out", cache,
            "--logprobs", "sampled", "--unit-tokens", 16]
    p = _oprd_proc(*args, pause_before_marker=4)
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and p.poll() is None and not s3.glob(f"{cache[5:]}/units/u*.json"):
        time.sleep(0.2)
        s3.invalidate_cache()
    assert p.poll() is None, p.communicate()[1]
    p.send_signal(signal.SIGKILL)  # inside the next unit's pause: its data may be written, its marker not
    p.wait(timeout=30)
    s3.invalidate_cache()
    assert not s3.exists(f"{cache[5:]}/oprd_complete.json")
    assert info_json(cache)["complete"] is False
    run_cli(*args)  # resumes: keeps the finished units, redoes the rest
    info = info_json(cache)
    assert info["complete"] and info["content_digest"] == reference


def test_rollout_into_a_run_directory_on_object_storage(s3, tiny_dir, aime24_path, tmp_path, monkeypatch):
    """``--run-dir s3://...`` works (it was refused in one line): the round, its marker and ``oprd.toml``
    are objects, and nothing is created locally (no ``./s3:/bucket/run`` folder)."""
    monkeypatch.chdir(tmp_path)
    run = f"s3://{BUCKET}/rd-fast"
    run_cli("rollout", "--model", tiny_dir / "qwen2", "--prompts", aime24_path, "--run-dir", run, "--limit", 2,
            "--num-samples", 1, "--max-new-tokens", 4)
    s3.invalidate_cache()
    assert s3.exists(f"{BUCKET}/rd-fast/rollouts/r000001.zarr/oprd_complete.json")
    assert s3.exists(f"{BUCKET}/rd-fast/oprd.toml")
    assert not s3.exists(f"{BUCKET}/rd-fast/rollouts/.oprd-rollout.lock")  # released
    assert info_json(run)["rollouts"] == ["r000001.zarr"]
    assert not any(tmp_path.iterdir())
