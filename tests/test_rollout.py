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


# ------------------------------------------------- sampling is exactly what was asked for (issue 11.1, 11.2)
def _teacher_forced_logits(model, s) -> torch.Tensor:
    """Raw logits [T, V] that produced each response token of sample ``s``."""
    seq = torch.tensor(np.concatenate([s.prompt_ids, s.response_ids]).astype(np.int64))[None]
    with torch.no_grad():
        logits = model(seq).logits[0].float()
    pos = torch.arange(len(s.response_ids)) + len(s.prompt_ids) - 1
    return logits[pos]


def _reference_warp(logits: torch.Tensor, temperature: float, top_k: int, top_p: float) -> torch.Tensor:
    """Temperature, then top-k, then top-p (smallest prefix of the sorted distribution whose mass
    reaches top_p), renormalised: log-probs [T, V], -inf outside the kept set. Written row by row."""
    out = torch.full_like(logits, float("-inf"))
    for t in range(logits.shape[0]):
        z = logits[t] / temperature
        order = z.argsort(descending=True).tolist()
        keep = order[:top_k] if top_k else order
        p = torch.softmax(z[keep], -1)
        mass, kept = 0.0, []
        for tok, pr in zip(keep, p.tolist()):
            kept.append(tok)
            mass += pr
            if mass >= top_p:
                break
        out[t, kept] = torch.log_softmax(z[kept], -1)
    return out


@pytest.fixture(scope="module")
def opinionated_model(tmp_path_factory, tiny_qwen) -> Path:
    """The tiny Qwen2 with a generation_config.json carrying sampling defaults, as real hub models and
    `oprd train` checkpoints do: do_sample, temperature 0.6, top_k 20, top_p 0.95, repetition penalty."""
    from transformers import AutoTokenizer, GenerationConfig

    model = AutoModelForCausalLM.from_pretrained(tiny_qwen)
    gc = model.generation_config.to_dict()
    gc.update(do_sample=True, temperature=0.6, top_k=20, top_p=0.95, repetition_penalty=1.3, min_new_tokens=5)
    model.generation_config = GenerationConfig(**{k: v for k, v in gc.items() if not k.startswith("_")})
    out = tmp_path_factory.mktemp("opinionated") / "m"
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(tiny_qwen).save_pretrained(out)
    assert '"top_k": 20' in (out / "generation_config.json").read_text()
    return out


def test_model_generation_config_never_changes_the_sampling(opinionated_model, aime24_path, tmp_path):
    """`--temperature 1 --top-p 1 --top-k 0` samples from the full raw distribution even though the
    model's generation_config says top_k 20, temperature 0.6, top_p 0.95, repetition_penalty 1.3."""
    out = tmp_path / "s.zarr"
    run_cli("rollout", "--model", opinionated_model, "--prompts", aime24_path, "--out", out, "--limit", "3",
            "--num-samples", "4", "--max-new-tokens", "24", "--temperature", "1", "--top-p", "1", "--top-k", "0")
    r = open_rollouts(str(out))
    model = AutoModelForCausalLM.from_pretrained(opinionated_model, attn_implementation="eager").eval()
    ranks = []
    for s in r.samples():
        lp = torch.log_softmax(_teacher_forced_logits(model, s), -1)
        ids = torch.as_tensor(s.response_ids, dtype=torch.long)
        chosen = lp.gather(-1, ids[:, None])
        ranks += (lp > chosen).sum(-1).tolist()
        # the stored log-prob is the raw one: no temperature, no repetition penalty, no truncation
        np.testing.assert_allclose(s.logprobs, chosen[:, 0].numpy(), atol=2e-4)
    # near-uniform tiny model, 400 tokens: the full distribution puts most samples outside the top 20
    assert max(ranks) >= 20 and sum(k >= 20 for k in ranks) > len(ranks) // 2, sorted(ranks)
    sampling = r.meta["sampling"]  # the store records the sampling used
    assert (sampling["temperature"], sampling["top_p"], sampling["top_k"], sampling.get("warped")) == (1.0, 1.0, 0, False)
    assert r.sampling == sampling and not r.warped


def test_behaviour_logprobs_are_those_of_the_warped_distribution(tiny_qwen, aime24_path, tmp_path):
    """At temperature 0.7 with top-k and top-p, each stored log-prob is the sampled token's log-prob
    under the renormalised distribution it was drawn from, and every token lies in its support."""
    out = tmp_path / "warped.zarr"
    T, K, P = 0.7, 12, 0.5
    run_cli("rollout", "--model", tiny_qwen, "--prompts", aime24_path, "--out", out, "--limit", "2",
            "--num-samples", "3", "--max-new-tokens", "16", "--temperature", T, "--top-k", K, "--top-p", P,
            "--record-topk", "4")
    r = open_rollouts(str(out))
    model = AutoModelForCausalLM.from_pretrained(tiny_qwen, attn_implementation="eager").eval()
    for s in r.samples():
        logits = _teacher_forced_logits(model, s)
        ref = _reference_warp(logits, T, K, P)
        ids = torch.as_tensor(s.response_ids, dtype=torch.long)
        expected = ref.gather(-1, ids[:, None])[:, 0]
        assert torch.isfinite(expected).all()  # sampled inside the kept set
        np.testing.assert_allclose(s.logprobs, expected.numpy(), atol=2e-4)
        raw = torch.log_softmax(logits, -1).gather(-1, ids[:, None])[:, 0]
        assert (torch.from_numpy(s.logprobs) > raw + 1e-3).all()  # truncation always raises the probability
        assert (s.topk_ids == logits.topk(4, -1).indices.numpy()).all()  # top-k ids: the raw ranking
    assert r.warped and r.sampling["temperature"] == T and r.sampling["top_k"] == K and r.sampling["top_p"] == P
    assert "distribution sampled from" in r.meta["logprobs"]


def test_greedy_stores_log_one(tiny_qwen, aime24_path, tmp_path):
    out = tmp_path / "greedy.zarr"
    run_cli("rollout", "--model", tiny_qwen, "--prompts", aime24_path, "--out", out, "--limit", "2",
            "--num-samples", "1", "--max-new-tokens", "8", "--temperature", "0")
    r = open_rollouts(str(out))
    model = AutoModelForCausalLM.from_pretrained(tiny_qwen, attn_implementation="eager").eval()
    for s in r.samples():
        assert (s.logprobs == 0).all()
        assert (_teacher_forced_logits(model, s).argmax(-1).numpy() == s.response_ids).all()
    assert r.warped


def test_old_format_store_is_refused_in_one_line(store, tmp_path):
    import shutil

    import zarr

    old = tmp_path / "v1.zarr"
    shutil.copytree(store, old)
    g = zarr.open_group(str(old), mode="r+")
    g.attrs["oprd"] = {**g.attrs["oprd"], "format_version": 1}
    with pytest.raises(Exception) as e:
        open_rollouts(str(old))
    assert "format version 1" in str(e.value) and "reads version 2" in str(e.value)
    res = run_cli("info", old, expect=2)
    assert "format version 1" in res.stderr and "Traceback" not in res.stderr


# ----------------------------------------------------------- policy identity (issue 11.0, 11.3)
def test_weights_digest_addresses_tensors_over_2_24_elements():
    from oprd_cli import models

    n = 28311552  # SmolLM2-135M's embedding: 49152 x 576
    m = torch.nn.Module()
    m.w = torch.nn.Parameter(torch.zeros(n // 64, 64), requires_grad=False)
    d0 = models.weights_digest(m)
    m.w.data[-1, -1] = 1.0  # the last element is one of the sampled values
    assert models.weights_digest(m) != d0
    idx = models.sample_indices(n, 4096)
    assert idx[0] == 0 and idx[-1] == n - 1 and (idx.diff() > 0).all() and idx.dtype == torch.int64


def test_weights_digest_is_independent_of_the_dtype(tiny_qwen):
    from oprd_cli.models import weights_digest

    fp32 = AutoModelForCausalLM.from_pretrained(tiny_qwen, dtype=torch.float32)
    bf16 = AutoModelForCausalLM.from_pretrained(tiny_qwen, dtype=torch.bfloat16)
    assert weights_digest(fp32) == weights_digest(bf16)
    # one small AdamW-sized step (1e-5 per weight) still changes the digest
    with torch.no_grad():
        for p in fp32.parameters():
            p.add_(1e-5 * torch.sign(torch.randn_like(p)))
    assert weights_digest(fp32) != weights_digest(bf16)


def test_bf16_rollout_of_fp32_weights_is_on_policy(tiny_dir, aime24_path, tmp_path):
    """Round 1 from the initial student and round 2 from a checkpoint the fp32 trainer wrote, both
    rolled out in bf16: each round's first update is on-policy (staleness 0, off_policy 0)."""
    import json as _json

    from oprd_cli.teacher import cache_rollouts

    run = tmp_path / "run"

    def round_(n: int, *model):
        run_cli("rollout", *model, "--prompts", aime24_path, "--run-dir", run, "--limit", 2, "--num-samples", 2,
                "--max-new-tokens", 8, "--dtype", "bf16")
        assert open_rollouts(str(run / "rollouts" / f"r{n:06d}.zarr")).meta["dtype"] == "bfloat16"
        cache_rollouts(str(tiny_dir / "qwen2-b"), run / "rollouts" / f"r{n:06d}.zarr", run / "cache" / f"r{n:06d}.zarr",
                       layers="all", positions="last_k", k=8, logprobs="sampled", show_progress=False)

    round_(1, "--model", tiny_dir / "qwen2")
    run_cli("train", "--run-dir", run, "--model", tiny_dir / "qwen2", "--objective", "opd-top1", "--batch-size", 4,
            "--max-steps", 1, "--save-every", 1, "--lr", "1e-3")
    round_(2)  # from the run's latest checkpoint (fp32 safetensors), sampled in bf16
    run_cli("train", "--run-dir", run, "--objective", "opd-top1", "--batch-size", 4, "--max-steps", 2, "--lr", "1e-3")
    m = [_json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [(x["step"], x["cache_name"], x["staleness"], x["off_policy"]) for x in m] == [
        (1, "r000001.zarr", 0, 0), (2, "r000002.zarr", 0, 0)]


# --------------------------------------------------------------------- attention (issue 11.5)
def test_attention_choice_per_device(monkeypatch):
    import transformers.utils

    from oprd_cli.models import choose_attn_implementation

    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    monkeypatch.setattr(transformers.utils, "is_flash_attn_2_available", lambda: True)
    assert choose_attn_implementation(cuda, torch.bfloat16) == "flash_attention_2"
    assert choose_attn_implementation(cuda, torch.float16) == "flash_attention_2"
    assert choose_attn_implementation(cuda, torch.float32) == "sdpa"  # flash-attn has no fp32 kernel
    assert choose_attn_implementation(cpu, torch.bfloat16) == "eager"
    monkeypatch.setattr(transformers.utils, "is_flash_attn_2_available", lambda: False)
    assert choose_attn_implementation(cuda, torch.bfloat16) == "sdpa"
    assert choose_attn_implementation(cpu, torch.float32) == "eager"


def test_sdpa_truncated_teacher_forward_and_generation_match_eager(tiny_dir, store):
    """The truncated teacher forward and generation work with SDPA (what CUDA uses) and agree with eager."""
    from oprd_cli.config import SamplingConfig
    from oprd_cli.rollout import HFBackend
    from oprd_cli.teacher_model import SeqRequest, TeacherModel

    r = open_rollouts(str(store))
    reqs = []
    for s in r.samples(0, 3):
        ids = np.concatenate([s.prompt_ids, s.response_ids]).astype(np.int64)
        n = len(ids)
        reqs.append(SeqRequest(ids=ids, hidden_index=np.arange(n - 4, n), logprob_index=np.arange(n - 4, n - 1),
                               targets=ids[n - 3:]))
    outs = {}
    for attn in ("eager", "sdpa"):
        tm = TeacherModel(tiny_dir / "qwen2-deep", layers="1,2", device="cpu", dtype="float32",
                          attn_implementation=attn)
        assert not tm.full and tm.config._attn_implementation == attn  # truncated at block 2 of 4
        outs[attn] = tm.run(reqs)
    for a, b in zip(outs["eager"], outs["sdpa"]):
        np.testing.assert_allclose(a["hidden"], b["hidden"], atol=1e-4)

    from oprd_cli.models import load_model, load_tokenizer

    tok = load_tokenizer(str(tiny_dir / "qwen2"))
    sampling = SamplingConfig(num_samples=2, max_new_tokens=8, temperature=0.8, top_k=10)
    prompts = [list(r.prompt_ids(0)), list(r.prompt_ids(1))]
    gen = {}
    for attn in ("eager", "sdpa"):
        lm = load_model(str(tiny_dir / "qwen2"), torch.device("cpu"), torch.float32, attn_implementation=attn)
        assert lm.config._attn_implementation == attn
        gen[attn] = HFBackend(lm, tok).generate(prompts, sampling)
    for ga, gb in zip(gen["eager"], gen["sdpa"]):
        for a, b in zip(ga, gb):
            assert (a.response_ids == b.response_ids).all()
            np.testing.assert_allclose(a.logprobs, b.logprobs, atol=1e-4)
