"""Untrusted inputs (issue 17, point 4): model code runs only with --trust-remote-code, no pickle is ever
loaded (a trainer state that asks for code is refused before any of it runs), store metadata cannot point
oprd elsewhere (see tests/bad_inputs/train-cache-rollout-path-outside.toml), and the package evaluates
nothing it reads."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import torch

from helpers import run_cli
from oprd_cli.teacher import cache_rollouts

PKG = Path(__file__).resolve().parents[1] / "oprd_cli"


def test_model_code_is_not_run_without_trust_remote_code(tiny_dir, aime24_path, tmp_path):
    model = tmp_path / "custom"
    shutil.copytree(tiny_dir / "qwen2", model)
    sentinel = tmp_path / "code-ran"
    (model / "evil.py").write_text(f"open({str(sentinel)!r}, 'w').close()\n"
                                   "from transformers import Qwen2Config as EvilConfig\n"
                                   "from transformers import Qwen2ForCausalLM as EvilModel\n")
    cfg = json.loads((model / "config.json").read_text())
    cfg.pop("model_type")
    cfg["auto_map"] = {"AutoConfig": "evil.EvilConfig", "AutoModelForCausalLM": "evil.EvilModel"}
    (model / "config.json").write_text(json.dumps(cfg))
    res = run_cli("rollout", "--model", model, "--prompts", aime24_path, "--out", tmp_path / "r.zarr", "--limit", 1,
                  "--num-samples", 1, "--max-new-tokens", 4, expect=2)
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and "trust" in lines[0].lower(), res.stderr
    assert not sentinel.exists() and not (tmp_path / "r.zarr").exists()


class _Payload:
    def __init__(self, target: str):
        self.target = target

    def __reduce__(self):  # what a malicious pickle does: call something while being read
        return (open, (self.target, "w"))


def test_a_trainer_state_that_asks_for_code_is_refused(tiny_dir, aime24_path, tmp_path):
    run = tmp_path / "run"
    run_cli("rollout", "--model", tiny_dir / "qwen2", "--prompts", aime24_path, "--run-dir", run, "--limit", 1,
            "--num-samples", 2, "--max-new-tokens", 4)
    cache_rollouts(str(tiny_dir / "qwen2-b"), run / "rollouts" / "r000001.zarr", run / "cache" / "r000001.zarr",
                   layers="all", positions="last", show_progress=False)
    args = ["--cache", run / "cache" / "r000001.zarr", "--out", tmp_path / "out", "--model", tiny_dir / "qwen2",
            "--batch-size", 2, "--lr", "1e-3"]
    run_cli("train", *args, "--max-steps", 1)
    ck = tmp_path / "out" / "checkpoints" / "step-000001"
    sentinel = tmp_path / "code-ran"
    torch.save({"optimizer": _Payload(str(sentinel))}, ck / "trainer_state.pt")
    res = run_cli("train", *args, "--max-steps", 2, "--resume", expect=2)
    line = res.stderr.strip().splitlines()[-1]
    assert line.startswith("error:") and "trainer_state.pt" in line, res.stderr
    assert not sentinel.exists()


def test_the_package_never_unpickles_or_evaluates():
    src = {p.relative_to(PKG): p.read_text() for p in PKG.rglob("*.py")}
    bad = [f"{name}: {m.group(0)}" for name, text in src.items()
           for m in re.finditer(r"weights_only\s*=\s*False|pickle\.loads?\(|(?<![.\w])(eval|exec)\(|"
                                r"trust_remote_code\s*=\s*True|allow_pickle\s*=\s*True", text)]
    assert not bad, bad
