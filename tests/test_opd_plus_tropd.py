"""OPD+ and TrOPD end to end (issue 14): the train objectives, teacher-prefix guided rollouts, the loop's
prefix schedule, and the one-line refusals. Tiny models, few tokens."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from helpers import run_cli
from oprd_cli.losses import opd_plus_loss, tropd_loss, trust_mask
from oprd_cli.stores.cache import open_cache
from oprd_cli.stores.rollouts import load_arrays, open_rollouts
from oprd_cli.teacher import cache_rollouts

LR = ["--lr", "3e-3"]
K = 8  # the teacher top-k the tests cache


@pytest.fixture(scope="module")
def run(tmp_path_factory, tiny_dir, aime24_path) -> Path:
    """RUN/ with one round: 8 samples of 12 tokens (student top-8 ids) and a cache with the teacher's
    log-probs on the sampled tokens and its own top-8 (``--logprobs topk --topk 8``), last 8 positions."""
    root = tmp_path_factory.mktemp("i14") / "run"
    run_cli("rollout", "--model", tiny_dir / "qwen2", "--prompts", aime24_path, "--run-dir", root, "--limit", 4,
            "--num-samples", 2, "--max-new-tokens", 12, "--record-topk", K)
    cache_rollouts(str(tiny_dir / "qwen2-b"), root / "rollouts" / "r000001.zarr", root / "cache" / "r000001.zarr",
                   layers="all", positions="last_k", k=8, logprobs="topk", topk=K, show_progress=False)
    return root


@pytest.fixture(scope="module")
def cache(run) -> Path:
    return run / "cache" / "r000001.zarr"


@pytest.fixture(scope="module")
def guided(tmp_path_factory, tiny_dir, aime24_path) -> Path:
    """A guided rollout (teacher qwen2-b writes uniform[0, 5] tokens, temperature 0.8 and top-k 50) and
    its top-8 cache."""
    root = tmp_path_factory.mktemp("guided")
    run_cli("rollout", "--model", tiny_dir / "qwen2", "--prompts", aime24_path, "--out", root / "g.zarr",
            "--limit", 3, "--num-samples", 2, "--max-new-tokens", 10, "--temperature", 0.8, "--top-k", 50,
            "--record-topk", K, "--teacher-prefix", tiny_dir / "qwen2-b", "--prefix-max-tokens", 5,
            "--prefix-mode", "uniform", "--seed", 3)
    cache_rollouts(str(tiny_dir / "qwen2-b"), root / "g.zarr", root / "g.cache.zarr", layers="all",
                   positions="last_k", k=4, logprobs="topk", topk=K, show_progress=False)
    return root


def metrics(folder: Path) -> list[dict]:
    return [json.loads(line) for line in (Path(folder) / "metrics.jsonl").read_text().splitlines()]


def train(*args, expect: int = 0):
    return run_cli("train", *args, expect=expect)


def one_line(result, *needles: str) -> str:
    out = result.stderr.strip()
    assert "Traceback" not in out, out
    line = out.splitlines()[-1]
    assert line.startswith("error:"), out
    for n in needles:
        assert n in line, out
    return line


def student_logprobs(model_dir: Path, rollout_path: Path, rows, ids_of=None):
    """The initial student's full-vocabulary log-probs at each response token (``[B, T]``) and, with
    ``ids_of(row) -> [T, K]``, at those ids (``[B, T, K]``): a plain HF forward, the reference."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir).float().eval()
    data = load_arrays(open_rollouts(str(rollout_path)))
    T = max(len(data.response_ids[r]) for r in rows)
    lp = torch.zeros(len(rows), T, dtype=torch.float64)
    lp_k = None
    for i, r in enumerate(rows):
        p, y = data.prompt_ids[r], data.response_ids[r]
        with torch.no_grad():
            logits = model(torch.tensor(np.concatenate([p, y]))[None]).logits[0].double()
        ls = torch.log_softmax(logits[len(p) - 1: len(p) - 1 + len(y)], dim=-1)
        lp[i, :len(y)] = ls.gather(-1, torch.tensor(y)[:, None])[:, 0]
        if ids_of is not None:
            ids = torch.as_tensor(ids_of(r)).long()
            lp_k = lp_k if lp_k is not None else torch.zeros(len(rows), T, ids.shape[-1], dtype=torch.float64)
            lp_k[i, :len(y)] = ls.gather(-1, ids)
    return lp, lp_k, data


# ----------------------------------------------------------------------------------------------- OPD+
@pytest.mark.parametrize("extra", [
    ["--divergence", "rkl"],
    ["--divergence", "fkl"],
    ["--divergence", "jsd", "--advantage", "stopgrad"],
    ["--divergence", "alpha", "--alpha", "0.3", "--mu", "1"],
])
def test_opd_plus_runs_and_logs_its_metrics(cache, tiny_dir, tmp_path, extra):
    out = tmp_path / "out"
    train("--model", tiny_dir / "qwen2", "--cache", cache, "--out", out, "--objective", "opd-plus", "--max-steps", 2,
          "--batch-size", 4, *LR, *extra)
    m = metrics(out)
    assert len(m) == 2 and all(math.isfinite(x["loss"]) for x in m)
    for key in ("opd_plus/adv_mean", "opd_plus/divergence", "opd_plus/kl", "opd_plus/clip_frac",
                "opd_plus/ppo_clip_frac", "opd/kl"):
        assert key in m[0], key
    assert m[0]["off_policy"] == 0 and m[0]["opd_plus/ppo_clip_frac"] == 0
    if "--mu" in extra:
        assert m[0]["loss"] == pytest.approx(m[0]["opd/loss"] + m[0]["rep/loss"], rel=1e-5)
    else:  # on-policy, the surrogate's value is -A per token: the loss is minus the token-mean advantage
        assert m[0]["loss"] == pytest.approx(-m[0]["opd_plus/adv_mean"], rel=1e-4, abs=1e-6)


@pytest.mark.parametrize("advantage", ["corrected", "stopgrad"])
def test_opd_plus_first_step_equals_the_loss_by_hand(run, cache, tiny_dir, tmp_path, advantage):
    rows = list(range(8))
    lp, _, _ = student_logprobs(tiny_dir / "qwen2", run / "rollouts" / "r000001.zarr", rows)
    cb = open_cache(str(cache)).read(rows)
    mask = cb.response_mask
    ref = opd_plus_loss(lp, cb.teacher_logprobs.double(), mask, divergence="fkl", corrected=advantage == "corrected",
                        log_ratio_clip=0.5)
    out = tmp_path / "out"
    train("--model", tiny_dir / "qwen2", "--cache", cache, "--out", out, "--objective", "opd-plus", "--max-steps", 1,
          "--batch-size", 8, "--divergence", "fkl", "--advantage", advantage, "--log-ratio-clip", 0.5, *LR)
    m = metrics(out)[0]
    assert m["loss"] == pytest.approx(float(ref.loss), rel=1e-4)
    assert m["opd_plus/clip_frac"] == pytest.approx(float(ref.clip_frac), abs=1e-6)
    assert 0 < m["opd_plus/clip_frac"] < 1  # the tight clip bites on some tokens, and is logged


# ---------------------------------------------------------------------------------------------- TrOPD
@pytest.mark.parametrize("extra", [
    ["--outlier", "fkl"],
    ["--outlier", "mask"],
    ["--outlier", "clip", "--tau", "-0.5"],
    ["--trust", "soft"],
    ["--mu", "1"],
])
def test_tropd_variants_run_and_log_their_terms(cache, tiny_dir, tmp_path, extra):
    out = tmp_path / "out"
    train("--model", tiny_dir / "qwen2", "--cache", cache, "--out", out, "--objective", "tropd", "--tropd-topk", K,
          "--max-steps", 2, "--batch-size", 4, *LR, *extra)
    m = metrics(out)
    assert len(m) == 2 and all(math.isfinite(x["loss"]) for x in m)
    first = m[0]
    for key in ("tropd/outlier_frac", "tropd/trust_loss", "tropd/outlier_loss", "tropd/guidance_tokens",
                "tropd/prefix_len", "tropd/kl"):
        assert key in first, key
    assert first["tropd/guidance_tokens"] == 0 and first["tropd/prefix_len"] == 0  # no teacher prefix here
    terms = first["tropd/trust_loss"] + first["tropd/outlier_loss"] + first["tropd/guidance_loss"]
    if "--mu" in extra:
        assert first["loss"] == pytest.approx(first["opd/loss"] + first["rep/loss"], rel=1e-5)
        assert first["opd/loss"] == pytest.approx(terms, rel=1e-4, abs=1e-6)
    else:
        assert first["loss"] == pytest.approx(terms, rel=1e-4, abs=1e-6)
    assert 0 < first["tropd/outlier_frac"] < 1  # two different tiny models: some tokens are outliers
    if "mask" in extra:
        assert first["tropd/outlier_loss"] == 0
    else:
        assert first["tropd/outlier_loss"] != 0


def test_tropd_first_step_equals_the_loss_by_hand_and_the_draw_is_reproducible(run, cache, tiny_dir, tmp_path):
    rows = list(range(8))
    c = open_cache(str(cache))
    cb = c.read(rows)
    lp, lp_k, data = student_logprobs(tiny_dir / "qwen2", run / "rollouts" / "r000001.zarr", rows,
                                      ids_of=lambda r: c.read([r]).teacher_topk_ids[0, :, :K].numpy())
    mask = cb.response_mask
    behaviour = torch.zeros(mask.shape, dtype=torch.float64)
    for i, r in enumerate(rows):
        behaviour[i, :len(data.logprobs[r])] = torch.from_numpy(data.logprobs[r]).double()
    # the draw: seed (run seed 0, round 1), one stream per sample row of the store
    trust = trust_mask(behaviour, cb.teacher_logprobs.double(), mask, seed=(0, 1), sample_ids=rows)
    ref = tropd_loss(lp, lp_k, cb.teacher_logprobs.double(), cb.teacher_topk_logprobs[..., :K].double(), mask, trust)
    losses = []
    for name in ("a", "b"):
        out = tmp_path / name
        train("--model", tiny_dir / "qwen2", "--cache", cache, "--out", out, "--objective", "tropd", "--tropd-topk", K,
              "--max-steps", 1, "--batch-size", 8, "--micro-batch-tokens", 60 if name == "b" else 4096, *LR)
        losses.append(metrics(out)[0])
    for m in losses:
        assert m["loss"] == pytest.approx(float(ref.loss), rel=1e-4)
        assert m["tropd/outlier_frac"] == pytest.approx(float(ref.outlier_frac), abs=1e-6)
    assert losses[1]["num_micro_batches"] > 1  # another micro-batch split, the same draw


# ------------------------------------------------------------------------------------ guided rollouts
def test_guided_rollout_records_prefixes_and_each_tokens_behaviour_logprob(guided, tiny_dir):
    from transformers import AutoModelForCausalLM

    from oprd_cli.rollout import _SampleAndRecord

    store = open_rollouts(str(guided / "g.zarr"))
    prefix = store.prefix_lengths
    assert prefix.dtype == np.int32 and prefix.shape == (6,)
    assert (prefix <= 5).all() and len(set(prefix.tolist())) > 1  # uniform in [0, 5], drawn per sample
    assert store.meta["guidance"]["mode"] == "uniform" and store.meta["guidance"]["max_tokens"] == 5
    warp = _SampleAndRecord(0.8, 50, 1.0, 0).warp
    teacher = AutoModelForCausalLM.from_pretrained(tiny_dir / "qwen2-b").float().eval()
    student = AutoModelForCausalLM.from_pretrained(tiny_dir / "qwen2").float().eval()
    checked = {"teacher": 0, "student": 0}
    for s in store.samples():
        n = int(prefix[s.row])
        seq = torch.tensor(np.concatenate([s.prompt_ids, s.response_ids]))[None].long()
        Lp = len(s.prompt_ids)
        for name, model, sl in (("teacher", teacher, slice(0, n)), ("student", student, slice(n, len(s.response_ids)))):
            if sl.stop <= sl.start:
                continue
            with torch.no_grad():
                logits = model(seq).logits[0, Lp - 1 + sl.start: Lp - 1 + sl.stop]
            ref = torch.log_softmax(warp(logits), -1).gather(-1, torch.tensor(s.response_ids[sl]).long()[:, None])[:, 0]
            np.testing.assert_allclose(s.logprobs[sl], ref.numpy(), atol=2e-4)
            checked[name] += sl.stop - sl.start
    assert checked["teacher"] > 0 and checked["student"] > 0
    assert all(len(s.response_ids) == 10 or s.finish_reason == "eos" for s in store.samples())


def test_a_prefix_ending_with_eos_finishes_the_response():
    from oprd_cli.config import SamplingConfig
    from oprd_cli.guidance import GuidanceConfig, guided_generate
    from oprd_cli.rollout import GeneratedSample

    class Fake:
        name, context_length, tokenizer, eos_ids = "fake", None, None, [9]

        def __init__(self, ids):
            self.ids, self.calls = ids, []

        def _generate_batch(self, seqs, sampling, max_new):
            self.calls.append((seqs, max_new))
            out = []
            for _ in seqs:
                ids = np.asarray(self.ids[:max_new], np.int32)
                reason = "eos" if len(ids) and ids[-1] == 9 else "length"
                out.append(GeneratedSample(ids, np.full(len(ids), -0.5, np.float32), reason))
            return out

    class Tok:
        def decode(self, ids, skip_special_tokens=True):
            return " ".join(map(str, ids))

    teacher, student = Fake([5, 9]), Fake([7, 7, 7, 7, 7, 7])
    student.tokenizer = Tok()
    sampling = SamplingConfig(num_samples=1, max_new_tokens=6)
    out, lens = guided_generate(student, teacher, [[1, 2]], sampling, GuidanceConfig("t", 4))
    assert lens == [[2]] and out[0][0].finish_reason == "eos" and out[0][0].response_ids.tolist() == [5, 9]
    assert student.calls == []  # nothing to continue
    teacher.ids = [5, 6, 8, 8, 8]
    out, lens = guided_generate(student, teacher, [[1, 2]], sampling, GuidanceConfig("t", 4))
    assert lens == [[4]] and out[0][0].response_ids.tolist() == [5, 6, 8, 8, 7, 7]
    assert student.calls[-1] == ([[1, 2, 5, 6, 8, 8]], 2) and out[0][0].finish_reason == "length"


def test_tropd_on_a_guided_rollout_gives_prefix_tokens_the_guidance_term(guided, tiny_dir, tmp_path):
    store = open_rollouts(str(guided / "g.zarr"))
    out = tmp_path / "out"
    train("--model", tiny_dir / "qwen2", "--cache", guided / "g.cache.zarr", "--out", out, "--objective", "tropd",
          "--tropd-topk", K, "--max-steps", 1, "--batch-size", 6, "--guidance-beta", 0.5, *LR)
    m = metrics(out)[0]
    assert m["tropd/guidance_tokens"] == store.prefix_lengths.sum() > 0
    assert m["tropd/prefix_len"] == pytest.approx(store.prefix_lengths.mean())
    assert m["tropd/guidance_loss"] > 0 and m["off_policy"] == 1  # teacher tokens are never on-policy
    assert m["loss"] == pytest.approx(m["tropd/trust_loss"] + m["tropd/outlier_loss"] + m["tropd/guidance_loss"],
                                      rel=1e-4, abs=1e-6)


def test_an_old_store_without_prefix_lengths_reads_as_zero(run):
    store = open_rollouts(str(run / "rollouts" / "r000001.zarr"))
    assert "prefix_length" not in store.group["sample"]
    assert store.prefix_lengths.tolist() == [0] * store.num_samples
    assert load_arrays(store).prefix_lengths is None


# --------------------------------------------------------------------------------------------- the loop
def test_loop_anneals_the_prefix_with_the_cosine_schedule(tiny_dir, aime24_path, tmp_path):
    from oprd_cli.loop import read_log
    from oprd_cli.losses.tropd import guidance_prefix_max

    run = tmp_path / "run"
    (run).mkdir()
    (run / "oprd.toml").write_text(f"[train]\ntropd_topk = {K}\n")
    run_cli("loop", "--run-dir", run, "--model", tiny_dir / "qwen2", "--teacher", tiny_dir / "qwen2-b",
            "--prompts", aime24_path, "--rounds", 3, "--limit", 2, "--num-samples", 2, "--max-new-tokens", 8,
            "--batch-size", 4, "--positions", "all", "--objective", "tropd", "--prefix-schedule", "cosine")
    rollouts = [e for e in read_log(run) if e["stage"] == "rollout"]
    want = [guidance_prefix_max(r, 3, 8) for r in range(3)]
    assert want == [8, 6, 2] and [e["prefix_max"] for e in rollouts] == want
    for r, L in enumerate(want, start=1):
        store = open_rollouts(str(run / "rollouts" / f"r{r:06d}.zarr"))
        assert store.meta["guidance"]["max_tokens"] == L and (store.prefix_lengths <= L).all()
        assert store.record_topk >= K  # the cache's topk mode scores the student's top-k too
        assert open_cache(str(run / "cache" / f"r{r:06d}.zarr")).logprobs == {"mode": "topk", "k": K}
    assert open_rollouts(str(run / "rollouts" / "r000001.zarr")).prefix_lengths.tolist() == [8] * 4
    m = metrics(run)
    assert len(m) == 3 and m[0]["objective"] == "tropd" and m[0]["tropd/guidance_tokens"] > 0


# ------------------------------------------------------------------------------------------ refusals
def test_refusals_are_one_line(run, cache, guided, tiny_dir, aime24_path, tmp_path):
    base = ["--model", tiny_dir / "qwen2", "--cache", cache, "--max-steps", 1]
    one_line(train(*base, "--out", tmp_path / "a", "--objective", "opd-plus", "--divergence", "kl2", expect=2),
             "--divergence", "kl2", "rkl")
    one_line(train(*base, "--out", tmp_path / "b", "--objective", "tropd", "--outlier", "drop", expect=2), "--outlier")
    one_line(train(*base, "--out", tmp_path / "c", "--objective", "tropd", "--tropd-topk", 64, expect=2),
             "--tropd-topk 64", f"top-{K}")
    sampled = tmp_path / "sampled.zarr"
    cache_rollouts(str(tiny_dir / "qwen2-b"), run / "rollouts" / "r000001.zarr", sampled, layers="last",
                   positions="last", logprobs="sampled", show_progress=False)
    one_line(train("--model", tiny_dir / "qwen2", "--cache", sampled, "--out", tmp_path / "d", "--objective", "tropd",
                   expect=2), "tropd", "teacher's own top-k", "--logprobs sampled")
    assert not (tmp_path / "d" / "metrics.jsonl").exists()
    # a guided rollout whose teacher has another tokenizer
    from oprd_cli.tiny import build_tiny_model, build_tokenizer

    tok = build_tokenizer(["another tokenizer entirely 0123456789"] * 4, tmp_path / "tok2", vocab_size=300)
    build_tiny_model(tmp_path / "other", tok, "qwen2", seed=5)
    args = ["rollout", "--model", tiny_dir / "qwen2", "--prompts", aime24_path, "--limit", 1, "--max-new-tokens", 4]
    one_line(run_cli(*args, "--out", tmp_path / "x.zarr", "--teacher-prefix", tmp_path / "other",
                     "--prefix-max-tokens", 2, expect=2), "another tokenizer", str(tmp_path / "other"))
    assert not (tmp_path / "x.zarr").exists()
    one_line(run_cli(*args, "--out", tmp_path / "y.zarr", "--prefix-max-tokens", 2, expect=2), "--teacher-prefix")
    one_line(run_cli(*args, "--out", tmp_path / "z.zarr", "--teacher-prefix", tiny_dir / "qwen2-b",
                     "--prefix-max-tokens", 2, "--prefix-mode", "random", expect=2), "--prefix-mode")
    one_line(run_cli("loop", "--run-dir", tmp_path / "lr", "--model", tiny_dir / "qwen2", "--teacher",
                     tiny_dir / "qwen2-b", "--prompts", aime24_path, "--rounds", 1, "--prefix-schedule", "linear",
                     expect=2), "--prefix-schedule")


def test_teacher_cache_objective_tropd_defaults_to_the_teacher_top64(run, tiny_dir, tmp_path):
    src = run / "rollouts" / "r000001.zarr"
    one_line(run_cli("teacher-cache", "--teacher", tiny_dir / "qwen2-b", "--rollouts", src, "--out",
                     tmp_path / "c.zarr", "--objective", "tropd", "--layers", "last", expect=2), "--topk 64")
    wide = tmp_path / "wide"
    run_cli("rollout", "--model", tiny_dir / "qwen2", "--prompts", Path(__file__).parent / "data" / "aime24.jsonl",
            "--out", wide / "r.zarr", "--limit", 1, "--num-samples", 1, "--max-new-tokens", 3, "--record-topk", 64)
    run_cli("teacher-cache", "--teacher", tiny_dir / "qwen2-b", "--rollouts", wide / "r.zarr", "--out",
            wide / "c.zarr", "--objective", "tropd", "--layers", "last")
    assert open_cache(str(wide / "c.zarr")).logprobs == {"mode": "topk", "k": 64}
    one_line(run_cli("teacher-cache", "--teacher", tiny_dir / "qwen2-b", "--rollouts", src, "--out",
                     tmp_path / "e.zarr", "--objective", "opd-minus", expect=2), "--objective")
    shutil.rmtree(wide)


def test_logprobs_at_is_the_full_log_softmax_at_the_ids_chunked_or_not(tiny_dir):
    from transformers import AutoModelForCausalLM

    from oprd_cli.backbone import logprobs_at

    model = AutoModelForCausalLM.from_pretrained(tiny_dir / "qwen2").float()
    torch.manual_seed(0)
    h = torch.randn(7, model.config.hidden_size, requires_grad=True)
    ids = torch.randint(0, model.config.vocab_size, (7, 5))
    ref = torch.log_softmax(model.lm_head(h).float(), -1).gather(-1, ids)
    got = {}
    for chunk in (0, 3):
        out = logprobs_at(model, h, ids, chunk)
        (g,) = torch.autograd.grad((out * torch.arange(35.0).view(7, 5)).sum(), h)
        got[chunk] = (out.detach(), g)
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got[0][1], got[3][1], rtol=1e-5, atol=1e-6)
