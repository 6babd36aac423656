"""`--report-to tensorboard` for train and eval: the event files are read back."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from helpers import run_cli
from oprd_cli.teacher import cache_rollouts

event_accumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")


def scalars(folder: Path) -> dict[str, list[tuple[int, float]]]:
    acc = event_accumulator.EventAccumulator(str(folder), size_guidance={event_accumulator.SCALARS: 0})
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def test_train_and_eval_report_to_tensorboard(tiny_dir, aime24_path, tmp_path):
    run = tmp_path / "run"
    run_cli("rollout", "--model", tiny_dir / "qwen2", "--prompts", aime24_path, "--run-dir", run, "--limit", 2,
            "--num-samples", 2, "--max-new-tokens", 6)
    cache_rollouts(str(tiny_dir / "qwen2-b"), run / "rollouts" / "r000001.zarr", run / "cache" / "r000001.zarr",
                   layers="all", show_progress=False)
    run_cli("train", "--run-dir", run, "--model", tiny_dir / "qwen2", "--max-steps", 2, "--batch-size", 2,
            "--report-to", "tensorboard")
    got = scalars(run / "tensorboard")
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [s for s, _ in got["train/loss"]] == [1, 2]
    assert [v for _, v in got["train/loss"]] == pytest.approx([m["loss"] for m in lines], rel=1e-6)
    assert "train/rep/cosine_similarity" in got and "train/lr" in got
    # eval: the report's metrics at the checkpoint's step
    resp = tmp_path / "resp.jsonl"
    rows = [json.loads(x) for x in aime24_path.read_text().splitlines()][:2]
    resp.write_text("".join(json.dumps({"id": r["id"], "response": f"\\boxed{{{r['answer']}}}", "num_tokens": 3,
                                        "finished_by": "eos"}) + "\n" for r in rows for _ in range(2)))
    run_cli("eval", "--data", aime24_path, "--limit", 2, "--responses", resp, "--out", tmp_path / "e" / "r.json",
            "--report-to", "tensorboard")
    ev = scalars(tmp_path / "e" / "tensorboard")
    assert ev["eval/aime24/avg_at_n"] == [(0, 1.0)] and ev["eval/aime24/pass_at_1"] == [(0, 1.0)]


def test_report_to_refuses_unknown_values(tiny_dir, tmp_path):
    res = run_cli("train", "--model", tiny_dir / "qwen2", "--cache", tmp_path / "none.zarr", "--out", tmp_path / "o",
                  "--report-to", "mlflow", expect=2)
    assert res.stderr.strip().splitlines()[-1].startswith("error:") and "--report-to" in res.stderr


def wandb_records(path: Path):
    """The records of a ``.wandb`` file (wandb's LevelDB-style log: a 7-byte header, then 32 KiB blocks of
    chunks with a 7-byte header each: crc32, length, type 1 full / 2 first / 3 middle / 4 last)."""
    import struct

    from wandb.proto import wandb_internal_pb2 as pb

    data, block = path.read_bytes(), 32768
    assert data[:4] == b":W&B"
    pos, buf = 7, b""
    while pos + 7 <= len(data):
        left = block - pos % block
        _crc, n, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if left < 7 or (kind == 0 and n == 0):  # the padded end of a block
            pos += left
            continue
        buf, pos = buf + data[pos + 7:pos + 7 + n], pos + 7 + n
        if kind in (1, 4):
            rec = pb.Record()
            rec.ParseFromString(buf)
            buf = b""
            yield rec


def test_train_reports_to_wandb_offline_without_a_key(tiny_dir, aime24_path, tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    for var in ("WANDB_MODE", "WANDB_API_KEY", "WANDB_BASE_URL", "WANDB_PROJECT"):
        monkeypatch.delenv(var, raising=False)  # no key, no mode: the tracker must choose offline itself
    for var in ("WANDB_DIR", "WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR"):
        monkeypatch.setenv(var, str(tmp_path / "wandb-home"))  # nothing lands in the user's home
    monkeypatch.setenv("WANDB_ERROR_REPORTING", "false")
    monkeypatch.setenv("WANDB_SILENT", "true")
    run = tmp_path / "run"
    run_cli("rollout", "--model", tiny_dir / "qwen2", "--prompts", aime24_path, "--run-dir", run, "--limit", 2,
            "--num-samples", 2, "--max-new-tokens", 6)
    cache_rollouts(str(tiny_dir / "qwen2-b"), run / "rollouts" / "r000001.zarr", run / "cache" / "r000001.zarr",
                   layers="all", show_progress=False)
    run_cli("train", "--run-dir", run, "--model", tiny_dir / "qwen2", "--max-steps", 2, "--batch-size", 2,
            "--report-to", "wandb")
    files = list((run / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(files) == 1, sorted(p.name for p in (run / "wandb").iterdir())  # offline, in RUN/wandb/
    records = list(wandb_records(files[0]))
    history = [{i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in r.history.item}
               for r in records if r.WhichOneof("record_type") == "history"]
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [h["_step"] for h in history] == [m["step"] for m in lines] == [1, 2]
    assert [h["train/loss"] for h in history] == pytest.approx([m["loss"] for m in lines], rel=1e-6)
    assert [h["train/lr"] for h in history] == pytest.approx([m["lr"] for m in lines], rel=1e-6)
    assert "train/rep/cosine_similarity" in history[0]
    config = next(r.run.config for r in records if r.WhichOneof("record_type") == "run")
    assert {i.key: json.loads(i.value_json) for i in config.update}["report_to"] == "wandb"  # the run config
