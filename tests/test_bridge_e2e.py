"""OPRD-Bridge end to end through the real commands: `oprd bridge fit` -> `oprd teacher-cache --bridge`
-> `oprd train --bridge`, with a tiny Qwen2 teacher of another width and depth and a tiny Llama teacher
with another (locally trained) tokenizer. No network."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from helpers import info_json, run_cli

from oprd_cli.bridge import Bridge, layer_map, project_teacher
from oprd_cli.stores.cache import open_cache


@pytest.fixture(scope="module")
def teachers(tiny_dir, tmp_path_factory, shared_data):
    """``wide``: Qwen2, 3 blocks of width 96, the student's tokenizer; ``other``: Llama, 2 blocks of width 48,
    a tokenizer trained on other texts with another vocabulary size."""
    from oprd_cli.tiny import build_tiny_model, build_tokenizer

    root = tmp_path_factory.mktemp("teachers")
    tok = build_tokenizer([t.strip() for t in (shared_data / "aime24.jsonl").read_text().splitlines()] + ["é ü 0123456789"],
                          root / "tok-b", vocab_size=330)
    from oprd_cli.models import load_tokenizer

    build_tiny_model(root / "wide", load_tokenizer(str(tiny_dir / "tokenizer")), "qwen2", hidden_size=96, num_layers=3, seed=5)
    build_tiny_model(root / "other", tok, "llama", hidden_size=48, seed=6)
    return root


@pytest.fixture(scope="module")
def rollouts(tiny_qwen, aime24_path, tmp_path_factory):
    run = tmp_path_factory.mktemp("run")
    run_cli("rollout", "--model", tiny_qwen, "--prompts", aime24_path, "--run-dir", run, "--limit", "4",
            "--num-samples", "2", "--max-new-tokens", "12")
    return run / "rollouts" / "r000001.zarr"


@pytest.fixture(scope="module")
def text_rollouts(rollouts, tiny_dir, aime24_path, tmp_path_factory):
    """The rollouts' prompts with readable responses (random tiny models sample bytes that are no UTF-8, which
    a cross-tokenizer alignment rightly masks): AIME text with multi-byte characters, EOS on some."""
    from oprd_cli.models import load_tokenizer
    from oprd_cli.stores.rollouts import RolloutWriter, load_arrays, open_rollouts

    src = open_rollouts(str(rollouts))
    arrays = load_arrays(src)
    tok = load_tokenizer(str(tiny_dir / "tokenizer"))
    problems = [json.loads(line)["problem"] for line in aime24_path.read_text().splitlines()]
    keep = ("policy", "tokenizer", "sampling", "template", "prompts", "seed", "record_topk", "backend", "device",
            "dtype", "logprobs")
    w = RolloutWriter(str(tmp_path_factory.mktemp("text") / "r.zarr"), {k: src.meta[k] for k in keep if k in src.meta})
    rows = {}
    for i in range(src.num_samples):
        pr = int(src._load("sample/prompt_row")[i])
        if pr not in rows:
            rows[pr] = w.add_prompt(arrays.prompt_ids[i].tolist(), int(src._load("prompt/dataset_index")[pr]), str(pr),
                                    None)
        ids = tok(problems[i][:40 + 7 * i] + " é, ü = 12", add_special_tokens=False)["input_ids"]
        ids = ids + ([tok.eos_token_id] if i % 2 else [])
        text = tok.decode(ids, skip_special_tokens=True)
        w.add_sample(rows[pr], i, ids, [0.0] * len(ids), "eos" if i % 2 else "length", text)
    w.finish()
    return w.path


def _fit(student, teacher, rollouts, out, rank="4", *more):
    r = run_cli("bridge", "fit", "--student", student, "--teacher", teacher, "--rollouts", rollouts, "--rank", rank,
                "--out", out, "--epochs", "3", "--json", *more)
    return json.loads(r.stdout)


@pytest.fixture(scope="module")
def wide_bridge(tiny_qwen, teachers, rollouts, tmp_path_factory):
    out = tmp_path_factory.mktemp("b") / "wide"
    return out, _fit(tiny_qwen, teachers / "wide", rollouts, out)


def test_fit_json_map_variance_and_cosine(wide_bridge, tiny_qwen):
    out, summary = wide_bridge
    assert summary["layer_map"] == {"1": 1, "2": 3}
    assert summary["layer_map"] == {str(k): v for k, v in zip([1, 2], layer_map(2, 3))}
    assert not summary["cross_tokenizer"] and summary["aligned_fraction"] == 1.0
    assert [x["student_layer"] for x in summary["layers"]] == [1, 2]
    for x in summary["layers"]:
        assert 0 < x["explained_variance"] <= 1 and -1 <= x["cosine"] <= 1
    b = Bridge.load(out)
    assert b.rank == 4 and b.d_student == 64 and b.d_teacher == 96 and b.teacher_layers == [1, 3]


def test_bridged_cache_holds_projection_bit_for_bit(wide_bridge, teachers, rollouts, tmp_path):
    out, _ = wide_bridge
    full, proj = tmp_path / "full.zarr", tmp_path / "proj.zarr"
    run_cli("teacher-cache", "--teacher", teachers / "wide", "--rollouts", rollouts, "--out", full, "--positions", "all")
    run_cli("teacher-cache", "--teacher", teachers / "wide", "--rollouts", rollouts, "--out", proj, "--positions", "all",
            "--bridge", out)
    b, cf, cp = Bridge.load(out), open_cache(full), open_cache(proj)
    rows = list(range(cf.num_samples))
    hf, hp = cf.read(rows), cp.read(rows)
    assert hp.hidden.shape[-1] == 4 and hp.hidden.dtype == torch.float32
    for j, layer in enumerate(b.teacher_layers):
        want = project_teacher(hf.hidden[:, cf.layers.index(layer)], b.teacher_proj[j], b.teacher_mean[j])
        m = hf.mask
        assert torch.equal(hp.hidden[:, j][m], want[m])
    info = info_json(proj)
    assert info["hidden_size"] == 4 and info["bridge"]["rank"] == 4 and info["bridge"]["digest"].startswith("sha256:")
    assert info["alignment"]["aligned_fraction"] == 1.0


def test_bridge_for_another_teacher_is_refused(wide_bridge, tiny_dir, rollouts, tmp_path):
    out, _ = wide_bridge
    r = run_cli("teacher-cache", "--teacher", tiny_dir / "qwen2-deep", "--rollouts", rollouts, "--out",
                tmp_path / "c.zarr", "--bridge", out, expect=2)
    assert "bridge" in r.stderr and "teacher" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "c.zarr").exists()


def test_train_bridge_projected_equals_on_the_fly_and_decreases(wide_bridge, teachers, tiny_qwen, tiny_dir, rollouts,
                                                                tmp_path):
    out, _ = wide_bridge
    full, proj = tmp_path / "full.zarr", tmp_path / "proj.zarr"
    for c, extra in ((full, []), (proj, ["--bridge", out])):
        run_cli("teacher-cache", "--teacher", teachers / "wide", "--rollouts", rollouts, "--out", c, *extra)
    # one step holds all 8 samples: the caches' digests (which seed the sample order) differ
    common = ["--model", tiny_qwen, "--bridge", out, "--batch-size", "8", "--max-steps", "4", "--lr", "1e-3",
              "--json"]
    a = json.loads(run_cli("train", "--cache", proj, "--out", tmp_path / "ta", *common).stdout)
    b = json.loads(run_cli("train", "--cache", full, "--out", tmp_path / "tb", *common).stdout)
    assert a["losses"][0] == pytest.approx(b["losses"][0], rel=1e-6, abs=1e-9)
    assert all(np.isfinite(a["losses"])) and 0 < a["losses"][0] <= 4 / 4  # (2 - 2cos) / r <= 4 / r
    assert a["losses"][-1] < a["losses"][0]
    # without --bridge a projected cache is refused; a vanilla cache of another width too
    r = run_cli("train", "--cache", proj, "--out", tmp_path / "tc", "--model", tiny_qwen, expect=2)
    assert "--bridge" in r.stderr
    r = run_cli("train", "--cache", proj, "--out", tmp_path / "td", "--model", tiny_dir / "qwen2-deep", "--bridge", out,
                expect=2)  # a student of another depth than the bridge's layer map
    assert "4" in r.stderr and "layers" in r.stderr and len(r.stderr.strip().splitlines()) == 1


def test_cross_tokenizer_fit_cache_train(tiny_qwen, teachers, text_rollouts, tmp_path):
    rollouts = text_rollouts
    out = tmp_path / "x"
    summary = _fit(tiny_qwen, teachers / "other", rollouts, out, "4")
    assert summary["cross_tokenizer"] and 0 < summary["aligned_fraction"] <= 1
    cache = tmp_path / "x.zarr"
    r = run_cli("teacher-cache", "--teacher", teachers / "other", "--rollouts", rollouts, "--out", cache,
                "--bridge", out, "--logprobs", "sampled", expect=2)
    assert "across tokenizers" in r.stderr
    run_cli("teacher-cache", "--teacher", teachers / "other", "--rollouts", rollouts, "--out", cache, "--bridge", out,
            "--positions", "all")
    info = info_json(cache)
    assert info["alignment"]["cross_tokenizer"] is True
    frac = info["alignment"]["aligned_fraction"]
    c = open_cache(cache)
    batch = c.read(list(range(c.num_samples)))
    assert batch.mask.float().sum().item() / batch.response_mask.sum().item() == pytest.approx(frac)
    assert (batch.hidden[~batch.mask.bool()[:, None, :].expand(-1, 2, -1)] == 0).all()
    assert c.verify()
    t = json.loads(run_cli("train", "--cache", cache, "--out", tmp_path / "t", "--model", tiny_qwen, "--bridge", out,
                           "--batch-size", "4", "--max-steps", "2", "--json").stdout)
    assert all(np.isfinite(t["losses"]))
    r = run_cli("train", "--cache", cache, "--out", tmp_path / "t2", "--model", tiny_qwen, "--bridge", out,
                "--objective", "opd-top1", "--mu", "1", expect=2)
    assert "another tokenizer" in r.stderr


def test_bridge_combines_with_opd_top1(wide_bridge, teachers, tiny_qwen, rollouts, tmp_path):
    out, _ = wide_bridge
    cache = tmp_path / "c.zarr"
    run_cli("teacher-cache", "--teacher", teachers / "wide", "--rollouts", rollouts, "--out", cache, "--bridge", out,
            "--logprobs", "sampled")
    assert info_json(cache)["logprobs"]["mode"] == "sampled" and info_json(cache)["hidden_size"] == 4
    t = json.loads(run_cli("train", "--cache", cache, "--out", tmp_path / "t", "--model", tiny_qwen, "--bridge", out,
                           "--objective", "opd-top1", "--mu", "1", "--batch-size", "8", "--max-steps", "1",
                           "--json").stdout)
    m = t["last_metrics"]
    assert np.isfinite(m["rep/loss"]) and np.isfinite(m["opd/loss"])
    assert m["loss"] == pytest.approx(m["rep/loss"] + m["opd/loss"], rel=1e-5)


def test_loop_and_oprd_toml_know_the_bridge(wide_bridge, teachers, tiny_qwen, aime24_path, tmp_path):
    out, _ = wide_bridge
    run = tmp_path / "run"
    run.mkdir()
    (run / "oprd.toml").write_text(f'[train]\nbridge = "{out}"\n')
    run_cli("loop", "--run-dir", run, "--model", tiny_qwen, "--teacher", teachers / "wide", "--prompts", aime24_path,
            "--rounds", "1", "--limit", "2", "--num-samples", "2", "--max-new-tokens", "8", "--batch-size", "4",
            "--no-eval-start")
    info = info_json(run / "cache" / "r000001.zarr")
    assert info["hidden_size"] == 4 and info["bridge"]["teacher_layers"] == [1, 3]
    assert [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()][0]["rep/loss"] > 0


def test_teacher_view_pairs_lp_plus_t_on_one_tokenizer_and_masks_unspelled_samples(rollouts, text_rollouts, tiny_dir,
                                                                                  teachers):
    from oprd_cli import models
    from oprd_cli.bridge.view import teacher_view
    from oprd_cli.stores.rollouts import load_arrays, open_rollouts

    s_tok = models.load_tokenizer(str(tiny_dir / "tokenizer"))
    t_tok = models.load_tokenizer(str(teachers / "tok-b"))
    s_dig, t_dig = models.tokenizer_digest(s_tok), models.tokenizer_digest(t_tok)
    store = open_rollouts(str(text_rollouts))
    a = load_arrays(store)
    same = teacher_view(store, a, s_tok, s_tok, s_dig, s_dig)
    for i in range(len(a)):
        assert np.array_equal(same.index[i], len(a.prompt_ids[i]) + np.arange(len(a.response_ids[i])))
    cross = teacher_view(store, a, s_tok, t_tok, s_dig, t_dig)
    texts = store.texts()
    for i in range(len(a)):  # a paired teacher token ends where the student token ends: same text read
        lp = len(cross.ids[i]) - len(t_tok(texts[i], add_special_tokens=False)["input_ids"])
        for t, j in enumerate(cross.index[i].tolist()):
            if j >= 0:
                s_text = s_tok.decode(a.response_ids[i][:t + 1].tolist(), skip_special_tokens=True)
                assert t_tok.decode(cross.ids[i][lp:j + 1].tolist(), skip_special_tokens=True) == s_text
        if i % 2:
            assert cross.index[i][-1] == -1  # EOS: no partner
    assert 0.5 < cross.aligned_fraction() < 1
    raw = open_rollouts(str(rollouts))  # random tiny models sample bytes that are no UTF-8: masked, not guessed
    bad = teacher_view(raw, load_arrays(raw), s_tok, t_tok, s_dig, t_dig)
    assert bad.aligned_fraction() < 0.5
