"""`oprd rollout` and the rollout store, driven through the real command."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM

from helpers import info_json, run_cli
from oprd_cli.stores import common
from oprd_cli.stores.rollouts import open_rollouts

SMALL = ["--limit", "3", "--num-samples", "2", "--max-new-tokens", "12"]


@pytest.fixture(scope="module")
def store(tmp_path_factory, tiny_qwen, aime24_path) -> Path:
    out = tmp_path_factory.mktemp("rollout") / "s.zarr"
    run_cli("rollout", "--model", tiny_qwen, "--prompts", aime24_path, "--out", out, *SMALL, "--record-topk", "3")
    return out


def test_info_reports_counts_and_digest(store):
    info = info_json(store)
    assert info["kind"] == "rollouts" and info["format_version"] == 2 and info["complete"] is True
    assert info["num_samples"] == 6 and info["num_prompts"] == 3
    assert info["num_tokens"] == sum(open_rollouts(str(store)).response_lengths)
    assert info["num_tokens"] <= 6 * 12
    assert info["content_digest"].startswith("sha256:")
    assert info["sampling"]["temperature"] == 1.0 and info["seed"] == 0
    assert info["policy"]["weights_digest"] and info["tokenizer"]["digest"]
    # the recorded digest is the digest of what is stored
    assert run_cli("info", store, "--json", "--verify").stdout.count('"verified": true') == 1


def test_reader_returns_what_the_policy_generated(store, tiny_qwen, aime24_path):
    """Behaviour log-probs and top-k ids equal a teacher-forced forward of the stored sequence."""
    r = open_rollouts(str(store))
    model = AutoModelForCausalLM.from_pretrained(tiny_qwen, attn_implementation="eager").eval()
    answers = [json.loads(line)["answer"] for line in Path(aime24_path).read_text().splitlines()]
    seen = set()
    for s in r.samples():
        seen.add((s.prompt_index, s.sample_index))
        assert s.answer == answers[s.prompt_index]
        seq = torch.tensor(np.concatenate([s.prompt_ids, s.response_ids]).astype(np.int64))[None]
        with torch.no_grad():
            logits = model(seq).logits[0].float()
        lp = torch.log_softmax(logits, -1)
        lp_prompt = len(s.prompt_ids)
        pos = torch.arange(len(s.response_ids)) + lp_prompt - 1
        expected = lp[pos, torch.as_tensor(s.response_ids, dtype=torch.long)]
        np.testing.assert_allclose(s.logprobs, expected.numpy(), atol=2e-4)
        top3 = lp[pos].topk(3, dim=-1).indices.numpy()
        assert (s.topk_ids[:, 0] == top3[:, 0]).all()
        assert s.finish_reason in ("eos", "length")
        assert s.text == r.texts()[s.row]
    assert seen == {(p, j) for p in range(3) for j in range(2)}


def test_same_seed_same_digest_other_seed_differs(store, tiny_qwen, aime24_path, tmp_path):
    again = tmp_path / "again.zarr"
    run_cli("rollout", "--model", tiny_qwen, "--prompts", aime24_path, "--out", again, *SMALL, "--record-topk", "3")
    assert info_json(again)["content_digest"] == info_json(store)["content_digest"]
    other = tmp_path / "other.zarr"
    run_cli("rollout", "--model", tiny_qwen, "--prompts", aime24_path, "--out", other, *SMALL, "--record-topk", "3",
            "--seed", "7")
    assert info_json(other)["content_digest"] != info_json(store)["content_digest"]


def test_verl_layout_and_llama(tiny_llama, shared_data, tmp_path):
    out = tmp_path / "verl.zarr"
    run_cli("rollout", "--model", tiny_llama, "--prompts", shared_data / "aime24_verl.parquet", "--out", out, *SMALL)
    r = open_rollouts(str(out))
    assert r.num_samples == 6
    s = r.sample(0)
    assert s.answer == "204" and s.prompt_id == "0"


def test_run_dir_rounds_are_numbered(tiny_qwen, aime24_path, tmp_path):
    run = tmp_path / "run"
    for _ in range(2):
        run_cli("rollout", "--model", tiny_qwen, "--prompts", aime24_path, "--run-dir", run, "--limit", "1",
                "--num-samples", "1", "--max-new-tokens", "4")
    assert sorted(p.name for p in (run / "rollouts").iterdir()) == ["r000001.zarr", "r000002.zarr"]
    assert "student" in (run / "oprd.toml").read_text()
    # the run's oprd.toml now names the student, so --model can be left out
    run_cli("rollout", "--prompts", aime24_path, "--run-dir", run, "--limit", "1", "--num-samples", "1",
            "--max-new-tokens", "4")
    assert (run / "rollouts" / "r000003.zarr").exists()


@pytest.fixture(scope="module")
def eosy_model(tmp_path_factory, tiny_qwen) -> Path:
    """A Qwen2 whose next-token distribution is uniform except EOS, which has probability ~0.2 at
    every step: the blocks are zeroed (the residual stream is the embedding), every embedding is the
    same vector, and only the LM-head row of EOS is non-zero."""
    model = AutoModelForCausalLM.from_pretrained(tiny_qwen)
    eos = model.generation_config.eos_token_id
    eos = eos[0] if isinstance(eos, list) else eos
    v = model.config.vocab_size
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        model.model.embed_tokens.weight.fill_(1.0)
        model.model.norm.weight.fill_(1.0)
        model.lm_head.weight.zero_()
        d = model.config.hidden_size
        # h = RMSNorm(ones) = ones; logit_eos = log(0.25 * (v - 1)) gives P(eos) = 0.2
        model.lm_head.weight[eos] = float(np.log(0.25 * (v - 1))) / d
    out = tmp_path_factory.mktemp("eosy") / "m"
    model.save_pretrained(out)
    from transformers import AutoTokenizer

    AutoTokenizer.from_pretrained(tiny_qwen).save_pretrained(out)
    return out


def test_eos_and_length_stops(eosy_model, aime24_path, tmp_path):
    out = tmp_path / "stops.zarr"
    run_cli("rollout", "--model", eosy_model, "--prompts", aime24_path, "--out", out, "--limit", "4",
            "--num-samples", "4", "--max-new-tokens", "8")
    r = open_rollouts(str(out))
    reasons = r.finish_reasons
    lengths = r.response_lengths
    assert "eos" in reasons and "length" in reasons
    eos_id = r.meta["tokenizer"]["eos_token_ids"][0]
    for s, reason, n in zip(r.samples(), reasons, lengths):
        if reason == "eos":
            assert s.response_ids[-1] == eos_id and (s.response_ids[:-1] != eos_id).all()
        else:
            assert n == 8 and (s.response_ids != eos_id).all()
        np.testing.assert_allclose(
            s.logprobs[s.response_ids == eos_id], np.log(0.2), atol=1e-3)
    info = info_json(out)
    assert info["num_truncated"] == reasons.count("length")


# ---------------------------------------------------------------- bad input
def test_empty_prompt_set(tiny_qwen, tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    r = run_cli("rollout", "--model", tiny_qwen, "--prompts", empty, "--out", tmp_path / "x.zarr", expect=2)
    assert "error" in r.stderr and ("empty" in r.stderr or "no prompts" in r.stderr)


def test_missing_field_names_the_fields(tiny_qwen, aime24_path, tmp_path):
    r = run_cli("rollout", "--model", tiny_qwen, "--prompts", aime24_path, "--prompt-field", "question",
                "--out", tmp_path / "x.zarr", expect=2)
    assert "problem" in r.stderr and "answer" in r.stderr and "question" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize("flag,value,words", [
    ("--num-samples", "0", "num-samples"),
    ("--temperature", "-1", "temperature"),
    ("--top-p", "1.5", "top-p"),
])
def test_bad_sampling_values(tiny_qwen, aime24_path, tmp_path, flag, value, words):
    r = run_cli("rollout", "--model", tiny_qwen, "--prompts", aime24_path, "--out", tmp_path / "x.zarr", flag, value,
                expect=2)
    assert words in r.stderr and "Traceback" not in r.stderr + r.stdout
    assert not (tmp_path / "x.zarr").exists()


def test_model_path_that_is_not_a_model(aime24_path, tmp_path):
    (tmp_path / "notamodel").mkdir()
    r = run_cli("rollout", "--model", tmp_path / "notamodel", "--prompts", aime24_path, "--out", tmp_path / "x.zarr",
                expect=2)
    assert "not a" in r.stderr and "config.json" in r.stderr
    r = run_cli("rollout", "--model", tmp_path / "missing", "--prompts", aime24_path, "--out", tmp_path / "x.zarr",
                expect=2)
    assert "does not exist" in r.stderr


def test_missing_prompt_file(tiny_qwen, tmp_path):
    r = run_cli("rollout", "--model", tiny_qwen, "--prompts", tmp_path / "nope.jsonl", "--out", tmp_path / "x.zarr",
                expect=2)
    assert "does not exist" in r.stderr


def test_complete_store_is_never_overwritten(store, tiny_qwen, aime24_path):
    before = info_json(store)["content_digest"]
    r = run_cli("rollout", "--model", tiny_qwen, "--prompts", aime24_path, "--out", store, "--limit", "1", expect=2)
    assert "--overwrite" in r.stderr
    assert info_json(store)["content_digest"] == before


def test_prompts_longer_than_context_are_skipped(tmp_path, tiny_dir):
    from transformers import AutoTokenizer

    from oprd_cli.tiny import build_tiny_model

    tok = AutoTokenizer.from_pretrained(tiny_dir / "tokenizer")
    short_ctx = tmp_path / "short"
    build_tiny_model(short_ctx, tok, "qwen2", max_position_embeddings=200)
    mixed = tmp_path / "mixed.jsonl"
    rows = [{"problem": "1+1?", "answer": "2"}, {"problem": "x " * 400, "answer": "0"}]
    mixed.write_text("\n".join(json.dumps(r) for r in rows))
    out = tmp_path / "m.zarr"
    r = run_cli("rollout", "--model", short_ctx, "--prompts", mixed, "--out", out, "--num-samples", "1",
                "--max-new-tokens", "4")
    assert "skipped 1 of 2 prompts" in r.stderr
    assert info_json(out)["skipped_prompts"] == 1 and info_json(out)["num_samples"] == 1
    only_long = tmp_path / "long.jsonl"
    only_long.write_text(json.dumps(rows[1]))
    r = run_cli("rollout", "--model", short_ctx, "--prompts", only_long, "--out", tmp_path / "none.zarr", expect=2)
    assert "longer than the model's context" in r.stderr


def test_interrupted_store_is_not_complete(store, tmp_path, tiny_qwen, aime24_path):
    import shutil

    broken = tmp_path / "broken.zarr"
    shutil.copytree(store, broken)
    (broken / common.COMPLETE_MARKER).unlink()  # as if the writer died before its last write
    assert info_json(broken)["complete"] is False
    with pytest.raises(Exception, match="incomplete"):
        open_rollouts(str(broken))
    # a new rollout to the same path replaces the leftover without --overwrite
    run_cli("rollout", "--model", tiny_qwen, "--prompts", aime24_path, "--out", broken, "--limit", "1",
            "--num-samples", "1", "--max-new-tokens", "2")
    assert info_json(broken)["complete"] is True


def test_help_documents_defaults():
    out = run_cli("rollout", "--help").stdout
    for words in ("--num-samples", "default: 2", "--temperature", "--record-topk", "--max-new-tokens"):
        assert words in out
    assert "rollout" in run_cli("--help").stdout
