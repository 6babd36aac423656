"""`oprd rollout --print-prompts` / `--import ENGINE.jsonl`: responses from an outside engine."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from helpers import info_json, run_cli
from oprd_cli.stores.rollouts import open_rollouts

ARGS = ["--limit", 3, "--num-samples", 2, "--max-new-tokens", 8]


@pytest.fixture(scope="module")
def engine(tmp_path_factory, tiny_dir, aime24_path):
    """An ``oprd rollout`` store and the same responses as an engine would write them (JSONL)."""
    root = tmp_path_factory.mktemp("import")
    ref = root / "ref.zarr"
    run_cli("rollout", "--model", tiny_dir / "qwen2", "--prompts", aime24_path, "--out", ref, *ARGS)
    store = open_rollouts(str(ref))
    lines = [{"prompt_index": s.prompt_row, "sample_index": s.sample_index, "token_ids": s.response_ids.tolist(),
              "logprobs": s.logprobs.tolist(), "finish_reason": "stop" if s.finish_reason == "eos" else "length"}
             for s in store.samples()]
    return ref, lines


def _write(path: Path, lines: list[dict]) -> Path:
    path.write_text("".join(json.dumps(x) + "\n" for x in lines))
    return path


def test_print_prompts_then_import_gives_the_store_oprd_would_write(engine, tiny_dir, aime24_path, tmp_path):
    ref, lines = engine
    prompts = tmp_path / "prompts.jsonl"
    run_cli("rollout", "--model", tiny_dir / "qwen2", "--prompts", aime24_path, "--print-prompts", prompts, *ARGS)
    rendered = [json.loads(x) for x in prompts.read_text().splitlines()]
    store = open_rollouts(str(ref))
    assert [r["prompt_index"] for r in rendered] == [0, 1, 2]
    assert [r["prompt_token_ids"] for r in rendered] == [store.prompt_ids(i).tolist() for i in range(3)]
    # the engine repeats the prompt ids (vLLM's RequestOutput.prompt_token_ids): they are checked
    for x in lines:
        x["prompt_token_ids"] = rendered[x["prompt_index"]]["prompt_token_ids"]
    out = tmp_path / "imported.zarr"
    run_cli("rollout", "--model", tiny_dir / "qwen2", "--prompts", aime24_path, "--out", out, *ARGS,
            "--import", _write(tmp_path / "engine.jsonl", lines[::-1]))  # any line order
    got, want = info_json(out), info_json(ref)
    assert got["complete"] and got["content_digest"] == want["content_digest"]
    assert open_rollouts(str(out)).meta["backend"] == "import"


@pytest.mark.parametrize("change, needle", [
    (lambda ls: ls[:-1], "has 5 responses, 3 prompts x 2 samples need 6"),
    (lambda ls: ls + [ls[0]], "appears twice"),
    (lambda ls: [dict(ls[0], prompt_token_ids=[1, 2, 3])] + ls[1:], "prompt_token_ids differ"),
    (lambda ls: [dict(ls[0], token_ids=[10 ** 6] * len(ls[0]["token_ids"]))] + ls[1:], "outside the student's vocabulary"),
    (lambda ls: [dict(ls[0], logprobs=ls[0]["logprobs"][:-1])] + ls[1:], "logprobs for"),
    (lambda ls: [dict(ls[0], finish_reason="abort")] + ls[1:], "finish_reason 'abort'"),
    (lambda ls: [{k: v for k, v in ls[0].items() if k != "logprobs"}] + ls[1:], "missing logprobs"),
    (lambda ls: [dict(ls[0], prompt_index=7)] + ls[1:], "outside the 3 rendered prompts"),
])
def test_import_refuses_a_mismatch_with_one_line(engine, tiny_dir, aime24_path, tmp_path, change, needle):
    _, lines = engine
    out = tmp_path / "bad.zarr"
    res = run_cli("rollout", "--model", tiny_dir / "qwen2", "--prompts", aime24_path, "--out", out, *ARGS,
                  "--import", _write(tmp_path / "engine.jsonl", change([dict(x) for x in lines])), expect=2)
    err = res.stderr.strip().splitlines()
    assert "Traceback" not in res.stderr and err[-1].startswith("error:") and needle in err[-1], res.stderr
    assert not out.exists()  # nothing written
