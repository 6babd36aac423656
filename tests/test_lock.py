"""Two writers (issue 17, point 5): a second trainer on one run directory, or a second rollout into the same
round, is refused in one line naming the holder's host and pid; a stale lock of a killed process is taken
over, and when several processes find one stale lock exactly one of them wins."""

from __future__ import annotations

import json
import multiprocessing
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from helpers import run_cli
from oprd_cli.errors import OprdError
from oprd_cli.lock import WriterLock, _start_ticks
from oprd_cli.teacher import cache_rollouts
from oprd_cli.train.run import TRAIN_LOCK

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def run(tmp_path_factory, tiny_dir, aime24_path) -> Path:
    root = tmp_path_factory.mktemp("lock") / "run"
    run_cli("rollout", "--model", tiny_dir / "qwen2", "--prompts", aime24_path, "--run-dir", root, "--limit", 2,
            "--num-samples", 2, "--max-new-tokens", 6)
    cache_rollouts(str(tiny_dir / "qwen2-b"), root / "rollouts" / "r000001.zarr", root / "cache" / "r000001.zarr",
                   layers="all", positions="last_k", k=4, show_progress=False)
    return root


def _env():
    e = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}
    e["PYTHONPATH"] = os.pathsep.join([str(ROOT), *filter(None, [e.get("PYTHONPATH")])])
    return e


def _wait_for(path: Path, proc, timeout: float = 120) -> None:
    t0 = time.monotonic()
    while not path.exists():
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() - t0 < timeout, "the first trainer never took the lock"
        time.sleep(0.1)


def test_second_trainer_is_refused_then_a_killed_holder_is_taken_over(run, tiny_dir):
    lock = run / TRAIN_LOCK
    args = ["--run-dir", run, "--model", tiny_dir / "qwen2", "--batch-size", 4, "--max-steps", 1, "--lr", "1e-3"]
    first = subprocess.Popen([sys.executable, str(ROOT / "tests" / "train_stall_worker.py"), "300", *map(str, args)],
                             cwd=ROOT, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        _wait_for(lock, first)
        res = run_cli("train", *args, expect=2)
        line = res.stderr.strip()
        assert line.startswith("error:") and len(line.splitlines()) == 1, res.stderr
        assert f"pid {first.pid} on {socket.gethostname()}" in line and "in use by oprd train" in line, line
        assert not (run / "checkpoints").exists()  # the refused trainer wrote nothing
    finally:
        first.send_signal(signal.SIGKILL)
        first.communicate()
    assert json.loads(lock.read_text())["pid"] == first.pid  # the killed holder's lock is left behind ...
    run_cli("train", *args)  # ... and taken over
    assert (run / "checkpoints" / "step-000001").is_dir() and not lock.exists()


def test_second_rollout_into_the_same_round_is_refused(tiny_dir, aime24_path, tmp_path):
    out = tmp_path / "r.zarr"
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(300)"])
    try:
        info = {"host": socket.gethostname(), "pid": holder.pid, "started": _start_ticks(holder.pid),
                "command": "oprd rollout", "since": "now"}
        (tmp_path / ".r.zarr.lock").write_text(json.dumps(info))
        args = ["rollout", "--model", tiny_dir / "qwen2", "--prompts", aime24_path, "--out", out, "--limit", 1,
                "--num-samples", 1, "--max-new-tokens", 4]
        line = run_cli(*args, expect=2).stderr.strip()
        assert f"pid {holder.pid} on {socket.gethostname()}" in line and not out.exists(), line
        # a run directory: the lock is on its rollouts/ folder, whichever round the second one would pick
        (tmp_path / "run" / "rollouts").mkdir(parents=True)
        (tmp_path / "run" / "rollouts" / ".oprd-rollout.lock").write_text(json.dumps(info))
        line = run_cli(*args[:5], "--run-dir", tmp_path / "run", *args[7:], expect=2).stderr.strip()
        assert f"pid {holder.pid}" in line and not list((tmp_path / "run" / "rollouts").glob("r*.zarr")), line
    finally:
        holder.kill()
        holder.wait()
    run_cli(*args)  # the holder is gone: its lock is stale and taken over
    assert not (tmp_path / ".r.zarr.lock").exists()


def test_a_reused_pid_does_not_keep_a_lock(tmp_path):
    """Same host and a live pid, but another process (start time differs): stale."""
    path = tmp_path / "x.lock"
    path.write_text(json.dumps({"host": socket.gethostname(), "pid": os.getpid(), "started": -1,
                                "command": "oprd train", "since": "then"}))
    with WriterLock(path, "oprd train", "x"):
        assert json.loads(path.read_text())["started"] == _start_ticks(os.getpid())
    assert not path.exists()


def _contend(path: str, barrier, results) -> None:
    barrier.wait()
    try:
        WriterLock(path, "oprd train", "x").acquire()  # kept until the process exits
        results.put(("won", os.getpid()))
    except OprdError as e:
        results.put(("refused", str(e)))
    time.sleep(2)


def test_one_stale_lock_many_takers_exactly_one_wins(tmp_path):
    path = tmp_path / "x.lock"
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    path.write_text(json.dumps({"host": socket.gethostname(), "pid": dead.pid, "started": None,
                                "command": "oprd train", "since": "then"}))
    ctx = multiprocessing.get_context("fork")
    barrier, results = ctx.Barrier(4), ctx.Queue()
    procs = [ctx.Process(target=_contend, args=(str(path), barrier, results)) for _ in range(4)]
    for p in procs:
        p.start()
    outcomes = [results.get(timeout=60) for _ in procs]
    for p in procs:
        p.join()
    winners = [o for o in outcomes if o[0] == "won"]
    assert len(winners) == 1, outcomes
    assert all(f"pid {winners[0][1]}" in o[1] for o in outcomes if o[0] == "refused"), outcomes
