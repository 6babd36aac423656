"""Reading back what ``--report-to wandb`` wrote offline (no account, no network)."""

from __future__ import annotations

import json
import struct
from pathlib import Path


def no_wandb_account(monkeypatch, tmp_path: Path) -> None:
    """No API key and no mode (the product must choose offline), wandb's own files under ``tmp_path``."""
    for var in ("WANDB_MODE", "WANDB_API_KEY", "WANDB_BASE_URL", "WANDB_PROJECT", "WANDB_RUN_ID", "WANDB_RESUME"):
        monkeypatch.delenv(var, raising=False)
    for var in ("WANDB_DIR", "WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR"):
        monkeypatch.setenv(var, str(tmp_path / "wandb-home"))  # nothing lands in the user's home
    monkeypatch.setenv("WANDB_ERROR_REPORTING", "false")
    monkeypatch.setenv("WANDB_SILENT", "true")


def records(path: Path):
    """The records of a ``.wandb`` file (wandb's LevelDB-style log: a 7-byte header, then 32 KiB blocks of
    chunks with a 7-byte header each: crc32, length, type 1 full / 2 first / 3 middle / 4 last)."""
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


def run_files(root: Path) -> list[Path]:
    """The ``.wandb`` files of the offline runs under ``root/wandb/``, oldest first."""
    return sorted((Path(root) / "wandb").glob("offline-run-*/run-*.wandb"), key=lambda f: f.stat().st_mtime)


def history(root: Path) -> tuple[list[dict], dict, list[str]]:
    """The logged rows, the config and the run id of each part (one ``oprd`` invocation) of the offline
    runs under ``root/wandb/``, oldest part first."""
    import wandb

    # what the CLI's exit does (wandb's atexit hook): wait until wandb-core has written everything;
    # run.finish() can return before the last records reach the file
    wandb.teardown()
    rows, config, ids = [], {}, []
    for f in run_files(root):
        recs = list(records(f))
        kinds = [r.WhichOneof("record_type") for r in recs]
        assert "run" in kinds and kinds[-1] == "exit", kinds  # the whole part, finished
        run = recs[kinds.index("run")].run
        ids.append(run.run_id)
        config.update({i.key: json.loads(i.value_json) for i in run.config.update})
        rows += [{i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in r.history.item}
                 for r in recs if r.WhichOneof("record_type") == "history"]
    return rows, config, ids
