"""`oprd teacher-cache` and the teacher-cache store, driven through the real command.

One rollout store (tiny Qwen2 student, 4 prompts x 2 samples) is built once with `oprd rollout`;
every cache is compared with a direct ``output_hidden_states=True`` forward of the full teacher.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr
from transformers import AutoModelForCausalLM

from helpers import info_json, run_cli
from oprd_cli.stores import common
from oprd_cli.stores.cache import open_cache
from oprd_cli.stores.rollouts import open_rollouts
from oprd_cli.backbone import pack_by_length

ROOT = Path(__file__).resolve().parents[1]
# 8 samples of up to 16 tokens; units of 32 response tokens -> several units (for shards and resume)
UNITS = ["--unit-tokens", "32"]


@pytest.fixture(scope="module")
def rollouts(tmp_path_factory, tiny_qwen, aime24_path) -> Path:
    run = tmp_path_factory.mktemp("tc") / "run"
    run_cli("rollout", "--model", tiny_qwen, "--prompts", aime24_path, "--run-dir", run, "--limit", "4",
            "--num-samples", "2", "--max-new-tokens", "16", "--record-topk", "4")
    return run / "rollouts" / "r000001.zarr"


@pytest.fixture(scope="module")
def reference(rollouts, tiny_qwen, tmp_path_factory) -> tuple[Path, str]:
    """One uninterrupted single-worker cache with the settings the shard and resume tests use."""
    out = tmp_path_factory.mktemp("ref") / "ref.zarr"
    run_cli("teacher-cache", "--teacher", tiny_qwen, "--rollouts", rollouts, "--out", out, "--positions", "all",
            "--logprobs", "sampled", *UNITS)
    info = info_json(out)
    assert info["complete"] and info["units"]["total"] >= 3
    return out, info["content_digest"]


_models: dict = {}


def _model(path, dtype=torch.float32):
    key = (str(path), dtype)
    if key not in _models:
        _models[key] = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, attn_implementation="eager").eval()
    return _models[key]


def _direct(model, sample):
    """Full-model forward of prompt + response: hidden states, logits (sequence index Lp + t holds
    response token t)."""
    ids = np.concatenate([sample.prompt_ids, sample.response_ids]).astype(np.int64)
    with torch.no_grad():
        out = model(torch.from_numpy(ids)[None], output_hidden_states=True, use_cache=False)
    return [h[0] for h in out.hidden_states], out.logits[0].float()


def _check_hidden(cache_path, rollouts_path, model, exact=True):
    cache, store = open_cache(str(cache_path)), open_rollouts(str(rollouts_path))
    for s in store.samples():
        hs, _ = _direct(model, s)
        b = cache.read([s.row])
        n = int(b.mask.sum())
        lp = len(s.prompt_ids)
        pos = b.positions[0, :n]
        expected = torch.stack([hs[layer][lp + pos] for layer in cache.layers])  # the state that has read y_t
        got = b.hidden[0, :, :n]
        assert got.dtype == expected.dtype
        if exact:
            assert torch.equal(got, expected), f"sample {s.row}: stored hidden states differ from the forward"
        else:
            torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    return cache


# --------------------------------------------------------------------- values
def test_layers_positions_exact_and_truncated(rollouts, tiny_dir, tmp_path):
    """--layers 0,2 of a 4-layer teacher: only 2 blocks run, no LM head; bit-exact last_k positions."""
    deep = tiny_dir / "qwen2-deep"
    out = tmp_path / "c.zarr"
    run_cli("teacher-cache", "--teacher", deep, "--rollouts", rollouts, "--out", out, "--layers", "0,2",
            "--positions", "last_k", "--k", "5", "--max-batch-tokens", "1")
    info = info_json(out)
    lengths = open_rollouts(str(rollouts)).response_lengths
    assert info["kind"] == "teacher_cache" and info["format_version"] == 2 and info["complete"]
    assert info["layers"] == [0, 2] and info["hidden_size"] == 64
    assert info["positions"] == {"mode": "last_k", "k": 5}
    assert info["logprobs"] == {"mode": "none", "k": 0}
    assert info["num_samples"] == 8 and info["num_positions"] == int(np.minimum(lengths, 5).sum())
    assert info["teacher"]["blocks_run"] == 2 and info["teacher"]["lm_head"] is False
    assert info["teacher"]["num_layers"] == 4 and info["teacher"]["config_digest"].startswith("sha256:")
    assert info["encoding"]["faithful"] and info["encoding"]["dtype"] == "float32"
    assert info["rollout_digest"] == info_json(rollouts)["content_digest"] and info["rollout_store_id"]
    raw = info["num_positions"] * 2 * 64 * 4  # positions x layers x d x float32; no token arrays
    on_disk = sum(f.stat().st_size for f in (out / "hidden" / "c").rglob("*") if f.is_file())
    assert info["raw_bytes"] == raw and info["stored_bytes"] == on_disk
    assert info["compression_ratio"] == pytest.approx(raw / on_disk)
    cache = _check_hidden(out, rollouts, _model(deep))
    b = cache.read(range(8))
    assert (b.positions[b.mask] >= 0).all()
    for i, length in enumerate(lengths):  # the last min(5, T) response positions, ragged
        n = min(5, int(length))
        assert b.positions[i, :n].tolist() == list(range(int(length) - n, int(length)))
    assert run_cli("info", out, "--json", "--verify").stdout.count('"verified": true') == 1


def test_bf16_teacher_is_stored_as_its_bf16_bits(rollouts, tiny_dir, tmp_path):
    """--dtype bfloat16 and the default --store-dtype auto: bf16 bit patterns, equal to a bf16 forward."""
    deep = tiny_dir / "qwen2-deep"
    out = tmp_path / "c.zarr"
    run_cli("teacher-cache", "--teacher", deep, "--rollouts", rollouts, "--out", out, "--layers", "even",
            "--positions", "first_k", "--k", "3", "--dtype", "bfloat16", "--max-batch-tokens", "1")
    info = info_json(out)
    # "even" = blocks with an even 0-based index (0, 2) = hidden_states 1, 3, as in the authors' release
    assert info["layers"] == [1, 3] and info["encoding"]["dtype"] == "bfloat16" and info["encoding"]["faithful"]
    assert zarr.open_group(str(out), mode="r")["hidden"].dtype == np.uint16
    assert info["bytes_per_value"] <= 2.0
    _check_hidden(out, rollouts, _model(deep, torch.bfloat16))


def test_batched_all_positions_and_logprobs(rollouts, tiny_qwen, tmp_path):
    """Token-budget batches (padding) and top-k log-probs equal log_softmax of the full logits."""
    out = tmp_path / "c.zarr"
    run_cli("teacher-cache", "--teacher", tiny_qwen, "--rollouts", rollouts, "--out", out, "--layers", "all",
            "--positions", "all", "--logprobs", "topk", "--topk", "4", "--max-batch-tokens", "64")
    info = info_json(out)
    assert info["logprobs"] == {"mode": "topk", "k": 4} and info["teacher"]["lm_head"] is True
    assert info["num_positions"] == info["num_tokens"] == int(open_rollouts(str(rollouts)).response_lengths.sum())
    model = _model(tiny_qwen)
    cache = _check_hidden(out, rollouts, model, exact=False)
    for s in open_rollouts(str(rollouts)).samples():
        _, logits = _direct(model, s)
        lp = torch.log_softmax(logits, -1)[len(s.prompt_ids) - 1:-1]  # row t predicts response token t
        T = len(s.response_ids)
        assert lp.shape[0] == T
        b = cache.read([s.row])
        ids = torch.as_tensor(s.response_ids, dtype=torch.long)
        torch.testing.assert_close(b.teacher_logprobs[0, :T], lp[torch.arange(T), ids], atol=1e-5, rtol=0)
        sup = torch.as_tensor(s.topk_ids[:, :4], dtype=torch.long)
        torch.testing.assert_close(b.support_logprobs[0, :T], lp.gather(1, sup), atol=1e-5, rtol=0)
        top = lp.topk(4, dim=-1)
        assert torch.equal(b.teacher_topk_ids[0, :T], top.indices)
        torch.testing.assert_close(b.teacher_topk_logprobs[0, :T], top.values, atol=1e-5, rtol=0)


def test_lossy_mantissa_reports_cosine(rollouts, tiny_qwen, tmp_path):
    out = tmp_path / "c.zarr"
    run_cli("teacher-cache", "--teacher", tiny_qwen, "--rollouts", rollouts, "--out", out, "--positions", "all",
            "--store-dtype", "bfloat16", "--lossy-mantissa-bits", "3", "--compressor", "zstd", "--level", "3")
    info = info_json(out)
    enc = info["encoding"]
    assert enc["faithful"] is False and enc["lossy_mantissa_bits"] == 3 and enc["dtype"] == "bfloat16"
    assert 0.98 < enc["cosine_similarity"]["mean"] < 1.0 and enc["cosine_similarity"]["min"] <= enc[
        "cosine_similarity"]["mean"]
    assert info["compression"] == {"compressor": "zstd", "level": 3}
    assert info["bytes_per_value"] < 2.0
    # the stored values are the exact ones rounded to 3 mantissa bits (relative error <= 2^-4)
    cache, store = open_cache(str(out)), open_rollouts(str(rollouts))
    s = next(store.samples())
    hs, _ = _direct(_model(tiny_qwen), s)
    b = cache.read([0])
    n = int(b.mask.sum())
    exact = torch.stack([hs[layer][len(s.prompt_ids) + b.positions[0, :n]] for layer in cache.layers])
    rel = (b.hidden[0, :, :n].float() - exact).abs() / exact.abs().clamp_min(1e-30)
    assert float(rel.max()) <= 2 ** -4 + 1e-6


def test_positions_hidden_at_lp_plus_t_and_logprobs_at_lp_minus_1_plus_t(rollouts, reference, tiny_qwen, tmp_path):
    """The two kinds of positions, spelled out against a plain HF forward of prompt + response:
    the cached hidden state of response token t is ``hidden_states[l][0, Lp + t]`` (it has read y_t;
    the last prompt token's state is never stored) and its teacher log-prob is
    ``log_softmax(logits[Lp + t - 1])[y_t]``. ``--positions last`` stores the final valid token's state."""
    model = _model(tiny_qwen)
    last = tmp_path / "last.zarr"
    run_cli("teacher-cache", "--teacher", tiny_qwen, "--rollouts", rollouts, "--out", last, "--positions", "last",
            "--layers", "1,2")
    full, lastc = open_cache(str(reference[0])), open_cache(str(last))
    for s in open_rollouts(str(rollouts)).samples():
        Lp, T, y = len(s.prompt_ids), len(s.response_ids), s.response_ids
        ids = torch.as_tensor(np.concatenate([s.prompt_ids, y]).astype(np.int64))[None]
        with torch.no_grad():
            out = model(ids, output_hidden_states=True, use_cache=False)
        b = full.read([s.row])
        assert b.positions[0, :T].tolist() == list(range(T))
        for j, layer in enumerate(full.layers):
            for t in range(T):
                torch.testing.assert_close(b.hidden[0, j, t], out.hidden_states[layer][0, Lp + t], atol=1e-5, rtol=1e-5)
            # not the state before it (the old Lp - 1 + t convention)
            assert not torch.allclose(b.hidden[0, j, 0], out.hidden_states[layer][0, Lp - 1], atol=1e-3)
        logq = torch.log_softmax(out.logits[0].float(), -1)
        for t in range(T):
            assert float(b.teacher_logprobs[0, t]) == pytest.approx(float(logq[Lp + t - 1, int(y[t])]), abs=1e-5)
        bl = lastc.read([s.row])
        assert bl.positions[0].tolist() == [T - 1]
        for j, layer in enumerate(lastc.layers):  # the final valid token's state (it has read y_{T-1})
            torch.testing.assert_close(bl.hidden[0, j, 0], out.hidden_states[layer][0, Lp + T - 1], atol=1e-5, rtol=1e-5)


def test_old_format_cache_is_refused_in_one_line(reference, tmp_path):
    """Format version 1 stored the state at Lp - 1 + t: such a cache is refused, never misread."""
    old = tmp_path / "old.zarr"
    shutil.copytree(reference[0], old)
    g = zarr.open_group(str(old), mode="r+")
    g.attrs["oprd"] = {**g.attrs["oprd"], "format_version": 1}
    res = run_cli("info", old, "--json", expect=2)
    lines = [line for line in res.stderr.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and "Traceback" not in res.stderr, res.stderr
    assert "format version 1" in lines[0] and "reads version 2" in lines[0] and "oprd teacher-cache" in lines[0]
    with pytest.raises(Exception, match="format version 1"):
        open_cache(str(old))


def test_layer_names_mean_what_they_mean_in_the_release():
    """all = HF hidden_states 1..L, last = L, even = blocks with an even 0-based index (HF 1, 3, 5, ...),
    odd = HF 2, 4, 6, ...; the help text says so."""
    from oprd_cli.models import select_layers

    assert select_layers("all", 28) == list(range(1, 29)) and select_layers("last", 28) == [28]
    assert select_layers("even", 28) == list(range(1, 29, 2))  # 0-based blocks 0, 2, ..., 26
    assert select_layers("odd", 28) == list(range(2, 29, 2))  # 0-based blocks 1, 3, ..., 27
    assert select_layers("even", 1) == [1] and select_layers("odd", 1) == []
    for cmd in ("teacher-cache", "loop"):
        text = " ".join(re.sub(r"[│╭╮╰╯─]", " ", run_cli(cmd, "--help").stdout).split())
        assert "HF 1,3,5" in text and "HF 2,4,6" in text, cmd


def test_pack_by_length_ordered_within_budget():
    lengths = {0: 5, 1: 50, 2: 7, 3: 48, 4: 6, 5: 30}
    batches = pack_by_length([lengths[r] for r in range(6)], 100)
    order = [r for b in batches for r in b]
    assert sorted(order) == sorted(lengths)
    assert [lengths[r] for r in order] == sorted(lengths.values(), reverse=True)
    for b in batches:
        assert len(b) * max(lengths[r] for r in b) <= 100 or len(b) == 1


# ------------------------------------------------------------ sharding, resume
def _cli_proc(*args, pause_before_marker: float | None = None):
    """``oprd teacher-cache ARGS`` in a subprocess; with ``pause_before_marker`` through the wrapper
    tests/cache_pause_worker.py, which sleeps between each unit's data and its done marker."""
    e = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}
    e["PYTHONPATH"] = os.pathsep.join([str(ROOT), *filter(None, [e.get("PYTHONPATH")])])
    head = ["-m", "oprd_cli"] if pause_before_marker is None else \
        [str(Path(__file__).with_name("cache_pause_worker.py")), str(pause_before_marker)]
    return subprocess.Popen([sys.executable, *head, "teacher-cache", *map(str, args)], cwd=ROOT, env=e,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_two_shard_processes_give_the_single_worker_digest(rollouts, reference, tiny_qwen, tmp_path):
    out = tmp_path / "sharded.zarr"
    common_args = ["--teacher", tiny_qwen, "--rollouts", rollouts, "--out", out, "--positions", "all",
                   "--logprobs", "sampled", *UNITS]
    procs = [_cli_proc(*common_args, "--shard", f"{i}/2") for i in range(2)]
    for p in procs:
        _, err = p.communicate(timeout=300)
        assert p.returncode == 0, err
    info = info_json(out)
    assert info["complete"] and info["content_digest"] == reference[1]
    workers = {json.loads(f.read_text())["worker"] for f in (out / "units").glob("u*.json")}
    assert workers == {"0/2", "1/2"}
    assert open_cache(str(out)).verify()


def test_shard_worker_joins_a_store_another_worker_created_at_the_same_instant(rollouts, reference, tiny_qwen,
                                                                               tmp_path, monkeypatch):
    """Two shard workers started together race to create the store: the one whose create finds the other's
    group (zarr's ContainsGroupError) joins it instead of failing. Seen once in CI as a flaky failure of
    the two-process test; here the other worker's create is injected between zarr's check and write."""
    from oprd_cli.stores.cache import writer as W

    out = tmp_path / "raced.zarr"
    real_open_group = zarr.open_group
    raced = []

    def open_group(path, mode="a", **kw):
        if mode == "a" and not raced:
            raced.append(path)
            real_open_group(path, mode="w")  # the other worker wins the race
            raise zarr.errors.ContainsGroupError(path)
        return real_open_group(path, mode=mode, **kw)

    monkeypatch.setattr(W.zarr, "open_group", open_group)
    args = ["teacher-cache", "--teacher", tiny_qwen, "--rollouts", rollouts, "--out", out, "--positions", "all",
            "--logprobs", "sampled", *UNITS]
    run_cli(*args, "--shard", "0/2")
    run_cli(*args, "--shard", "1/2")
    assert raced
    info = info_json(out)
    assert info["complete"] and info["content_digest"] == reference[1]


def test_shard_leaves_store_incomplete_until_every_shard_is_done(rollouts, reference, tiny_qwen, tmp_path):
    out = tmp_path / "c.zarr"
    args = ["teacher-cache", "--teacher", tiny_qwen, "--rollouts", rollouts, "--out", out, "--positions", "all",
            "--logprobs", "sampled", *UNITS]
    run_cli(*args, "--shard", "1/3")
    info = info_json(out)
    assert info["complete"] is False and info["content_digest"] is None
    assert 0 < info["units"]["done"] < info["units"]["total"]
    run_cli("teacher-cache", "--teacher", tiny_qwen, "--rollouts", rollouts, "--out", out, expect=2)  # other settings
    run_cli(*args, "--shard", "0/3")
    assert info_json(out)["complete"] is False
    run_cli(*args, "--shard", "2/3")  # the last worker marks the store complete
    assert info_json(out)["content_digest"] == reference[1]


def test_sigkill_mid_store_then_resume_gives_same_digest(rollouts, reference, tiny_qwen, tmp_path):
    out = tmp_path / "killed.zarr"
    args = ["--teacher", tiny_qwen, "--rollouts", rollouts, "--out", out, "--positions", "all",
            "--logprobs", "sampled", *UNITS]
    total = info_json(reference[0])["units"]["total"]
    p = _cli_proc(*args, pause_before_marker=3)
    units = out / "units"
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and p.poll() is None:
        if units.is_dir() and any(units.glob("u*.json")):
            break
        assert not (out / common.COMPLETE_MARKER).exists()
        time.sleep(0.05)
    assert p.poll() is None, p.communicate()[1]

    def data_ahead_of_markers() -> bool:
        chunks = out / "hidden" / "c"
        return chunks.is_dir() and len(list(chunks.iterdir())) > len(list(units.glob("u*.json")))

    # wait (however loaded the machine) until a unit's data is on disk and its marker is not: the worker
    # then sleeps before writing the marker, and is killed inside that window
    while time.monotonic() < deadline and p.poll() is None and not data_ahead_of_markers():
        time.sleep(0.02)
    assert p.poll() is None, p.communicate()[1]
    p.send_signal(signal.SIGKILL)
    p.wait(timeout=30)
    done = len(list(units.glob("u*.json")))
    assert 1 <= done < total
    assert len(list((out / "hidden" / "c").iterdir())) > done  # a unit's data was written without its marker
    assert not (out / common.COMPLETE_MARKER).exists()
    info = info_json(out)
    assert info["complete"] is False and info["content_digest"] is None and info["units"]["done"] == done
    with pytest.raises(Exception, match="incomplete"):
        open_cache(str(out))
    res = run_cli("teacher-cache", *args)
    assert f"{done} of this worker's {total} units already done" in res.stderr
    assert info_json(out)["content_digest"] == reference[1]
    assert open_cache(str(out)).verify()


# ------------------------------------------------------------------- run dirs
def _copy_round(src: Path, run: Path, index: int) -> Path:
    dst = run / "rollouts" / f"r{index:06d}.zarr"
    tmp = run / "rollouts" / f".tmp-{index}"
    shutil.copytree(src, tmp)
    os.replace(tmp, dst)  # appears at once, complete
    return dst


def test_run_dir_mode_and_overwrite(rollouts, reference, tiny_qwen, tmp_path):
    run = tmp_path / "run"
    _copy_round(rollouts, run, 1)
    args = ["teacher-cache", "--teacher", tiny_qwen, "--run-dir", run, "--positions", "all", "--logprobs", "sampled",
            *UNITS]
    res = run_cli(*args, "--json")
    summary = json.loads(res.stdout)["caches"]
    cache = run / "cache" / "r000001.zarr"
    assert [c["path"] for c in summary] == [str(cache)] and summary[0]["complete"]
    assert info_json(cache)["content_digest"] == reference[1]
    # nothing left to do; a complete cache is kept
    assert "nothing to do" in run_cli(*args).stderr
    # an explicit --out of a complete cache is refused without --overwrite, and left as it was
    res = run_cli("teacher-cache", "--teacher", tiny_qwen, "--rollouts", run / "rollouts" / "r000001.zarr",
                  "--out", cache, "--positions", "all", expect=2)
    assert "already exists and is complete" in res.stderr and "--overwrite" in res.stderr
    assert info_json(cache)["content_digest"] == reference[1]
    run_cli("teacher-cache", "--teacher", tiny_qwen, "--rollouts", run / "rollouts" / "r000001.zarr",
            "--out", cache, "--positions", "last", "--overwrite")
    info = info_json(cache)
    assert info["positions"]["mode"] == "last" and info["num_positions"] == 8
    run_cli(*args, "--overwrite")  # run-dir --overwrite redoes every complete round once
    assert info_json(cache)["content_digest"] == reference[1]


def test_follow_picks_up_a_round_that_appears_later(rollouts, reference, tiny_qwen, tmp_path):
    run = tmp_path / "run"
    _copy_round(rollouts, run, 1)
    first = run / "cache" / "r000001.zarr" / common.COMPLETE_MARKER

    def producer():
        deadline = time.monotonic() + 120
        while not first.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(0.3)
        _copy_round(rollouts, run, 2)

    t = threading.Thread(target=producer, daemon=True)
    t.start()
    res = run_cli("teacher-cache", "--teacher", tiny_qwen, "--run-dir", run, "--positions", "all", "--logprobs",
                  "sampled", *UNITS, "--follow", "--poll-seconds", "0.1", "--max-rounds", "2", "--timeout", "120",
                  "--json")
    t.join(timeout=10)
    caches = json.loads(res.stdout)["caches"]
    assert [Path(c["path"]).name for c in caches] == ["r000001.zarr", "r000002.zarr"]
    assert info_json(run / "cache" / "r000002.zarr")["content_digest"] == reference[1]
    # --timeout ends a follow that finds nothing new
    res = run_cli("teacher-cache", "--teacher", tiny_qwen, "--run-dir", run, "--positions", "all", "--follow",
                  "--poll-seconds", "0.1", "--timeout", "0.3", "--json")
    assert json.loads(res.stdout)["caches"] == []


# ------------------------------------------------------------------ bad input
def _error(*args) -> str:
    res = run_cli("teacher-cache", *args, expect=2)
    lines = [line for line in res.stderr.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), res.stderr
    assert "Traceback" not in res.stderr
    return lines[0]


def test_bad_inputs(rollouts, reference, tiny_dir, tiny_qwen, tmp_path):
    base = ["--teacher", tiny_qwen, "--out", tmp_path / "c.zarr"]
    assert "no store at" in _error(*base, "--rollouts", tmp_path / "missing.zarr")
    # incomplete rollout store
    partial = tmp_path / "partial.zarr"
    shutil.copytree(rollouts, partial)
    (partial / common.COMPLETE_MARKER).unlink()
    assert "incomplete" in _error(*base, "--rollouts", partial)
    # a store of another kind, and an unknown format version
    assert "'teacher_cache' store, expected a 'rollouts' store" in _error(*base, "--rollouts", reference[0])
    future = tmp_path / "future.zarr"
    shutil.copytree(rollouts, future)
    g = zarr.open_group(str(future), mode="r+")
    g.attrs["oprd"] = {**g.attrs["oprd"], "format_version": 99}
    assert "format version 99" in _error(*base, "--rollouts", future)
    # a teacher with another tokenizer: both are named
    from oprd_cli.tiny import build_tiny_model, build_tokenizer

    tok = build_tokenizer(["another tokenizer entirely 0123456789"] * 4, tmp_path / "tok2", vocab_size=300)
    build_tiny_model(tmp_path / "other", tok, "qwen2", hidden_size=32, num_layers=1)
    msg = _error("--teacher", tmp_path / "other", "--rollouts", rollouts, "--out", tmp_path / "c.zarr")
    student_tok = info_json(rollouts)["tokenizer"]["name"]
    assert "another tokenizer" in msg and str(tmp_path / "other") in msg and str(student_tok) in msg
    # option values
    assert "valid indices 0..2" in _error(*base, "--rollouts", rollouts, "--layers", "3")
    assert "--k must be at least 1" in _error(*base, "--rollouts", rollouts, "--k", "0")
    assert "--shard 3/2" in _error(*base, "--rollouts", rollouts, "--shard", "3/2")
    assert "I/N" in _error(*base, "--rollouts", rollouts, "--shard", "two")
    assert "--positions" in _error(*base, "--rollouts", rollouts, "--positions", "middle")
    assert "--logprobs" in _error(*base, "--rollouts", rollouts, "--logprobs", "full")
    assert "either --rollouts" in _error("--teacher", tiny_qwen)
    assert "--topk 8 is more than the 4" in _error(*base, "--rollouts", rollouts, "--logprobs", "topk", "--topk", "8")
    # a cache that cannot be written: its folder would be inside a regular file
    blocker = tmp_path / "file"
    blocker.write_text("x")
    assert "cannot write teacher cache" in _error("--teacher", tiny_qwen, "--rollouts", rollouts,
                                                  "--out", blocker / "sub" / "c.zarr")
    # --out onto another kind of store is refused and leaves it alone
    assert "is the rollout store itself" in _error("--teacher", tiny_qwen, "--rollouts", rollouts, "--out", rollouts)
    other = tmp_path / "other-rollouts.zarr"
    shutil.copytree(rollouts, other)
    assert "not a teacher cache" in _error("--teacher", tiny_qwen, "--rollouts", rollouts, "--out", other,
                                           "--overwrite")
    assert open_rollouts(str(other)).content_digest == open_rollouts(str(rollouts)).content_digest


# ------------------------------------------------------------------- bench cache
def test_bench_cache_json_reports_the_issue_figures():
    r = json.loads(run_cli("bench", "cache", "--json", "--tokens", "300", "--threads", "1", "--repeats", "1").stdout)
    for key in ("writer_overhead", "bytes_per_value", "compression_ratio", "truncated_speedup"):
        assert isinstance(r[key], float) and np.isfinite(r[key]), key
    assert r["truncated_speedup"] > 0 and r["compression_ratio"] > 0
    assert r["machine"]["cpu_cores"] and r["machine"]["device"] == "cpu"
    br = r["bridge"]  # issue 13: the bridged cache's bytes per position next to the full one
    assert br["rank"] == 8 and br["bridged"]["hidden_size"] == 8 and br["bridged"]["raw_bytes_per_position"] == 8 * 4 * 8
    assert br["full"]["hidden_size"] == 512 and br["shrink"] > 1


# ------------------------------------------------------------ fsspec URLs
def _copy_rollouts(src, dst: str) -> str:
    """Re-write a rollout store through RolloutWriter at another URL; returns the new digest."""
    from oprd_cli.stores.rollouts import RolloutWriter

    store = open_rollouts(str(src))
    meta = {k: v for k, v in store.meta.items() if k not in ("kind", "format_version", "created_at")}
    w = RolloutWriter(dst, meta, record_topk=store.record_topk)
    rows: dict[int, int] = {}
    for s in store.samples():
        if s.prompt_row not in rows:
            rows[s.prompt_row] = w.add_prompt(list(s.prompt_ids), s.prompt_index, s.prompt_id, s.answer)
        w.add_sample(rows[s.prompt_row], s.sample_index, s.response_ids, s.logprobs, s.finish_reason, s.text,
                     topk_ids=s.topk_ids)
    return w.finish()


def test_memory_url_stores_give_the_local_digests(rollouts, reference, tiny_qwen):
    """Rollout and cache stores on an fsspec URL (memory://): written, marked complete, read back, with
    the same content digests and values as the local stores."""
    import fsspec

    from oprd_cli.teacher import cache_rollouts

    base = f"memory://oprd-{os.getpid()}"
    r_url, c_url = f"{base}/rollouts/r000001.zarr", f"{base}/cache/r000001.zarr"
    try:
        digest = _copy_rollouts(rollouts, r_url)
        local = open_rollouts(str(rollouts))
        remote = open_rollouts(r_url)
        assert common.is_complete(r_url) and digest == local.content_digest == remote.content_digest
        assert remote.recompute_digest() == local.content_digest
        st: dict = {}
        out = cache_rollouts(str(tiny_qwen), r_url, c_url, positions="all", logprobs="sampled", unit_tokens=32,
                             device="cpu", show_progress=False, stats=st)
        assert out == c_url and st["complete"] and st["content_digest"] == reference[1]
        cache, ref = open_cache(c_url), open_cache(str(reference[0]))
        assert common.is_complete(c_url) and cache.content_digest == reference[1] and cache.verify()
        assert cache.info()["units"]["done"] == ref.info()["units"]["done"] >= 3
        rows = list(range(cache.num_samples))
        a, b = cache.read(rows), ref.read(rows)
        assert torch.equal(a.hidden, b.hidden) and torch.equal(a.teacher_logprobs, b.teacher_logprobs)
        with pytest.raises(Exception, match="already exists and is complete"):
            cache_rollouts(str(tiny_qwen), r_url, c_url, positions="all", logprobs="sampled", unit_tokens=32,
                           device="cpu", show_progress=False)
    finally:
        fsspec.filesystem("memory").rm(base.split("://", 1)[1], recursive=True)


def test_typed_metadata_and_check_fits_refusals(rollouts, reference):
    """RolloutMeta / CacheMeta read the attrs once; check_fits gives one line per misfit."""
    from oprd_cli.errors import OprdError
    from oprd_cli.stores.meta import CacheMeta, RolloutMeta

    store, cache = open_rollouts(str(rollouts)), open_cache(str(reference[0]))
    rm, cm = store.typed_meta, cache.typed_meta
    assert isinstance(rm, RolloutMeta) and isinstance(cm, CacheMeta)
    assert rm.content_digest == store.content_digest == cm.rollout_digest and rm.record_topk == 4
    assert cm.layers == tuple(cache.layers) and cm.logprobs_mode == "sampled" and cm.num_samples == rm.num_samples
    n, d = cm.teacher_num_layers, cm.hidden_size
    cm.check_fits(tokenizer_digest=rm.tokenizer_digest, student_layers=n, student_width=d, need_hidden=True,
                  logprobs_for="opd-top1", rollout=rm)  # fits
    cases = [
        (dict(tokenizer_digest="sha256:other"), "was made for another tokenizer"),
        (dict(student_layers=n + 1, student_width=d), f"depth: teacher {n} layers vs student {n + 1}"),
        (dict(student_layers=n, student_width=d * 2), f"width: teacher hidden size {d} vs student {2 * d}"),
        (dict(logprobs_for="opd-topk"), "has --logprobs sampled; re-run `oprd teacher-cache` with --logprobs topk"),
        (dict(rollout=RolloutMeta.from_attrs("r.zarr", {**store.meta, "content_digest": "sha256:x"})),
         "rollout store r.zarr is not the one cache"),
        (dict(rollout=RolloutMeta.from_attrs("r.zarr", {**store.meta, "num_samples": 3})), "has 3"),
    ]
    for kwargs, msg in cases:
        with pytest.raises(OprdError, match=re.escape(msg)) as e:
            cm.check_fits(**kwargs)
        assert "\n" not in str(e.value)
    with pytest.raises(OprdError, match="holds no hidden states"):
        CacheMeta.from_attrs("c.zarr", {**cache.meta, "layers": []}).check_fits(need_hidden=True)
    with pytest.raises(OprdError, match="--topk 8 is more than the 4 student top-k ids"):
        rm.check_topk(8)
