"""OPRD-Bridge core (oprd_cli.bridge, oprd_cli.losses.bridge): layer map, PCA, projections, student
fit, the bridge folder, cross-tokenizer alignment and the loss. Pure tensors and two tiny tokenizers
trained locally; no models, no network."""

from __future__ import annotations

import json
import math
import pickle
import struct
from fractions import Fraction

import pytest
import torch
from safetensors.torch import save_file

from oprd_cli.bridge import (
    Bridge,
    align_by_char_offsets,
    align_response_positions,
    encode_with_offsets,
    fit_bridge,
    fit_student_proj,
    fit_teacher_pca,
    layer_map,
    offsets_for_ids,
    project_teacher,
    rows_in_range,
    sample_rows,
)
from oprd_cli.errors import OprdError
from oprd_cli.losses import BridgeOutput, bridge_loss, oprd_loss


def _one_line(e: pytest.ExceptionInfo) -> str:
    msg = str(e.value)
    assert "\n" not in msg and msg
    assert e.value.exit_code == 2
    return msg


def _load_refusal(path) -> str:
    """``Bridge.load(path)`` is refused with one line; that line."""
    with pytest.raises(OprdError) as e:
        Bridge.load(str(path))
    return _one_line(e)


# --------------------------------------------------------------------------------------------
# layer map (Eq. 11, as the release computes it)
# --------------------------------------------------------------------------------------------


def test_layer_map_release_example():
    # 3 student and 4 teacher blocks: linspace(0, 3, 3) = [0, 1.5, 3] -> round half even [0, 2, 3]
    # -> 1-based blocks = HF hidden-state indices [1, 3, 4].
    assert layer_map(3, 4) == [1, 3, 4]


def test_layer_map_equal_depths_is_identity():
    for n in range(1, 41):
        assert layer_map(n, n) == list(range(1, n + 1))


def test_layer_map_one_student_layer_maps_to_teacher_last():
    for lt in (1, 2, 7, 28, 36):
        assert layer_map(1, lt) == [lt]


def test_layer_map_ties_round_half_to_even():
    # (l-1)/(L_S-1)*(L_T-1): (3,2) -> 0, 0.5, 1 ; half-even sends 0.5 to 0 (half-up would give [1, 2, 2]).
    assert layer_map(3, 2) == [1, 1, 2]
    # (5,2) -> 0, .25, .5, .75, 1 -> 0, 0, 0, 1, 1
    assert layer_map(5, 2) == [1, 1, 1, 2, 2]
    # (3,6) -> 0, 2.5, 5 -> 0, 2, 5 ; (5,4) -> 0, .75, 1.5, 2.25, 3 -> 0, 1, 2, 2, 3
    assert layer_map(3, 6) == [1, 3, 6]
    assert layer_map(5, 4) == [1, 2, 3, 3, 4]


def _hand_map(ls: int, lt: int) -> list[int]:
    """Eq. 11 in exact rational arithmetic, round half to even (Python's round on a Fraction)."""
    return [round(Fraction((l - 1) * (lt - 1), ls - 1)) + 1 for l in range(1, ls + 1)]


# Pairs where float32 linspace (the release) lands a hair above an exact .5 and rounds up.
_FLOAT32_DEVIATIONS = {(23, 14), (23, 48), (27, 8), (27, 54), (27, 62), (29, 63), (39, 16)}


def test_layer_map_matches_hand_formula_on_a_grid():
    deviations = set()
    for ls in range(2, 41):
        for lt in range(1, 81):
            got = layer_map(ls, lt)
            assert len(got) == ls and got[0] == 1 and got[-1] == lt
            assert all(1 <= x <= lt for x in got) and got == sorted(got)
            if got != _hand_map(ls, lt):
                deviations.add((ls, lt))
    # We follow the release's float32 linspace; the few pairs where it differs from exact half-even are
    # pinned so that a change in torch's linspace shows up here.
    assert deviations == _FLOAT32_DEVIATIONS
    assert layer_map(23, 14)[11] == 8 and _hand_map(23, 14)[11] == 7  # 6.5000005 rounds up


def test_layer_map_usual_depths_agree_with_exact_rounding():
    depths = (12, 16, 18, 22, 24, 26, 28, 30, 32, 36, 40, 42, 48, 60, 64, 80, 94)
    for ls in depths:
        for lt in depths:
            assert layer_map(ls, lt) == _hand_map(ls, lt), (ls, lt)


def test_layer_map_refuses_zero_blocks():
    with pytest.raises(OprdError) as e:
        layer_map(0, 4)
    _one_line(e)


# --------------------------------------------------------------------------------------------
# row sampling
# --------------------------------------------------------------------------------------------


def test_sample_rows_seeded_sorted_unique():
    a = sample_rows(100_000, 16_384, seed=3)
    b = sample_rows(100_000, 16_384, seed=3)
    c = sample_rows(100_000, 16_384, seed=4)
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert a.numel() == 16_384 and a.dtype == torch.int64
    assert torch.equal(a, a.unique())  # sorted, no repeats
    assert int(a.min()) >= 0 and int(a.max()) < 100_000
    assert torch.equal(sample_rows(50, 16_384), torch.arange(50))


def test_rows_in_range_picks_local_indices_of_a_batch():
    idx = sample_rows(1000, 100, seed=0)
    parts = [rows_in_range(idx, s, min(s + 64, 1000)) + s for s in range(0, 1000, 64)]
    assert torch.equal(torch.cat(parts), idx)
    assert all(int(p.min()) >= s for p, s in zip(parts, range(0, 1000, 64)) if p.numel())


# --------------------------------------------------------------------------------------------
# teacher PCA
# --------------------------------------------------------------------------------------------


def _pca_rows(n=3000, d=16, seed=0, offset=50.0):
    """Rows with well separated variances along a random basis and a large mean (like real states)."""
    g = torch.Generator().manual_seed(seed)
    basis, _ = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=torch.float64))
    scales = torch.tensor([10.0, 7.0, 5.0, 3.0] + [0.5] * (d - 4), dtype=torch.float64)
    x = (torch.randn(n, d, generator=g, dtype=torch.float64) * scales) @ basis.T
    mean = offset + torch.randn(d, generator=g, dtype=torch.float64)
    return (x + mean).float()


def test_pca_rows_orthonormal_and_equal_to_top_svd():
    rows = _pca_rows()
    r = 3
    P, mu, explained = fit_teacher_pca(rows, r)
    assert P.shape == (r, 16) and mu.shape == (16,) and explained.shape == (r,)
    assert P.dtype == torch.float32 and mu.dtype == torch.float32
    assert torch.allclose(P.double() @ P.double().T, torch.eye(r, dtype=torch.float64), atol=1e-6)
    assert torch.allclose(mu.double(), rows.double().mean(0), atol=1e-5)

    xc = rows.double() - rows.double().mean(0)
    _, S, Vh = torch.linalg.svd(xc, full_matrices=False)
    for k in range(r):  # equal up to sign
        sign = torch.sign((P[k].double() * Vh[k]).sum())
        assert torch.allclose(P[k].double(), sign * Vh[k], atol=1e-5), k
    want = (S[:r] ** 2) / (S ** 2).sum()
    assert torch.allclose(explained, want, atol=1e-10)
    assert explained[0] > explained[1] > explained[2]


def test_pca_sign_convention_and_row_order_invariance():
    rows = _pca_rows(seed=1)
    P, _, _ = fit_teacher_pca(rows, 4)
    idx = P.abs().argmax(dim=-1)
    assert (P.gather(1, idx[:, None]) > 0).all()  # largest-|entry| of each row is positive
    P2, _, _ = fit_teacher_pca(rows[torch.randperm(rows.shape[0], generator=torch.Generator().manual_seed(0))], 4)
    assert torch.allclose(P, P2, atol=1e-6)  # no sign flips from row order
    P3, _, _ = fit_teacher_pca(rows, 4, chunk_rows=7)
    assert torch.allclose(P, P3, atol=1e-6)


def test_pca_refuses_bad_rank_and_too_few_rows():
    rows = _pca_rows(n=10, d=8)
    for rank, rs in ((0, rows), (9, rows), (4, rows[:4])):
        with pytest.raises(OprdError) as e:
            fit_teacher_pca(rs, rank)
        _one_line(e)
    bad = rows.clone()
    bad[3, 2] = float("nan")
    with pytest.raises(OprdError) as e:
        fit_teacher_pca(bad, 2)
    assert "NaN" in _one_line(e)


# --------------------------------------------------------------------------------------------
# teacher projection: what a cache stores
# --------------------------------------------------------------------------------------------


def test_project_teacher_bit_for_bit():
    rows = _pca_rows(seed=2)
    P, mu, _ = fit_teacher_pca(rows, 4)
    h = _pca_rows(n=2 * 37, seed=5).reshape(2, 37, 16)
    z = project_teacher(h, P, mu)
    assert z.shape == (2, 37, 4) and z.dtype == torch.float32
    want = ((h.double() - mu.double()) @ P.double().T).float()
    assert torch.equal(z, want)
    # Independent of batching: row by row gives the same bits as the whole batch.
    rowwise = torch.stack([torch.stack([project_teacher(h[b, t], P, mu) for t in range(37)]) for b in range(2)])
    assert torch.equal(z, rowwise)
    # And it is what the float32 formula gives, to float32 precision.
    assert torch.allclose(z, (h - mu) @ P.T, rtol=1e-5, atol=1e-4)
    # bf16 states from a cache-side model: same rule, same bits.
    hb = h.bfloat16()
    assert torch.equal(project_teacher(hb, P, mu), ((hb.double() - mu.double()) @ P.double().T).float())


# --------------------------------------------------------------------------------------------
# student projector fit (Eq. 13)
# --------------------------------------------------------------------------------------------


def _linear_pair(n=4096, d_s=24, r=4, seed=0, noise=0.01):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(n, d_s, generator=g) * 2 + torch.randn(d_s, generator=g)
    w = torch.randn(r, d_s, generator=g) / math.sqrt(d_s)
    z = h @ w.T + noise * torch.randn(n, r, generator=g)
    return h, z, w


def test_student_fit_reaches_high_cosine_on_linear_data():
    h, z, _ = _linear_pair()
    losses = []
    w, stats = fit_student_proj(h, z, epochs=20, lr=1e-2, seed=0, on_epoch=lambda e, loss: losses.append(loss))
    assert w.shape == (4, 24) and w.dtype == torch.float32
    assert len(losses) == 20 and losses[-1] < losses[0] / 10
    assert stats["cosine"] > 0.99 and stats["r2"] > 0.99
    assert stats["lstsq_cosine"] > 0.999 and stats["lstsq_mse"] <= stats["mse"] + 1e-9
    assert stats["rows"] == 4096 and stats["epochs"] == 20
    w2, _ = fit_student_proj(h, z, epochs=20, lr=1e-2, seed=0)
    assert torch.equal(w, w2)  # seeded


def test_student_fit_lstsq_init_is_the_closed_form_optimum():
    h, z, w_true = _linear_pair(noise=0.0)
    w, stats = fit_student_proj(h, z, epochs=0, init="lstsq")
    assert torch.allclose(w, w_true, atol=1e-4)
    assert stats["cosine"] > 0.99999 and stats["mse"] == pytest.approx(stats["lstsq_mse"], abs=1e-12)


def test_student_fit_refuses_unpaired_rows():
    with pytest.raises(OprdError) as e:
        fit_student_proj(torch.randn(10, 4), torch.randn(9, 2))
    _one_line(e)


# --------------------------------------------------------------------------------------------
# the bridge folder
# --------------------------------------------------------------------------------------------


def _small_bridge(rank=3):
    teacher_rows = {2: _pca_rows(n=600, d=16, seed=7), 4: _pca_rows(n=600, d=16, seed=8)}
    g = torch.Generator().manual_seed(0)
    student_rows = [torch.randn(600, 12, generator=g), torch.randn(600, 12, generator=g)]
    return fit_bridge(student_rows, teacher_rows, [1, 2], [2, 4], rank, epochs=2,
                      student={"name": "s", "n_layers": 2, "hidden_size": 12, "tokenizer_digest": "sha256:a"},
                      teacher={"name": "t", "n_layers": 4, "hidden_size": 16, "tokenizer_digest": "sha256:b"})


def _header(path) -> dict:
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8:8 + n])


def test_bridge_save_load_round_trip_exact_and_pickle_free(tmp_path):
    b = _small_bridge()
    out = tmp_path / "bridge"
    b.save(str(out))
    assert sorted(p.name for p in out.iterdir()) == ["bridge.json", "bridge.safetensors"]  # no temp files left
    doc = json.loads((out / "bridge.json").read_text())
    assert doc["format"] == "oprd-bridge" and doc["format_version"] == 1
    assert doc["student_layers"] == [1, 2] and doc["teacher_layers"] == [2, 4]
    assert (doc["rank"], doc["d_student"], doc["d_teacher"]) == (3, 12, 16)
    assert doc["cross_tokenizer"] is True
    assert doc["student"]["tokenizer_digest"] == "sha256:a" and doc["teacher"]["name"] == "t"
    layers = doc["stats"]["layers"]
    assert [x["teacher_layer"] for x in layers] == [2, 4] and all(0 < x["explained_variance_total"] <= 1 for x in layers)
    assert all("cosine" in x and "lstsq_cosine" in x for x in layers)
    assert doc["tensors"]["sha256"].startswith("sha256:")

    # safetensors: an 8-byte length, a JSON header, raw float32 data; no pickle anywhere.
    header = _header(out / "bridge.safetensors")
    header.pop("__metadata__")
    assert header.keys() == {"teacher_proj.0", "teacher_mean.0", "student_proj.0.weight",
                             "teacher_proj.1", "teacher_mean.1", "student_proj.1.weight"}
    assert header["teacher_proj.1"]["shape"] == [3, 16] and header["teacher_mean.0"]["shape"] == [16]
    assert header["student_proj.0.weight"]["shape"] == [3, 12]
    assert {v["dtype"] for v in header.values()} == {"F32"}
    assert not (out / "bridge.safetensors").read_bytes().startswith(b"\x80")

    c = Bridge.load(str(out))
    assert (c.student_layers, c.teacher_layers, c.rank, c.d_student, c.d_teacher) == ([1, 2], [2, 4], 3, 12, 16)
    for j in range(2):
        assert torch.equal(c.teacher_proj[j], b.teacher_proj[j])
        assert torch.equal(c.teacher_mean[j], b.teacher_mean[j])
        assert torch.equal(c.student_proj[j], b.student_proj[j])
    assert c.student == b.student and c.teacher == b.teacher and c.stats == json.loads(json.dumps(b.stats))
    h = torch.randn(5, 16)
    assert torch.equal(c.project_teacher(1, h), project_teacher(h, b.teacher_proj[1], b.teacher_mean[1]))


def test_bridge_save_load_fsspec_url():
    b = _small_bridge()
    b.save("memory://bridge-test/b1")
    c = Bridge.load("memory://bridge-test/b1")
    assert torch.equal(c.student_proj[1], b.student_proj[1])


def _rewrite_tensors(folder, tensors):
    """Replace bridge.safetensors and fix the digest in bridge.json (so only the content is wrong)."""
    import hashlib

    save_file(tensors, str(folder / "bridge.safetensors"))
    doc = json.loads((folder / "bridge.json").read_text())
    doc["tensors"]["sha256"] = "sha256:" + hashlib.sha256((folder / "bridge.safetensors").read_bytes()).hexdigest()
    (folder / "bridge.json").write_text(json.dumps(doc))


def test_bridge_load_refuses_wrong_shape_with_one_line(tmp_path):
    b = _small_bridge()
    out = tmp_path / "bridge"
    b.save(str(out))
    tensors = b._tensors()
    tensors["student_proj.1.weight"] = torch.zeros(3, 13)
    _rewrite_tensors(out, tensors)
    with pytest.raises(OprdError) as e:
        Bridge.load(str(out))
    msg = _one_line(e)
    assert "student_proj.1.weight" in msg and "[3, 13]" in msg and "[3, 12]" in msg


def test_bridge_load_refuses_missing_extra_and_non_orthonormal(tmp_path):
    b = _small_bridge()
    out = tmp_path / "bridge"
    b.save(str(out))
    tensors = b._tensors()
    del tensors["teacher_mean.1"]
    _rewrite_tensors(out, tensors)
    assert "teacher_mean.1" in _load_refusal(out)
    tensors = b._tensors()
    tensors["teacher_proj.0"] = tensors["teacher_proj.0"] * 2
    _rewrite_tensors(out, tensors)
    assert "orthonormal" in _load_refusal(out)


def test_bridge_load_refuses_tampered_missing_and_pickled_tensors(tmp_path):
    b = _small_bridge()
    out = tmp_path / "bridge"
    b.save(str(out))
    data = bytearray((out / "bridge.safetensors").read_bytes())
    data[-1] ^= 0xFF
    (out / "bridge.safetensors").write_bytes(bytes(data))
    assert "digest" in _load_refusal(out)

    # A pickle under the safetensors name (with a matching digest) is refused, never unpickled.
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    payload = pickle.dumps({"student_proj.0.weight": Evil()})
    (out / "bridge.safetensors").write_bytes(payload)
    import hashlib

    doc = json.loads((out / "bridge.json").read_text())
    doc["tensors"]["sha256"] = "sha256:" + hashlib.sha256(payload).hexdigest()
    (out / "bridge.json").write_text(json.dumps(doc))
    assert "safetensors" in _load_refusal(out)
    assert not marker.exists()

    assert "bridge.json" in _load_refusal(tmp_path / "nowhere")
    (out / "bridge.json").write_text("{not json")
    _load_refusal(out)
    (out / "bridge.json").write_text(json.dumps({"format": "oprd-bridge", "format_version": 99}))
    assert "99" in _load_refusal(out)


def test_bridge_save_never_overwrites_without_asking(tmp_path):
    b = _small_bridge()
    out = tmp_path / "bridge"
    b.save(str(out))
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    other = _small_bridge(rank=2)
    with pytest.raises(OprdError) as e:
        other.save(str(out))
    assert "already holds a bridge" in _one_line(e)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    other.save(str(out), overwrite=True)
    assert Bridge.load(str(out)).rank == 2
    a_file = tmp_path / "notes.txt"
    a_file.write_text("mine")
    with pytest.raises(OprdError) as e:
        b.save(str(a_file))
    assert "is a file" in _one_line(e)
    assert a_file.read_text() == "mine"


def test_bridge_check_models():
    b = _small_bridge()
    b.check_models(d_student=12, n_student_layers=2, d_teacher=16, n_teacher_layers=4)
    for kw in ({"d_student": 13}, {"n_teacher_layers": 3}, {"d_teacher": 8}):
        with pytest.raises(OprdError) as e:
            b.check_models(**kw)
        _one_line(e)


# --------------------------------------------------------------------------------------------
# cross-tokenizer alignment
# --------------------------------------------------------------------------------------------


def _spans(*pieces):
    """Offsets of consecutive pieces of text, e.g. _spans("hel", "lo") -> [(0, 3), (3, 5)]."""
    out, pos = [], 0
    for p in pieces:
        out.append((pos, pos + len(p)))
        pos += len(p)
    return out


def test_align_identical_tokenisations_is_identity():
    off = _spans("The", " cat", " sat", ".")
    assert align_by_char_offsets(off, off).tolist() == [0, 1, 2, 3]


def test_align_student_merges_what_teacher_splits_and_vice_versa():
    merged = _spans("hello", " world")
    split = _spans("he", "llo", " wo", "rld")
    assert align_by_char_offsets(merged, split).tolist() == [1, 3]
    assert align_by_char_offsets(split, merged).tolist() == [-1, 0, -1, 1]
    # Boundaries that cross: only the common end (the end of the text) pairs.
    assert align_by_char_offsets(_spans("hel", "lo w", "orld"), _spans("hello", " world")).tolist() == [-1, -1, 1]


def test_align_multibyte_characters_and_special_tokens():
    text = "café 😀!"  # 7 characters; é is 2 bytes, the emoji 4
    assert len(text) == 7
    # Byte-level student: é split in two byte pieces, emoji split in three; each piece carries the
    # whole character's span (as fast tokenizers report it). A special token has an empty span.
    student = [(0, 3), (3, 4), (3, 4), (4, 6), (5, 6), (5, 6), (6, 7), (7, 7)]
    teacher = [(0, 0), (0, 4), (4, 5), (5, 6), (6, 7)]
    got = align_by_char_offsets(student, teacher).tolist()
    # caf: no teacher end at 3; first piece of é: incomplete; second piece completes "café" -> teacher 1;
    # " " + emoji start: incomplete; middle piece: incomplete; last piece completes the emoji -> teacher 3;
    # "!" -> teacher 4; special token: no partner.
    assert got == [-1, -1, 1, -1, -1, 3, 4, -1]
    # Every pair has read exactly the same text.
    for i, j in enumerate(got):
        if j >= 0:
            assert text[:student[i][1]] == text[:teacher[j][1]]


def test_align_response_positions_pair_states_that_have_read_the_same_text():
    # Response position t is the state at sequence index Lp + t, which has read y_t (METHOD.md, "Which
    # hidden state is position t"): student position t pairs with the teacher position whose token ends
    # where student token t ends. No shift by one, and no pair for the prompt-only state.
    student = _spans("he", "llo", " wo", "rld", "!")
    teacher = _spans("hello", " world", "!")
    assert align_by_char_offsets(student, teacher).tolist() == [-1, 0, -1, 1, 2]
    assert align_response_positions(student, teacher).tolist() == [-1, 0, -1, 1, 2]
    # A partner beyond the teacher's positions is dropped; the result has n_student_positions entries.
    assert align_response_positions(student, teacher, n_teacher_positions=2).tolist() == [-1, 0, -1, 1, -1]
    assert align_response_positions(student, teacher, n_student_positions=3).tolist() == [-1, 0, -1]
    assert align_response_positions(student, teacher, n_student_positions=7).tolist() == [-1, 0, -1, 1, 2, -1, -1]
    # Identical tokenisations pair every position with itself; the teacher merging the student's
    # pieces pairs only the piece that completes the merged token.
    assert align_response_positions(teacher, teacher).tolist() == [0, 1, 2]
    assert align_response_positions(teacher, student).tolist() == [1, 3, 4]


_CORPUS = [
    "The café serves crème brûlée and naïve jalapeño tacos. 😀 Good!",
    "Let x = 12 + 30; then x^2 = 1764. Therefore the answer is \\boxed{42}.",
    "Über straße: 東京 and 北京 are cities. Emoji: 🚀🔥 done.",
] * 30


@pytest.fixture(scope="module")
def two_tokenizers(tmp_path_factory):
    from oprd_cli.tiny import build_tokenizer

    root = tmp_path_factory.mktemp("toks")
    small = build_tokenizer(_CORPUS, root / "small", vocab_size=300)
    large = build_tokenizer(_CORPUS, root / "large", vocab_size=700)
    return small, large


def _byte_ends(tok, ids):
    """Cumulative byte length after each token (from the vocabulary's byte-level strings)."""
    from oprd_cli.bridge.align import _unicode_to_bytes

    table, ends, n = _unicode_to_bytes(), [], 0
    for t in tok.convert_ids_to_tokens(ids):
        n += len(bytes(table[c] for c in t))
        ends.append(n)
    return ends


def _reference_pairs(text, s_tok, s_ids, t_tok, t_ids):
    """Brute force: student token i pairs with teacher token j iff both have read the same bytes and
    those bytes end on a character boundary (the last such teacher token)."""
    raw = text.encode("utf-8")
    t_ends = _byte_ends(t_tok, t_ids)
    out = []
    for e in _byte_ends(s_tok, s_ids):
        try:
            raw[:e].decode("utf-8")
            ok = True
        except UnicodeDecodeError:
            ok = False
        js = [j for j, te in enumerate(t_ends) if te == e] if ok else []
        out.append(js[-1] if js else -1)
    return out


def test_align_two_real_tokenizers_on_one_response(two_tokenizers):
    small, large = two_tokenizers
    text = "Naïve café: 東京 costs 12 + 30 = 42 🚀🦜 and x^2 = 1764, so \\boxed{42}."
    s_ids, s_off = encode_with_offsets(small, text)
    t_ids, t_off = encode_with_offsets(large, text)
    assert len(s_ids) > len(t_ids)  # the smaller vocabulary splits more
    # The byte-level offsets we compute equal the fast tokenizer's own offset_mapping here.
    for tok, ids, off in ((small, s_ids, s_off), (large, t_ids, t_off)):
        hf = tok(text, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
        assert [tuple(x) for x in hf] == off
    got = align_by_char_offsets(s_off, t_off).tolist()
    assert got == _reference_pairs(text, small, s_ids, large, t_ids)
    paired = [i for i, j in enumerate(got) if j >= 0]
    assert 0 < len(paired) < len(got)  # some positions pair, some are masked
    for i in paired:
        assert small.decode(s_ids[:i + 1]) == large.decode(t_ids[:got[i] + 1]) == text[:s_off[i][1]]
    # The 🦜 (unseen in training) is split into byte pieces by both tokenizers: none of its inner pieces pair.
    parrot = text.index("🦜")
    inner = [i for i, (a, b) in enumerate(s_off) if (a, b) == (parrot, parrot + 1)]
    assert len(inner) > 1 and all(got[i] == -1 for i in inner[:-1])


def test_align_response_positions_on_full_sequences_of_two_real_tokenizers(two_tokenizers):
    # Each model reads its own prompt + the response; the hidden state at sequence index Lp + t has
    # read seq[:Lp + t + 1]. Every paired (student, teacher) state has read the same response text,
    # and it is the text up to the end of student token t.
    small, large = two_tokenizers
    text = "Naïve café: 東京 costs 12 + 30 = 42 🚀🦜 and x^2 = 1764, so \\boxed{42}."
    s_prompt = small("Question: what is 12 + 30?\n", add_special_tokens=False)["input_ids"]
    t_prompt = large("Question: what is 12 + 30?\n", add_special_tokens=False)["input_ids"]
    s_ids, s_off = encode_with_offsets(small, text)
    t_ids, t_off = encode_with_offsets(large, text)
    s_seq, t_seq = s_prompt + s_ids, t_prompt + t_ids
    pos = align_response_positions(s_off, t_off).tolist()
    assert len(pos) == len(s_ids)
    paired = [(t, j) for t, j in enumerate(pos) if j >= 0]
    assert 0 < len(paired) < len(pos)
    for t, j in paired:
        s_read = s_seq[:len(s_prompt) + t + 1]  # what the student state at Lp + t has read
        t_read = t_seq[:len(t_prompt) + j + 1]
        assert small.decode(s_read[len(s_prompt):]) == large.decode(t_read[len(t_prompt):]) == text[:s_off[t][1]]
    # The last tokens of both pair: both have read the whole response.
    assert pos[-1] == len(t_ids) - 1


def test_offsets_for_sampled_non_canonical_ids(two_tokenizers):
    small, large = two_tokenizers
    text = "café 🚀 42"
    # A sampled, non-canonical tokenisation: one byte per token (every byte is in a byte-level vocab),
    # then the EOS the rollout keeps in its ids but not in its text.
    table = {b: c for c, b in __import__("oprd_cli.bridge.align", fromlist=["x"])._unicode_to_bytes().items()}
    ids = [small.convert_tokens_to_ids(table[b]) for b in text.encode("utf-8")] + [small.eos_token_id]
    assert small.decode(ids, skip_special_tokens=True) == text
    assert ids[:-1] != small(text, add_special_tokens=False)["input_ids"]
    off = offsets_for_ids(small, ids, text)
    assert len(off) == len(ids) and off[-1] == (len(text), len(text))
    assert off[:5] == [(0, 1), (1, 2), (2, 3), (3, 4), (3, 4)]  # é is two byte tokens, same char span
    t_ids, t_off = encode_with_offsets(large, text)
    got = align_by_char_offsets(off, t_off).tolist()
    assert got[:-1] == _reference_pairs(text, small, ids[:-1], large, t_ids)
    assert got[-1] == -1
    # Canonical ids give the tokenizer's own offsets; ids that are not this text give None (masked).
    c_ids, c_off = encode_with_offsets(small, text)
    assert offsets_for_ids(small, c_ids, text) == c_off
    assert offsets_for_ids(small, c_ids, text + "x") is None


def test_offsets_need_a_fast_tokenizer():
    class Slow:
        is_fast = False
        name_or_path = "slow-tok"

    with pytest.raises(OprdError) as e:
        encode_with_offsets(Slow(), "hi")
    assert "slow-tok" in _one_line(e)


# --------------------------------------------------------------------------------------------
# bridge loss (Eq. 14-15)
# --------------------------------------------------------------------------------------------


def _loss_case():
    """Lyr=2, B=2, T=2, d_S=r=2. P_S^0 = I, P_S^1 swaps the two features.

    h (both layers): b0 = [3,4], [0,5]; b1 = [1,0], [nan, nan] (masked).
    z^0: b0 = [1,0], [0,2]; b1 = [-1,0], nan.   z^1: b0 = [0,1], [0,2]; b1 = [0,-3], nan.
    Normalised errors (1/r)||n(P h) - n(z)||^2 and cosines:
      layer 0: [.6,.8]-[1,0] -> (.16+.64)/2 = .4 (cos .6); [0,1]-[0,1] -> 0 (cos 1); [1,0]-[-1,0] -> 2 (cos -1)
      layer 1: [.8,.6]-[0,1] -> .4 (cos .6); [1,0]-[0,1] -> 1 (cos 0); [0,1]-[0,-1] -> 2 (cos -1)
    token-mean: layers 2.4/3 = .8 and 3.4/3 -> loss (.8 + 3.4/3)/2 = 29/30
    sample-mean: b0 (.2 + .7)/2 = .45, b1 (2 + 2)/2 = 2 -> loss 1.225, per_layer [1.1, 1.35]
    cosine per layer: (.6+1-1)/3 = .2, (.6+0-1)/3 = -2/15
    raw (normalize=False): layer 0 errors 10, 4.5, 2; layer 1 errors 10, 14.5, 8 -> token loss 49/6
    """
    nan = float("nan")
    h = torch.tensor([[[3.0, 4.0], [0.0, 5.0]], [[1.0, 0.0], [nan, nan]]])
    hs = torch.stack([h, h.clone()])  # [Lyr, B, T, d]
    w = torch.stack([torch.eye(2), torch.tensor([[0.0, 1.0], [1.0, 0.0]])])
    z = torch.tensor([
        [[[1.0, 0.0], [0.0, 2.0]], [[-1.0, 0.0], [nan, nan]]],
        [[[0.0, 1.0], [0.0, 2.0]], [[0.0, -3.0], [nan, nan]]],
    ])
    mask = torch.tensor([[True, True], [True, False]])
    return hs, w, z, mask


def test_bridge_loss_hand_values_token_mean():
    hs, w, z, mask = _loss_case()
    out = bridge_loss(hs, w, z, mask)
    assert isinstance(out, BridgeOutput)
    assert out.loss.item() == pytest.approx(29 / 30, abs=1e-6)
    assert out.per_layer.tolist() == pytest.approx([0.8, 3.4 / 3], abs=1e-6)
    assert out.per_layer_cosine.tolist() == pytest.approx([0.2, -2 / 15], abs=1e-6)
    assert out.cosine.item() == pytest.approx((0.2 - 2 / 15) / 2, abs=1e-6)
    assert out.num_positions.tolist() == [2.0, 1.0]
    assert out.per_sample.tolist() == pytest.approx([0.45, 2.0], abs=1e-6)


def test_bridge_loss_hand_values_sample_mean_and_raw():
    hs, w, z, mask = _loss_case()
    out = bridge_loss(hs, w, z, mask, reduction="sample")
    assert out.loss.item() == pytest.approx(1.225, abs=1e-6)
    assert out.per_layer.tolist() == pytest.approx([1.1, 1.35], abs=1e-6)
    raw = bridge_loss(hs, w, z, mask, normalize=False)
    assert raw.loss.item() == pytest.approx(49 / 6, abs=1e-5)
    # Token-mean and sample-mean differ when samples have different numbers of positions.
    assert out.loss.item() != pytest.approx(bridge_loss(hs, w, z, mask).loss.item())


def test_bridge_loss_gradient_reaches_student_not_projector_and_respects_mask():
    hs, w, z, mask = _loss_case()
    h_list = [hs[0].clone().requires_grad_(True), hs[1].clone().requires_grad_(True)]
    w_list = [w[0].clone().requires_grad_(True), w[1].clone().requires_grad_(True)]
    z_req = z.clone().requires_grad_(True)
    out = bridge_loss(h_list, w_list, z_req, mask)
    assert torch.isfinite(out.loss)
    out.loss.backward()
    for h in h_list:
        assert torch.isfinite(h.grad).all()
        assert h.grad[0, 0].abs().sum() > 0  # (b1, t0) is antipodal (cos -1), a stationary point
        assert torch.equal(h.grad[1, 1], torch.zeros(2))  # masked position: exactly zero
    assert all(x.grad is None for x in w_list)  # P_S frozen
    assert z_req.grad is None  # teacher is a constant
    # The gradient matches autograd through an explicit reference on the supervised positions.
    h0 = hs[0, 0, 0].clone().requires_grad_(True)
    ref = ((torch.nn.functional.normalize(h0 @ w[0].T, dim=0) - torch.nn.functional.normalize(z[0, 0, 0], dim=0))
           .square().mean() / 3 / 2)
    ref.backward()
    assert torch.allclose(h_list[0].grad[0, 0], h0.grad, atol=1e-6)


def test_bridge_loss_list_and_tensor_inputs_agree_and_bf16_grad():
    hs, w, z, mask = _loss_case()
    a = bridge_loss(hs, w, z, mask)
    b = bridge_loss(list(hs), list(w), list(z), mask)
    assert torch.equal(a.loss, b.loss) and torch.equal(a.per_layer_cosine, b.per_layer_cosine)
    hb = hs.bfloat16().requires_grad_(True)
    out = bridge_loss(hb, w, z, mask)
    out.loss.backward()
    assert hb.grad.dtype == torch.bfloat16 and out.loss.dtype == torch.float32


def test_bridge_loss_with_identity_projector_equals_oprd_loss():
    g = torch.Generator().manual_seed(0)
    B, T, d, L = 3, 5, 4, 2
    hs = torch.randn(L, B, T, d, generator=g)
    z = torch.randn(L, B, T, d, generator=g)
    mask = torch.rand(B, T, generator=g) > 0.3
    w = torch.eye(d).expand(L, d, d)
    for reduction in ("token", "sample"):
        a = bridge_loss(hs, w, z, mask, reduction=reduction)
        o = oprd_loss(hs.permute(1, 0, 2, 3), z.permute(1, 0, 2, 3), mask, normalize=True, reduction=reduction)
        assert a.loss.item() == pytest.approx(o.loss.item(), abs=1e-6)
        assert torch.allclose(a.per_layer_cosine, o.per_layer_cosine, atol=1e-6)


def test_bridge_loss_with_identity_projector_is_exactly_oprd_loss():
    # One home for the representation-loss arithmetic: through an identity P_S the bridge loss is
    # oprd_loss bit for bit (errors, reductions and cosines), in both forms and reductions.
    g = torch.Generator().manual_seed(0)
    B, T, d, L = 3, 5, 4, 2
    hs = torch.randn(L, B, T, d, generator=g)
    z = torch.randn(L, B, T, d, generator=g)
    mask = torch.rand(B, T, generator=g) > 0.3
    w = torch.eye(d).expand(L, d, d)
    fields = ("loss", "per_sample", "per_layer", "cosine", "per_layer_cosine", "num_positions")
    for normalize in (True, False):
        for reduction in ("token", "sample"):
            a = bridge_loss(hs, w, z, mask, normalize=normalize, reduction=reduction)
            o = oprd_loss(hs.permute(1, 0, 2, 3), z.permute(1, 0, 2, 3), mask, normalize=normalize,
                          reduction=reduction)
            for f in fields:
                assert torch.equal(getattr(a, f), getattr(o, f)), (normalize, reduction, f)


def test_bridge_loss_through_a_fitted_bridge_is_small_for_a_linear_student():
    # End to end on tensors: teacher states, PCA, a student whose states are a linear map of the
    # centred teacher states (P_S has no bias, Eq. 13); after the fit the bridge loss at the teacher's
    # own projections is near 0.
    g = torch.Generator().manual_seed(1)
    t_rows = _pca_rows(n=2000, d=16, seed=11)
    mix = torch.randn(16, 20, generator=g)
    s_rows = (t_rows - t_rows.mean(0)) @ mix
    b = fit_bridge([s_rows], {3: t_rows}, [2], [3], rank=3, epochs=0, init="lstsq")
    hs = s_rows[:40].reshape(1, 4, 10, 20)
    z = b.project_teacher(0, t_rows[:40]).reshape(1, 4, 10, 3)
    out = bridge_loss(hs, b.student_proj, z, torch.ones(4, 10, dtype=torch.bool))
    assert out.loss.item() < 1e-3 and out.cosine.item() > 0.999


def test_fit_bridge_shares_one_pca_per_teacher_layer_and_reports_progress():
    # 3 student layers over 2 teacher layers (L_S > L_T): layer_map(3, 2) = [1, 1, 2].
    t_layers = layer_map(3, 2)
    teacher_rows = {1: _pca_rows(n=300, d=16, seed=21), 2: _pca_rows(n=300, d=16, seed=22)}
    g = torch.Generator().manual_seed(3)
    student_rows = [torch.randn(300, 8, generator=g) for _ in range(3)]
    seen_layers, seen_epochs = [], []
    b = fit_bridge(student_rows, teacher_rows, [1, 2, 3], t_layers, rank=2, epochs=3,
                   on_layer=lambda j, st: seen_layers.append((j, st["teacher_layer"])),
                   on_epoch=lambda j, e, loss: seen_epochs.append((j, e)))
    assert b.teacher_layers == [1, 1, 2]
    assert torch.equal(b.teacher_proj[0], b.teacher_proj[1]) and torch.equal(b.teacher_mean[0], b.teacher_mean[1])
    assert not torch.equal(b.student_proj[0], b.student_proj[1])
    assert seen_layers == [(0, 1), (1, 1), (2, 2)]
    assert seen_epochs == [(j, e) for j in range(3) for e in range(3)]
    P, _, ev = fit_teacher_pca(teacher_rows[2], 2)
    assert torch.equal(b.teacher_proj[2], P) and b.stats["layers"][2]["explained_variance"] == ev.tolist()
    with pytest.raises(OprdError) as e:
        fit_bridge(student_rows, {1: teacher_rows[1]}, [1, 2, 3], t_layers, rank=2)
    assert "teacher layer 2" in _one_line(e)


def test_bridge_identity_is_the_content_not_where_it_was_fitted(tmp_path):
    """A cache records the bridge's digest and the trainer's batch order hangs on the cache's content digest,
    so the same bridge fitted from rollouts at another path, or from models at other paths, must keep it."""
    from oprd_cli.bridge.command import bridge_identity

    b = _small_bridge()
    b.stats["rollouts"] = "/somewhere/run-a/rollouts.zarr"
    b.save(str(tmp_path / "a"))
    moved = json.loads((tmp_path / "a" / "bridge.json").read_text())
    moved["stats"]["rollouts"] = "/elsewhere/run-b/rollouts.zarr"
    moved["student"]["name"], moved["teacher"]["name"] = "/other/s", "/other/t"
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "bridge.json").write_text(json.dumps(moved))
    (tmp_path / "b" / "bridge.safetensors").write_bytes((tmp_path / "a" / "bridge.safetensors").read_bytes())
    ida, idb = (bridge_identity(str(tmp_path / k), Bridge.load(str(tmp_path / k))) for k in "ab")
    assert ida["digest"] == idb["digest"] and ida["path"] != idb["path"]
    moved["student"]["weights_digest"] = "sha256:another-student"  # what the bridge is for does count
    (tmp_path / "b" / "bridge.json").write_text(json.dumps(moved))
    assert bridge_identity(str(tmp_path / "b"), Bridge.load(str(tmp_path / "b")))["digest"] != ida["digest"]
