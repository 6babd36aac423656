"""`oprd train` and `oprd bench loss`, driven through the real commands on tiny models.

One rollout store (real `oprd rollout`) and one teacher cache (the real teacher pass) are built once
per module; training runs read them and write into their own folders.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM

from helpers import run_cli
from oprd_cli.models import weights_digest
from oprd_cli.stores.cache import open_cache
from oprd_cli.stores.rollouts import open_rollouts
from oprd_cli.teacher import cache_rollouts

LR = ["--lr", "3e-3"]
STILL_UNDER_OPRD = ["lm_head.weight"]


@pytest.fixture(scope="module")
def run(tmp_path_factory, tiny_dir, aime24_path) -> Path:
    """RUN/ with rollouts/r000001.zarr (8 samples, student top-4 ids) and cache/r000001.zarr from the
    other-seed teacher: all layers, last 8 positions, teacher log-probs on the sampled tokens and on
    the student's top-4 (``--logprobs topk``)."""
    root = tmp_path_factory.mktemp("train") / "run"
    run_cli("rollout", "--model", tiny_dir / "qwen2", "--prompts", aime24_path, "--run-dir", root, "--limit", 4,
            "--num-samples", 2, "--max-new-tokens", 12, "--record-topk", 4)
    cache_rollouts(str(tiny_dir / "qwen2-b"), root / "rollouts" / "r000001.zarr", root / "cache" / "r000001.zarr",
                   layers="all", positions="last_k", k=8, logprobs="topk", topk=4, show_progress=False)
    return root


@pytest.fixture(scope="module")
def cache(run) -> Path:
    return run / "cache" / "r000001.zarr"


def ragged_copy(src: Path, dest: Path, lengths: list[int]) -> Path:
    """A rollout store with the samples of ``src``, responses cut to ``lengths`` (cycled), written
    through the store's own writer: samples of different lengths without waiting for EOS."""
    from oprd_cli.stores.rollouts import RolloutWriter

    store = open_rollouts(str(src))
    meta = {k: v for k, v in store.meta.items() if k not in ("kind", "format_version", "created_at", "content_digest")}
    w = RolloutWriter(str(dest), meta, record_topk=store.record_topk)
    rows: dict[int, int] = {}
    for s in store.samples():
        if s.prompt_row not in rows:
            rows[s.prompt_row] = w.add_prompt(s.prompt_ids, s.prompt_index, s.prompt_id, s.answer)
        n = lengths[s.row % len(lengths)]
        w.add_sample(rows[s.prompt_row], s.sample_index, s.response_ids[:n], s.logprobs[:n], "length", s.text,
                     topk_ids=None if s.topk_ids is None else s.topk_ids[:n])
    w.finish()
    return dest


@pytest.fixture(scope="module")
def ragged(run, tiny_dir, tmp_path_factory) -> Path:
    """A cache of every response position and layer over samples of 12, 7, 3 and 10 tokens."""
    root = tmp_path_factory.mktemp("ragged")
    rollouts = ragged_copy(run / "rollouts" / "r000001.zarr", root / "rollouts.zarr", [12, 7, 3, 10])
    return Path(cache_rollouts(str(tiny_dir / "qwen2-b"), rollouts, root / "cache.zarr", layers="all",
                               positions="all", show_progress=False))


def metrics(folder: Path) -> list[dict]:
    return [json.loads(line) for line in (Path(folder) / "metrics.jsonl").read_text().splitlines()]


def copy_run(run: Path, dest: Path) -> Path:
    """A run directory of our own with the module's rollouts and cache (no checkpoints yet)."""
    shutil.copytree(run, dest, ignore=shutil.ignore_patterns("checkpoints", "metrics.jsonl"))
    return dest


def train(*args, expect: int = 0):
    return run_cli("train", *args, expect=expect)


def one_line_error(result, *needles: str, only_line: bool = True) -> str:
    """The command failed with one ``error:`` line (its only output when refused up front) and no
    traceback; returns that line."""
    out = result.stderr.strip()
    assert "Traceback" not in out, out
    lines = out.splitlines()
    assert lines and lines[-1].startswith("error:") and (len(lines) == 1 or not only_line), out
    for n in needles:
        assert n in lines[-1], out
    return lines[-1]


# ----------------------------------------------------------------------------- training works
def test_oprd_moves_student_toward_teacher_and_checkpoints_reload(run, tiny_dir, tmp_path):
    """Done means: 20-30 steps lower the OPRD loss and raise rep/cosine_similarity; checkpoints reload."""
    r = copy_run(run, tmp_path / "run")
    res = train("--run-dir", r, "--model", tiny_dir / "qwen2", "--max-steps", 24, "--batch-size", 4, *LR,
                "--save-every", 8, "--keep-last", 2, "--json")
    summary = json.loads(res.stdout)
    assert summary["step"] == 24 and summary["steps"] == 24 and summary["stopped"] == "max_steps"
    assert summary["consumed_caches"] == ["r000001.zarr"]
    assert "pass 2 over its 8 samples" in res.stderr  # 8 samples / 4 per step: passes repeat up to --max-steps
    m = metrics(r)
    assert [x["step"] for x in m] == list(range(1, 25))
    for key in ("step", "loss", "lr", "grad_norm", "tokens_per_s", "step_time_s", "peak_mem_bytes",
                "rep/cosine_similarity", "rep/loss/layer_01", "rep/loss/layer_02", "staleness", "oprd_form"):
        assert key in m[0], key
    assert "opd/kl" not in m[0] and "actor/entropy" not in m[0]  # OPRD alone: no LM head at all
    assert m[0]["oprd_form"] == "normalized" and m[0]["reduction"] == "token"  # the release's defaults
    assert m[0]["objective"] == "oprd" and m[0]["staleness"] == 0
    # per-layer losses average to the OPRD loss (Eq. 6 layer average)
    assert m[0]["rep/loss"] == pytest.approx((m[0]["rep/loss/layer_01"] + m[0]["rep/loss/layer_02"]) / 2, rel=1e-5)
    first, last = m[:2], m[-4:]
    assert np.mean([x["loss"] for x in last]) < 0.7 * np.mean([x["loss"] for x in first])
    assert np.mean([x["rep/cosine_similarity"] for x in last]) > np.mean([x["rep/cosine_similarity"] for x in first]) + 0.1
    # warm-up (3% of 24 -> 1 step) then cosine decay
    from oprd_cli.train.schedule import lr_factor

    lrs = [x["lr"] for x in m]
    assert lrs == pytest.approx([3e-3 * lr_factor(i, 1, 24) for i in range(24)], rel=1e-9)
    assert lrs[0] == pytest.approx(3e-3) and all(a > b for a, b in zip(lrs[1:], lrs[2:]))
    # checkpoints: --save-every 8 and --keep-last 2 leave steps 16 and 24
    ckpts = sorted(p.name for p in (r / "checkpoints").iterdir())
    assert ckpts == ["step-000016", "step-000024"]
    ck = r / "checkpoints" / "step-000024"
    for f in ("config.json", "model.safetensors", "tokenizer.json", "trainer_state.pt", "oprd_checkpoint.json"):
        assert (ck / f).exists(), f
    reloaded = AutoModelForCausalLM.from_pretrained(ck)
    initial = AutoModelForCausalLM.from_pretrained(tiny_dir / "qwen2")
    initial_params = dict(initial.named_parameters())
    still = sorted(n for n, p in reloaded.named_parameters() if torch.equal(p, initial_params[n]))
    assert still == STILL_UNDER_OPRD, still  # OPRD trains the backbone only: the LM head never moves
    assert all(torch.isfinite(p).all() for p in reloaded.parameters())
    marker = json.loads((ck / "oprd_checkpoint.json").read_text())
    assert marker["step"] == 24 and marker["checkpoint_steps"] == [8, 16, 24]
    assert marker["weights_digest"] == weights_digest(reloaded)  # the marker names exactly these weights
    assert marker["config"]["batch_size"] == 4 and marker["config"]["lr"] == 3e-3  # flat keys, as oprd.toml
    # the run's cache is used up: a second call says so and takes no step
    again = train("--run-dir", r, "--batch-size", 4, "--json")
    assert json.loads(again.stdout)["steps"] == 0 and "already trained on" in again.stderr


def test_first_step_loss_equals_eq6_by_hand(ragged, tiny_dir, tmp_path):
    """The trainer's first OPRD loss equals the release's OPRD computed from a plain HF forward of the
    student on prompt + response and the cache read directly: the state of response token t at
    sequence index Lp + t, masks, layer averaging. Defaults: normalized form, token-mean (every
    supervised token of the batch, then layers); raw form and sample-mean when asked for."""
    cache = ragged
    student = AutoModelForCausalLM.from_pretrained(tiny_dir / "qwen2", attn_implementation="eager").eval()
    c = open_cache(str(cache))
    rs = open_rollouts(c.rollout["path"])
    cb = c.read(list(range(c.num_samples)))
    err = {"raw": [], "normalized": []}  # per sample: [Lyr, k] per-token errors
    cos = []
    for i, s in enumerate(rs.samples()):
        seq = torch.tensor(np.concatenate([s.prompt_ids, s.response_ids]).astype(np.int64))[None]
        with torch.no_grad():
            hs = student(seq, output_hidden_states=True).hidden_states
        k = int(cb.mask[i].sum())
        idx = len(s.prompt_ids) + cb.positions[i, :k]  # the state that has read y_t
        r_l, n_l, c_l = [], [], []
        for j, layer in enumerate(c.layers):
            h, t = hs[layer][0, idx], cb.hidden[i, j, :k].float()
            r_l.append(((h - t) ** 2).sum(-1).div(h.shape[-1]))
            hn, tn = torch.nn.functional.normalize(h, dim=-1), torch.nn.functional.normalize(t, dim=-1)
            n_l.append(((hn - tn) ** 2).sum(-1).div(h.shape[-1]))
            c_l.append(torch.nn.functional.cosine_similarity(h, t, dim=-1))
        err["raw"].append(torch.stack(r_l))
        err["normalized"].append(torch.stack(n_l))
        cos.append(torch.stack(c_l))

    def token_mean(per):  # all supervised tokens of the batch per layer, then layers
        return float(torch.cat(per, dim=1).mean(dim=1).mean())

    def sample_mean(per):  # Eq. 6 literally: per sample over its tokens, layers, then samples
        return float(torch.stack([e.mean(dim=1).mean() for e in per]).mean())

    n = c.num_samples
    lengths = [int(x) for x in cb.mask.sum(-1)]
    assert len(set(lengths)) > 1, lengths  # samples of different lengths: the two means differ
    cases = [([], "normalized", "token", token_mean(err["normalized"])),
             (["--oprd-form", "raw", "--reduction", "sample"], "raw", "sample", sample_mean(err["raw"])),
             (["--oprd-form", "raw"], "raw", "token", token_mean(err["raw"])),
             (["--reduction", "sample"], "normalized", "sample", sample_mean(err["normalized"]))]
    assert abs(cases[1][3] - cases[2][3]) > 1e-3 * abs(cases[2][3])
    for i, (flags, form, reduction, expected) in enumerate(cases):
        out = tmp_path / f"case{i}"
        train("--model", tiny_dir / "qwen2", "--cache", cache, "--out", out, "--max-steps", 1, "--batch-size", n,
              *flags)
        m = metrics(out)[0]
        assert (m["oprd_form"], m["reduction"]) == (form, reduction)
        assert m["loss"] == pytest.approx(expected, rel=1e-4), (flags, m["loss"], expected)
        assert m["rep/cosine_similarity"] == pytest.approx(float(torch.cat(cos, 1).mean(1).mean()), abs=1e-4)


@pytest.mark.parametrize("objective,extra,keys,absent", [
    ("opd-top1", [], ["opd/pg_loss", "opd/kl", "opd/clip_frac", "actor/entropy"], ["rep/cosine_similarity"]),
    ("opd-topk", [], ["opd/kl", "opd/topk_overlap", "actor/entropy"], ["rep/cosine_similarity"]),
    ("opd-topk", ["--topk-logits", "full", "--mu", "1"], ["opd/kl", "rep/cosine_similarity", "rep/loss"], []),
    ("opd-top1", ["--mu", "10"], ["opd/pg_loss", "rep/cosine_similarity", "rep/loss/layer_02"], []),
])
def test_each_objective_runs_and_logs_its_metrics(cache, tiny_dir, tmp_path, objective, extra, keys, absent):
    out = tmp_path / "out"
    train("--model", tiny_dir / "qwen2", "--cache", cache, "--out", out, "--objective", objective,
          "--max-steps", 3, "--batch-size", 4, *LR, *extra)
    m = metrics(out)
    assert len(m) == 3 and all(math.isfinite(x["loss"]) for x in m)
    for k in keys:
        assert k in m[-1], k
    for k in absent:
        assert k not in m[-1], k
    mu = float(extra[extra.index("--mu") + 1]) if "--mu" in extra else 0.0
    assert m[0]["mu"] == mu and m[0]["objective"] == objective
    if mu:  # L = L_OPD + mu * L_OPRD (Eq. 7)
        assert m[0]["loss"] == pytest.approx(m[0]["opd/loss"] + mu * m[0]["rep/loss"], rel=1e-5)
    if objective == "opd-top1":
        # the cache's rollouts come from exactly these weights: step 1 is on-policy (ratio 1, nothing
        # clipped); later steps use the behaviour log-probs for the clipped importance ratio
        assert m[0]["off_policy"] == 0 and m[0]["opd/clip_frac"] == 0
        assert m[1]["off_policy"] == 1


def test_resume_gives_the_losses_of_an_uninterrupted_run(run, cache, tiny_dir, tmp_path):
    common = ["--batch-size", 4, "--total-steps", 6, *LR]
    whole = tmp_path / "whole"
    train("--model", tiny_dir / "qwen2", "--cache", cache, "--out", whole, "--max-steps", 6, *common)
    # explicit cache: stop mid-pass at step 3, then --resume
    part = tmp_path / "part"
    train("--model", tiny_dir / "qwen2", "--cache", cache, "--out", part, "--max-steps", 3, *common)
    res = train("--model", tiny_dir / "qwen2", "--cache", cache, "--out", part, "--max-steps", 6, "--resume", *common)
    assert "without --resume" not in res.stderr
    # run directory: stop at a pass boundary (step 2), then call again (a run directory always continues)
    r = copy_run(run, tmp_path / "run")
    train("--run-dir", r, "--model", tiny_dir / "qwen2", "--max-steps", 2, *common)
    train("--run-dir", r, "--max-steps", 6, *common)
    expected = [x["loss"] for x in metrics(whole)]
    assert len(expected) == 6
    assert [x["loss"] for x in metrics(part)] == expected
    assert [x["loss"] for x in metrics(r)] == expected
    assert [x["lr"] for x in metrics(r)] == [x["lr"] for x in metrics(whole)]
    # an explicit --out that already has checkpoints is not silently continued or overwritten
    res = train("--model", tiny_dir / "qwen2", "--cache", cache, "--out", part, "--max-steps", 8, expect=2)
    one_line_error(res, "--resume")


def test_micro_batches_and_gradient_checkpointing_change_nothing(cache, tiny_dir, tmp_path):
    """Token-budget micro-batches with gradient accumulation give the optimizer-batch loss and the same
    update; so does gradient checkpointing."""
    runs = {}
    for name, extra in (("one", []), ("micro", ["--micro-batch-tokens", 40]), ("ckpt", ["--gradient-checkpointing"])):
        out = tmp_path / name
        train("--model", tiny_dir / "qwen2", "--cache", cache, "--out", out, "--max-steps", 2, "--batch-size", 8,
              "--objective", "opd-top1", "--mu", 1, *LR, *extra)
        runs[name] = metrics(out)
    assert runs["one"][0]["num_micro_batches"] == 1 and runs["micro"][0]["num_micro_batches"] > 1
    for name in ("micro", "ckpt"):
        for a, b in zip(runs["one"], runs[name]):
            assert b["loss"] == pytest.approx(a["loss"], rel=1e-5, abs=1e-7)
            assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-4)


def test_follow_staleness_and_stop_conditions(run, tiny_dir, tmp_path):
    r = copy_run(run, tmp_path / "run")
    res = train("--run-dir", r, "--model", tiny_dir / "qwen2", "--batch-size", 4, "--follow", "--poll-seconds",
                0.05, "--timeout", 0.2, "--json")
    s = json.loads(res.stdout)
    assert s["stopped"] == "timeout" and s["step"] == 2 and "waiting for new caches" in res.stderr
    assert (r / "checkpoints" / "step-000002").is_dir()
    # a second round made from the same (initial) policy: one checkpoint behind the student now
    for sub in ("rollouts", "cache"):
        shutil.copytree(r / sub / "r000001.zarr", r / sub / "r000002.zarr")
    res = train("--run-dir", r, "--batch-size", 4, "--max-staleness", 0, "--json")
    assert "skipping cache r000002.zarr" in res.stderr and "--max-staleness 0" in res.stderr
    assert json.loads(res.stdout)["steps"] == 0
    res = train("--run-dir", r, "--batch-size", 4, "--follow", "--max-caches", 1, "--max-staleness", 1,
                "--poll-seconds", 0.05, "--json")
    s = json.loads(res.stdout)
    assert s["stopped"] == "max_caches" and s["consumed_caches"] == ["r000002.zarr"] and s["step"] == 4
    m = metrics(r)
    assert [x["staleness"] for x in m] == [0, 0, 1, 1] and m[-1]["cache_name"] == "r000002.zarr"


def test_opd_topk_on_a_cache_with_a_smaller_topk_uses_the_common_support(run, tiny_dir, tmp_path):
    """Rollouts record the student's top-4 ids; a cache made with --topk 2 holds the teacher's log-probs
    on the first 2 of them. opd-topk trains on that common support (it crashed before), and its
    first-step KL equals the KL renormalised on those 2 ids, computed by hand."""
    rpath = run / "rollouts" / "r000001.zarr"
    small = tmp_path / "top2.zarr"
    run_cli("teacher-cache", "--teacher", tiny_dir / "qwen2-b", "--rollouts", rpath, "--out", small,
            "--layers", "last", "--positions", "last", "--logprobs", "topk", "--topk", 2)
    c = open_cache(str(small))
    assert c.logprobs["k"] == 2 and open_rollouts(str(rpath)).record_topk == 4
    out = tmp_path / "out"
    train("--model", tiny_dir / "qwen2", "--cache", small, "--out", out, "--objective", "opd-topk",
          "--max-steps", 2, "--batch-size", c.num_samples, *LR)
    m = metrics(out)
    assert len(m) == 2 and all(math.isfinite(x["loss"]) for x in m) and "opd/topk_overlap" in m[0]
    student = AutoModelForCausalLM.from_pretrained(tiny_dir / "qwen2", attn_implementation="eager").eval()
    cb = c.read(list(range(c.num_samples)))
    kls = []
    for i, s in enumerate(open_rollouts(str(rpath)).samples()):
        ids = torch.tensor(np.concatenate([s.prompt_ids, s.response_ids]).astype(np.int64))[None]
        with torch.no_grad():
            logits = student(ids).logits[0].float()
        Lp, T = len(s.prompt_ids), len(s.response_ids)
        sup = torch.as_tensor(s.topk_ids[:, :2], dtype=torch.long)  # the common support: first 2 of 4
        zs = logits[Lp - 1:Lp - 1 + T].gather(1, sup)  # the distribution over y_t comes from Lp - 1 + t
        logp = torch.log_softmax(zs, -1)
        logq = torch.log_softmax(cb.support_logprobs[i, :T], -1)
        kls.append((logp.exp() * (logp - logq)).sum(-1))
    assert m[0]["opd/kl"] == pytest.approx(float(torch.cat(kls).mean()), rel=1e-4)


def test_warns_once_when_opd_trains_on_warped_rollouts(tiny_dir, aime24_path, tmp_path):
    """Rollouts sampled at temperature 0.7 / top-p 0.9: an OPD objective (teacher log-probs, importance
    ratios) warns once per invocation, not per step; OPRD alone does not warn."""
    r = tmp_path / "run"
    run_cli("rollout", "--model", tiny_dir / "qwen2", "--prompts", aime24_path, "--run-dir", r, "--limit", 2,
            "--num-samples", 2, "--max-new-tokens", 6, "--temperature", 0.7, "--top-p", 0.9)
    cache_rollouts(str(tiny_dir / "qwen2-b"), r / "rollouts" / "r000001.zarr", r / "cache" / "r000001.zarr",
                   layers="last", positions="last", logprobs="sampled", show_progress=False)
    c = r / "cache" / "r000001.zarr"
    res = train("--model", tiny_dir / "qwen2", "--cache", c, "--out", tmp_path / "a", "--objective", "opd-top1",
                "--max-steps", 3, "--batch-size", 2, *LR)
    assert len(metrics(tmp_path / "a")) == 3
    err = " ".join(res.stderr.split())
    assert err.count("warped") == 1, res.stderr
    assert "warning:" in err and "temperature 0.7" in err and "top_p 0.9" in err
    res = train("--model", tiny_dir / "qwen2", "--cache", c, "--out", tmp_path / "b", "--max-steps", 2,
                "--batch-size", 2, *LR)
    assert "warped" not in res.stderr


# ----------------------------------------------------------------------------- bad input
def test_refuses_caches_that_do_not_fit(run, cache, tiny_dir, tmp_path):
    from oprd_cli.tiny import build_tiny_model, build_tokenizer
    from transformers import AutoTokenizer

    out = tmp_path / "out"
    res = train("--model", tiny_dir / "qwen2-deep", "--cache", cache, "--out", out, expect=2)
    one_line_error(res, "depth: teacher 2 layers vs student 4")
    tok = AutoTokenizer.from_pretrained(tiny_dir / "tokenizer")
    build_tiny_model(tmp_path / "narrow", tok, "qwen2", hidden_size=32)
    res = train("--model", tmp_path / "narrow", "--cache", cache, "--out", out, expect=2)
    one_line_error(res, "width: teacher hidden size 64 vs student 32")
    other_tok = build_tokenizer(["completely different text " * 10, "0123456789 abc"], tmp_path / "tok2",
                                vocab_size=300)
    build_tiny_model(tmp_path / "other-tok", other_tok, "qwen2")
    res = train("--model", tmp_path / "other-tok", "--cache", cache, "--out", out, expect=2)
    one_line_error(res, "another tokenizer")
    incomplete = tmp_path / "incomplete.zarr"
    shutil.copytree(cache, incomplete)
    (incomplete / "oprd_complete.json").unlink()
    res = train("--model", tiny_dir / "qwen2", "--cache", incomplete, "--out", out, expect=2)
    one_line_error(res, "incomplete.zarr")
    # a cache of format version 1 (hidden states at Lp - 1 + t) is refused, never misread
    old = tmp_path / "old.zarr"
    shutil.copytree(cache, old)
    import zarr

    g = zarr.open_group(str(old), mode="r+")
    g.attrs["oprd"] = {**g.attrs["oprd"], "format_version": 1}
    res = train("--model", tiny_dir / "qwen2", "--cache", old, "--out", out, expect=2)
    one_line_error(res, "format version 1", "oprd teacher-cache")
    # opd-top1 on a cache without teacher log-probs
    plain = tmp_path / "plain.zarr"
    cache_rollouts(str(tiny_dir / "qwen2-b"), run / "rollouts" / "r000001.zarr", plain, layers="last", k=4,
                   show_progress=False)
    res = train("--model", tiny_dir / "qwen2", "--cache", plain, "--out", out, "--objective", "opd-top1", expect=2)
    one_line_error(res, "--logprobs")
    assert not out.exists() or not any((out / "checkpoints").glob("step-*"))


def test_refuses_bad_arguments(run, tiny_dir, cache, tmp_path):
    empty_run = tmp_path / "empty"
    empty_run.mkdir()
    res = train("--run-dir", empty_run, "--model", tiny_dir / "qwen2", expect=2)
    one_line_error(res, "no complete teacher cache", "oprd teacher-cache")
    res = train("--model", tiny_dir / "qwen2", "--cache", cache, "--out", tmp_path / "o", "--lr", 0, expect=2)
    one_line_error(res, "--lr must be > 0")
    res = train("--model", tiny_dir / "qwen2", "--cache", tmp_path / "nope.zarr", "--out", tmp_path / "o", expect=2)
    one_line_error(res, "no teacher cache", "oprd teacher-cache")
    fake = tmp_path / "r" / "checkpoints" / "step-000003"
    fake.mkdir(parents=True)
    (fake / "config.json").write_text("{}")
    res = train("--model", fake, "--cache", cache, "--out", tmp_path / "o", expect=2)
    one_line_error(res, "not a complete oprd checkpoint")
    res = train("--model", tmp_path / "r", "--cache", cache, "--out", tmp_path / "o", expect=2)
    one_line_error(res)
    res = train("--model", tiny_dir / "qwen2", "--cache", cache, "--out", tmp_path / "o", "--resume", expect=2)
    one_line_error(res, "nothing to resume")
    assert not (tmp_path / "o" / "checkpoints").exists() or not any((tmp_path / "o" / "checkpoints").iterdir())


def test_nan_loss_stops_with_step_and_last_good_checkpoint(cache, tiny_dir, tmp_path, monkeypatch):
    out = tmp_path / "out"
    from oprd_cli.train.step import Trainer

    micro_loss = Trainer.micro_loss

    def nan_at_step_3(self, *args, **kwargs):  # the loss of global step 3 becomes NaN
        loss = micro_loss(self, *args, **kwargs)
        return loss * float("nan") if self.step + 1 == 3 else loss

    monkeypatch.setattr(Trainer, "micro_loss", nan_at_step_3)
    res = train("--model", tiny_dir / "qwen2", "--cache", cache, "--out", out, "--max-steps", 5, "--batch-size", 4,
                expect=2)
    one_line_error(res, "step 3", "nan", "step-000002", only_line=False)
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-000002"]
    assert [x["step"] for x in metrics(out)] == [1, 2]
    reloaded = AutoModelForCausalLM.from_pretrained(out / "checkpoints" / "step-000002")
    assert all(torch.isfinite(p).all() for p in reloaded.parameters())


# ----------------------------------------------------------------------------- pieces
def test_oprd_step_never_touches_the_lm_head_and_stops_at_the_deepest_layer(tiny_dir):
    from oprd_cli.bench.loss import BenchLossConfig, _batch
    from oprd_cli.train import TrainConfig, Trainer
    from oprd_cli.train.step import StepTotals, _Acc

    model = AutoModelForCausalLM.from_pretrained(tiny_dir / "qwen2-deep", attn_implementation="eager")
    ran = []
    for i, block in enumerate(model.model.layers):
        block.register_forward_hook(lambda *a, i=i: ran.append(i))
    bc = BenchLossConfig(num_layers=4, seq_len=10, last_k=4, batch_size=2, prompt_len=5, hidden_size=64,
                         vocab_size=model.config.vocab_size, topk=4)
    for objective, layers, blocks, head_grad in (("oprd", [2], [0, 1], False), ("opd-top1", [], [0, 1, 2, 3], True)):
        cfg = TrainConfig.from_flat(objective=objective)
        trainer = Trainer(model, cfg, layers, torch.device("cpu"), total_steps=None)
        mb = _batch(bc, objective, layers)
        ran.clear()
        model.zero_grad(set_to_none=True)
        trainer.micro_loss(mb, StepTotals.of([mb]), on_policy=True, acc=_Acc()).backward()
        assert sorted(set(ran)) == blocks, objective
        assert (model.lm_head.weight.grad is not None) == head_grad, objective
        if objective == "oprd":  # gradients reach only the blocks that produced the supervised states
            assert all(p.grad is None for p in model.model.layers[3].parameters())


def test_lr_schedule_and_prefetcher():
    from oprd_cli.train.batches import Prefetcher, plan_steps
    from oprd_cli.train.schedule import lr_factor, warmup_steps

    w = warmup_steps(100, 0.03)
    assert w == 3
    f = [lr_factor(s, w, 100) for s in range(100)]
    assert f[:3] == pytest.approx([1 / 3, 2 / 3, 1.0]) and f[3] == pytest.approx(1.0)
    assert f[53] == pytest.approx(0.5 * (1 + math.cos(math.pi * 50 / 97)))
    assert all(a >= b for a, b in zip(f[3:], f[4:])) and lr_factor(100, w, 100) == pytest.approx(0.0)
    # each pass over a cache is a permutation of its rows; passes differ; a longer plan extends a shorter one
    p3 = plan_steps(10, 4, 3, 0, "sha256:abcd")
    p2 = plan_steps(10, 4, 2, 0, "sha256:abcd")
    assert [e for e, _ in p3] == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    assert all((a[1] == b[1]).all() for a, b in zip(p2, p3))
    assert sorted(np.concatenate([r for e, r in p3 if e == 1]).tolist()) == list(range(10))

    def produce(i):
        if i == 2:
            raise ValueError("boom at 2")
        return i

    got = []
    with pytest.raises(ValueError, match="boom at 2"):
        with Prefetcher(produce, 5, depth=2) as pf:
            for x in pf:
                got.append(x)
    assert got == [0, 1]


def test_bench_loss_reports_three_objectives_and_ratios():
    small = ["--num-layers", 1, "--seq-len", 24, "--last-k", 8, "--batch-size", 1, "--prompt-len", 4,
             "--hidden-size", 32, "--vocab-size", 2048, "--intermediate-size", 64, "--num-heads", 2,
             "--num-kv-heads", 1, "--repeats", 1, "--threads", 1]
    r = json.loads(run_cli("bench", "loss", *small, "--no-isolate", "--json").stdout)
    assert r["objectives"] == ["opd_top1", "opd_top16", "opd_top16_support", "oprd"]
    for name in r["objectives"]:
        assert r[name]["step_time_s"] > 0 and isinstance(r[name]["delta_peak_bytes"], int)
    assert r["speedup_vs_top16"] == pytest.approx(r["opd_top16"]["step_time_s"] / r["oprd"]["step_time_s"])
    top16_peak = r["opd_top16"]["delta_peak_bytes"]  # at this toy size it may be within RSS page noise, even 0
    assert r["delta_peak_ratio_vs_top16"] == (pytest.approx(r["oprd"]["delta_peak_bytes"] / top16_peak)
                                              if top16_peak else None)
    assert r["geometry"]["vocab_size"] == 2048 and r["machine"]["cpu_cores"]
    assert r["opd_top16"]["topk_logits"] == "full" and r["oprd"]["entropy"] is False
    # the default: each objective in a fresh process
    r = json.loads(run_cli("bench", "loss", *small, "--objectives", "oprd", "--json").stdout)
    assert r["oprd"]["delta_peak_bytes"] > 0 and r["speedup_vs_top16"] is None
    assert "fresh process" in r["memory_measure"]
    res = run_cli("bench", "loss", "--objectives", "nope", expect=2)
    one_line_error(res, "--objectives")


# ----------------------------------------------------------------------------- end to end
def test_cli_rollout_teacher_cache_train(tiny_dir, aime24_path, tmp_path):
    """`oprd rollout` -> `oprd teacher-cache` -> `oprd train` from the command line, twice around."""
    r = tmp_path / "run"
    run_cli("rollout", "--model", tiny_dir / "qwen2", "--prompts", aime24_path, "--run-dir", r, "--limit", 2,
            "--num-samples", 2, "--max-new-tokens", 8)
    run_cli("teacher-cache", "--run-dir", r, "--teacher", tiny_dir / "qwen2-b", "--k", 4)
    res = train("--run-dir", r, *LR, "--batch-size", 2, "--json")
    s = json.loads(res.stdout)
    assert s["step"] == 2 and s["checkpoint"].endswith("step-000002")
    # the next round samples from the new checkpoint, and training continues from it
    run_cli("rollout", "--run-dir", r, "--limit", 2, "--num-samples", 2, "--max-new-tokens", 8)
    run_cli("teacher-cache", "--run-dir", r, "--teacher", tiny_dir / "qwen2-b", "--k", 4)
    s = json.loads(train("--run-dir", r, *LR, "--batch-size", 2, "--json").stdout)
    assert s["start_step"] == 2 and s["step"] == 4 and s["consumed_caches"] == ["r000002.zarr"]
    m = metrics(r)
    assert [x["staleness"] for x in m] == [0, 0, 0, 0] and m[2]["policy_step"] == 2
    AutoModelForCausalLM.from_pretrained(r / "checkpoints" / "step-000004")


def _help(*cmd) -> str:
    """Help text with rich's box drawing and line wrapping removed."""
    import re

    return re.sub(r"\s+", " ", re.sub(r"[│╭╮╰╯─]", " ", run_cli(*cmd, "--help").stdout))


def test_help_shows_defaults_and_the_interface():
    out = _help("train")
    for text in ("--run-dir", "--objective", "--mu", "--max-steps", "--follow", "--resume", "--max-staleness",
                 "--max-caches", "(default: oprd)", "(default: 1e-5)", "(default: 0.03)", "(default: normalized)",
                 "(default: token)"):
        assert text in out, text
    out = _help("bench", "loss")
    for text in ("--num-layers", "--seq-len", "--last-k", "--batch-size", "--json", "1536", "151936"):
        assert text in out, text


def test_every_flag_docs_training_md_names_exists():
    """docs/training.md documents only flags that `oprd train`, `oprd bench loss` (or, named as such,
    the rollout and teacher-cache stages) really have; settings without a flag are named as oprd.toml keys."""
    import re

    import typer.main

    from oprd_cli.cli import app

    cmd = typer.main.get_command(app)

    def opts(*path):
        c = cmd
        for name in path:
            c = c.commands[name]
        return {o for p in c.params for o in (*p.opts, *p.secondary_opts)}

    known = opts("train") | opts("bench", "loss") | opts("teacher-cache") | opts("rollout")
    doc = (Path(__file__).resolve().parents[1] / "docs" / "training.md").read_text()
    missing = sorted(set(re.findall(r"--[a-z][a-z0-9-]*[a-z0-9]", doc)) - known)
    assert not missing, missing
    for flag in ("--min-lr-ratio", "--logits-chunk-tokens", "--prefetch", "--micro-batch-tokens",
                 "--gradient-checkpointing"):
        assert flag in opts("train"), flag


# ----------------------------------------------------------------------------- the step's arithmetic
PROMPTS, RESPONSES, P_CACHED = [4, 6, 4, 5], [5, 9, 3, 7], 4


def _samples(model, layers: list[int], K: int = 4, seed: int = 0) -> list[dict]:
    """Four ragged samples with every array an objective reads (what a rollout + cache hold)."""
    g = torch.Generator().manual_seed(seed)
    V, d = model.config.vocab_size, model.config.hidden_size
    out = []
    for lp, t in zip(PROMPTS, RESPONSES):
        p = min(P_CACHED, t)
        out.append({"prompt": torch.randint(0, V, (lp,), generator=g),
                    "response": torch.randint(0, V, (t,), generator=g),
                    "behaviour": -torch.rand(t, generator=g) * 3, "teacher_lp": -torch.rand(t, generator=g) * 3,
                    "support": torch.stack([torch.randperm(V, generator=g)[:K] for _ in range(t)]),
                    "support_lp": torch.log_softmax(torch.randn(t, K, generator=g), -1),
                    "hidden": torch.randn(len(layers), p, d, generator=g), "positions": torch.arange(t - p, t)})
    return out


def _micro_batch(samples: list[dict], rows: list[int]):
    """The right-padded micro-batch of ``rows`` (as batches.assemble lays it out)."""
    from oprd_cli.train import MicroBatch

    ss = [samples[r] for r in rows]
    S = max(len(s["prompt"]) + len(s["response"]) for s in ss)
    T = max(len(s["response"]) for s in ss)
    P = max(len(s["positions"]) for s in ss)
    b, K, (Ly, _, d) = len(ss), ss[0]["support"].shape[1], ss[0]["hidden"].shape
    mb = MicroBatch(rows=np.array(rows), input_ids=torch.zeros(b, S, dtype=torch.long),
                    prompt_lens=torch.tensor([len(s["prompt"]) for s in ss]),
                    response_ids=torch.zeros(b, T, dtype=torch.long),
                    response_mask=torch.zeros(b, T, dtype=torch.bool), behaviour_logprobs=torch.zeros(b, T),
                    support_ids=torch.zeros(b, T, K, dtype=torch.long), teacher_hidden=torch.zeros(b, Ly, P, d),
                    hidden_mask=torch.zeros(b, P, dtype=torch.bool), hidden_positions=torch.full((b, P), -1),
                    teacher_logprobs=torch.zeros(b, T), support_logprobs=torch.zeros(b, T, K))
    for i, s in enumerate(ss):
        lp, t, p = len(s["prompt"]), len(s["response"]), len(s["positions"])
        mb.input_ids[i, :lp + t] = torch.cat([s["prompt"], s["response"]])
        mb.response_ids[i, :t], mb.response_mask[i, :t] = s["response"], True
        mb.behaviour_logprobs[i, :t], mb.teacher_logprobs[i, :t] = s["behaviour"], s["teacher_lp"]
        mb.support_ids[i, :t], mb.support_logprobs[i, :t] = s["support"], s["support_lp"]
        mb.teacher_hidden[i, :, :p], mb.hidden_mask[i, :p], mb.hidden_positions[i, :p] = s["hidden"], True, s["positions"]
    return mb


def _loss_and_grads(model, cfg, layers, mbs, autocast=None):
    from oprd_cli.train import Trainer
    from oprd_cli.train.step import StepTotals, _Acc

    trainer = Trainer(model, cfg, layers, torch.device("cpu"), total_steps=None)
    model.zero_grad(set_to_none=True)
    totals, acc, loss = StepTotals.of(mbs), _Acc(), 0.0
    for mb in mbs:
        with torch.autocast("cpu", dtype=autocast) if autocast else torch.autocast("cpu", enabled=False):
            part = trainer.micro_loss(mb, totals, on_policy=False, acc=acc)
        part.backward()
        loss += float(part.detach())
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return loss, grads, acc.values()


@pytest.mark.parametrize("objective,mu", [("oprd", None), ("opd-top1", 1.0), ("opd-topk", 1.0)])
@pytest.mark.parametrize("reduction", ["token", "sample"])
def test_micro_batches_give_the_loss_and_gradient_of_one_batch(tiny_dir, objective, mu, reduction):
    """A step split into ragged micro-batches (gradient accumulation, weights from the step's totals)
    has exactly the loss, the gradient and the logged statistics of the same step as one batch."""
    from oprd_cli.train import TrainConfig

    model = AutoModelForCausalLM.from_pretrained(tiny_dir / "qwen2", attn_implementation="eager")
    layers = [1, 2]
    samples = _samples(model, layers)
    cfg = TrainConfig.from_flat(objective=objective, mu=mu, reduction=reduction, entropy=True)
    one = _loss_and_grads(model, cfg, layers, [_micro_batch(samples, [0, 1, 2, 3])])
    split = _loss_and_grads(model, cfg, layers, [_micro_batch(samples, [0, 3]), _micro_batch(samples, [1]),
                                                 _micro_batch(samples, [2])])
    assert split[0] == pytest.approx(one[0], rel=1e-5) and one[0] != 0
    assert split[1].keys() == one[1].keys() and len(one[1]) > 0
    for name, g in one[1].items():
        torch.testing.assert_close(split[1][name], g, rtol=1e-4, atol=1e-7, msg=name)
    assert split[2].keys() == one[2].keys()
    for key, v in one[2].items():
        assert split[2][key] == pytest.approx(v, rel=1e-5, abs=1e-8), key


@pytest.mark.parametrize("objective,mu", [("oprd", None), ("opd-top1", 1.0), ("opd-topk", 1.0)])
def test_bf16_autocast_on_cpu_gives_finite_losses_close_to_fp32(tiny_dir, objective, mu):
    """The bf16 path: under CPU autocast every objective gives finite losses and gradients within bf16
    rounding of float32 (the loss code upcasts what it reduces)."""
    from oprd_cli.train import TrainConfig

    model = AutoModelForCausalLM.from_pretrained(tiny_dir / "qwen2", attn_implementation="eager")
    layers = [1, 2]
    mbs = [_micro_batch(_samples(model, layers), [0, 1, 2, 3])]
    cfg = TrainConfig.from_flat(objective=objective, mu=mu)
    fp32 = _loss_and_grads(model, cfg, layers, mbs)
    bf16 = _loss_and_grads(model, cfg, layers, mbs, autocast=torch.bfloat16)
    assert math.isfinite(bf16[0]) and bf16[0] == pytest.approx(fp32[0], rel=2e-2)
    num = sum(float((bf16[1][n] - g).norm() ** 2) for n, g in fp32[1].items()) ** 0.5
    den = sum(float(g.norm() ** 2) for g in fp32[1].values()) ** 0.5
    assert all(torch.isfinite(g).all() for g in bf16[1].values()) and num < 0.1 * den


# ----------------------------------------------------------------------------- configuration
def test_oprd_toml_train_section_precedence_flag_over_toml_over_default(run, tiny_dir, tmp_path):
    r = copy_run(run, tmp_path / "run")
    (r / "oprd.toml").write_text('[models]\nstudent = "%s"\n\n[train]\nlr = 2e-3\nbatch_size = 2\nmax_steps = 1\n'
                                 'warmup_ratio = 0.5\n' % (tiny_dir / "qwen2"))
    train("--run-dir", r, "--batch-size", 4, "--total-steps", 10)
    m = metrics(r)
    assert len(m) == 1  # max_steps from the toml
    assert m[0]["num_samples"] == 4  # the flag beats the toml's batch_size 2
    assert m[0]["lr"] == pytest.approx(2e-3 * 1 / 5)  # toml lr and warm-up (5 of 10 steps) over the defaults
    cfg = json.loads((r / "checkpoints" / "step-000001" / "oprd_checkpoint.json").read_text())["config"]
    assert (cfg["lr"], cfg["batch_size"], cfg["max_steps"], cfg["total_steps"]) == (2e-3, 4, 1, 10)
    assert (cfg["weight_decay"], cfg["objective"], cfg["micro_batch_tokens"]) == (0.01, "oprd", 16384)  # defaults
    (r / "oprd.toml").write_text("[train]\nlearning_rate = 1e-4\n")
    res = train("--run-dir", r, expect=2)
    one_line_error(res, "learning_rate")


def test_train_config_groups_map_flat_keys_one_to_one():
    from dataclasses import fields

    from oprd_cli.errors import OprdError
    from oprd_cli.train import TrainConfig

    names = [f.name for f in TrainConfig.flat_fields()]
    assert len(names) == len(set(names)) == 49  # (37 + 10 OPD+/TrOPD + bridge + report_to) every flat key (oprd.toml, flag) lives in exactly one group
    assert {f.name for f in fields(TrainConfig)} == {"loss", "optim", "batching", "checkpoint", "run", "runtime"}
    default = TrainConfig()
    assert TrainConfig.from_flat(default.to_flat()) == default
    assert default.to_flat() == {f.name: f.default for f in TrainConfig.flat_fields()}
    cfg = TrainConfig.from_flat({"lr": 3e-4, "objective": "opd-top1", "follow": True, "keep_last": 2})
    assert (cfg.optim.lr, cfg.loss.objective, cfg.run.follow, cfg.checkpoint.keep_last) == (3e-4, "opd-top1", True, 2)
    assert cfg.loss.oprd_coef == 0.0 and TrainConfig().loss.oprd_coef == 1.0
    assert cfg.replace(mu=2.0).loss.oprd_coef == 2.0 and cfg.loss.mu is None  # a copy
    with pytest.raises(OprdError, match="unknown train setting.*learning_rate"):
        TrainConfig.from_flat({"learning_rate": 1.0})
    with pytest.raises(OprdError, match="--keep-last must be at least 1"):
        TrainConfig.from_flat(keep_last=0).validate()


def test_no_test_hook_is_read_by_the_trainer():
    """Faults are injected by the tests (monkeypatch), never through variables the product reads."""
    import oprd_cli.train as pkg

    for f in Path(pkg.__file__).parent.glob("*.py"):
        src = f.read_text()
        assert "OPRD_TEST" not in src and "os.environ" not in src, f.name


# ----------------------------------------------------------------------------- checkpoint policy, cache choice
class _FakeModel(torch.nn.Linear):
    def save_pretrained(self, path, safe_serialization=True):
        (Path(path) / "config.json").write_text("{}")


class _FakeTrainer:
    def __init__(self):
        self.model, self.step, self.finite = _FakeModel(2, 2), 0, True

    def state_dict(self):
        return {"step": self.step}

    def params_finite(self):
        return self.finite


def test_checkpointer_owns_when_to_save_and_what_to_keep(tmp_path):
    from oprd_cli.train.checkpoint import Checkpointer, read_marker

    trainer, steps = _FakeTrainer(), []
    ck = Checkpointer(tmp_path / "checkpoints", trainer, None, lambda: {"note": trainer.step}, steps,
                      save_every=2, keep_last=2, latest=None, saved_step=None)
    assert not ck.pending and ck.save_pending() is None  # nothing taken, nothing saved
    for _ in range(5):
        trainer.step += 1
        ck.after_step()
    assert steps == [2, 4] and ck.pending
    assert ck.save_pending().endswith("step-000005") and steps == [2, 4, 5] and not ck.pending
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step-000004", "step-000005"]
    assert read_marker(tmp_path / "checkpoints" / "step-000005")["note"] == 5
    trainer.step, trainer.finite = 6, False  # a failed step 7 after an unsaved, non-finite step 6
    assert ck.last_good().endswith("step-000005")  # not saved: the weights are not finite
    with pytest.raises(Exception, match="no longer finite"):
        ck.save()


def test_next_source_takes_the_newest_cache_and_skips_older_and_stale_ones(tmp_path):
    from types import SimpleNamespace

    from oprd_cli.train import TrainConfig
    from oprd_cli.train.selection import RunState, Source, next_source

    def src(i, policy_step):
        return Source(path=str(tmp_path / f"r{i:06d}.zarr"), name=f"r{i:06d}.zarr", round=i,
                      cache=SimpleNamespace(num_samples=8), rollout_path="", rollout=None, digest=f"sha256:{i}",
                      store_id=str(i), policy_step=policy_step, policy_digest=None, record_topk=0)

    caches = {str(tmp_path / f"r{i:06d}.zarr"): src(i, p) for i, p in ((1, 0), (2, 0), (3, 4))}
    rounds = lambda: [(i, tmp_path / f"r{i:06d}.zarr") for i in (1, 2, 3)]  # noqa: E731
    state = RunState(checkpoint_steps=[2, 4])
    stale = lambda s: sum(1 for c in state.checkpoint_steps if s.policy_step < c <= 4)  # noqa: E731
    cfg = TrainConfig.from_flat(batch_size=4, max_staleness=0)
    got = next_source(state, rounds, caches.__getitem__, stale, cfg, step=4)
    assert got.name == "r000003.zarr" and [s["name"] for s in state.skipped] == ["r000001.zarr", "r000002.zarr"]
    state = RunState(checkpoint_steps=[2, 4], consumed=[{**caches[str(tmp_path / "r000003.zarr")].ref(), "steps": 2}])
    assert next_source(state, rounds, caches.__getitem__, stale, cfg, step=4) is None  # all seen, one pass each
    state = RunState(checkpoint_steps=[2, 4], consumed=[{"round": 1, "name": "r000001.zarr"}])
    caches[str(tmp_path / "r000003.zarr")].policy_step = 0  # now two checkpoints behind: skipped as stale
    assert next_source(state, rounds, caches.__getitem__, stale, cfg, step=4) is None
    assert [(s["name"], s["reason"]) for s in state.skipped] == [("r000002.zarr", "newer cache"),
                                                                 ("r000003.zarr", "staleness 2")]


def test_the_step_reads_the_device_a_fixed_number_of_times_whatever_the_depth(tiny_dir, monkeypatch):
    """The per-layer statistics stay on the device: the host syncs of a micro-batch's loss do not grow
    with the number of supervised layers (it used to sync three times per layer)."""
    from oprd_cli.train import TrainConfig, Trainer
    from oprd_cli.train.step import StepTotals, _Acc

    model = AutoModelForCausalLM.from_pretrained(tiny_dir / "qwen2-deep", attn_implementation="eager")
    syncs = []
    for name in ("__float__", "__int__", "__bool__", "item", "tolist"):
        orig = getattr(torch.Tensor, name)
        monkeypatch.setattr(torch.Tensor, name, lambda self, *a, _o=orig, _n=name: syncs.append(_n) or _o(self, *a))
    counts = {}
    for layers in ([4], [1, 2, 3, 4]):
        mb = _micro_batch(_samples(model, layers), [0, 1, 2, 3])
        trainer = Trainer(model, TrainConfig(), layers, torch.device("cpu"), total_steps=None)
        syncs.clear()
        trainer.micro_loss(mb, StepTotals(samples=4, tokens=24, positions=15), on_policy=False, acc=_Acc())
        counts[len(layers)] = list(syncs)
    assert counts[4] == counts[1] and len(counts[1]) <= 3, counts
