"""The one truncated forward (oprd_cli.backbone), shared by the teacher pass and the trainer.

Its hidden states must equal a full HF forward's ``hidden_states`` (index 0 = embeddings, 1..L-1 =
block outputs, L = after the final norm) for every architecture we run, whether the blocks past the
deepest layer were dropped or the forward merely stops there; the LM head on selected rows must give
the same entries as the full logits.
"""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from oprd_cli import backbone
from oprd_cli.errors import OprdError


def _load(path):
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="eager").eval()


def _ids(model, B=3, S=11, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, model.config.vocab_size, (B, S), generator=g)


@pytest.fixture(scope="module", params=["qwen2", "llama", "qwen2-deep"])
def arch(request, tiny_dir):
    model = _load(tiny_dir / request.param)
    ids = _ids(model)
    with torch.no_grad():
        ref = model(input_ids=ids, output_hidden_states=True, use_cache=False).hidden_states
    return request.param, tiny_dir / request.param, model, ids, ref


def test_hidden_states_equal_full_hf_forward(arch):
    name, _, model, ids, ref = arch
    L = model.config.num_hidden_layers
    with torch.no_grad():
        out = backbone.backbone_hidden(model, ids, list(range(L + 1)), need_final=True)
    assert sorted(out.hidden) == list(range(L + 1)) and len(ref) == L + 1
    for i in range(L + 1):
        assert torch.equal(out.hidden[i], ref[i]), f"{name}: hidden_states[{i}] differs from HF"
    assert torch.equal(out.final, ref[L])


def test_truncated_forward_stops_early_and_matches(arch):
    """A shallow request runs only the blocks it needs (counted by a hook) and still equals HF."""
    name, path, model, ids, ref = arch
    L = model.config.num_hidden_layers
    ran = []
    handles = [b.register_forward_hook(lambda m, a, o, i=i: ran.append(i))
               for i, b in enumerate(backbone.decoder_of(model)[2])]
    try:
        with torch.no_grad():
            out = backbone.backbone_hidden(model, ids, [0, 1])
    finally:
        for h in handles:
            h.remove()
    assert ran == [0] and out.final is None
    assert torch.equal(out.hidden[0], ref[0]) and torch.equal(out.hidden[1], ref[1])
    # the teacher's way: blocks past the deepest layer dropped, states gathered at selected rows
    trunc = _load(path)
    depth = max(1, L - 1)
    backbone.truncate_blocks(trunc, depth)
    assert len(backbone.decoder_of(trunc)[2]) == depth
    bi, si = torch.tensor([0, 0, 2, 1]), torch.tensor([1, 10, 4, 0])
    with torch.no_grad():
        got = backbone.backbone_hidden(trunc, ids, [0, depth], num_layers=L, rows=(bi, si))
    for i in (0, depth):
        assert torch.equal(got.hidden[i], ref[i][bi, si]), f"{name}: truncated hidden_states[{i}] differs"


def test_out_of_range_layer_is_refused(arch):
    _, _, model, ids, _ = arch
    with pytest.raises(OprdError, match="out of range"):
        backbone.backbone_hidden(model, ids, [model.config.num_hidden_layers + 1])


def test_topk_support_logits_equal_the_same_entries_of_full_logits(tiny_dir):
    model = _load(tiny_dir / "qwen2")
    ids = _ids(model, B=2, S=9, seed=1)
    with torch.no_grad():
        h = backbone.backbone_hidden(model, ids, [], need_final=True).final.reshape(-1, model.config.hidden_size)
        full = backbone.full_logits(model, h)  # [N, V]
        assert torch.allclose(full, model(input_ids=ids, use_cache=False).logits.reshape(full.shape), atol=1e-5)
    N, K = h.shape[0], 5
    support = torch.stack([torch.randperm(model.config.vocab_size, generator=torch.Generator().manual_seed(i))[:K]
                           for i in range(N)])
    expected = full.gather(1, support)
    for chunk in (0, 4):  # whole, and chunked under activation checkpointing (grad on)
        hg = h.clone().requires_grad_(True)
        got = backbone.support_logits(model, hg, support, chunk=chunk)
        torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)
        got.sum().backward()
        torch.testing.assert_close(hg.grad, model.lm_head.weight[support].sum(1), rtol=0, atol=1e-5)
    targets = support[:, 0]
    logp = torch.log_softmax(full.float(), dim=-1)
    torch.testing.assert_close(backbone.token_logprobs(model, h, targets, chunk=4), logp.gather(1, targets[:, None])[:, 0],
                               rtol=0, atol=1e-5)
    # the teacher's head on selected rows, with a tiny logit budget (one row per chunk)
    sel = backbone.selected_logprobs(model, h, targets, support=support, topk=K, logit_elements=1)
    top_v, top_i = logp.topk(K, dim=-1)
    torch.testing.assert_close(sel["logprobs"], logp.gather(1, targets[:, None])[:, 0], rtol=0, atol=1e-5)
    torch.testing.assert_close(sel["support_logprobs"], logp.gather(1, support), rtol=0, atol=1e-5)
    assert torch.equal(sel["topk_ids"], top_i.to(torch.int32))
    torch.testing.assert_close(sel["topk_logprobs"], top_v, rtol=0, atol=1e-5)


def test_pack_by_length_is_the_one_packing():
    from oprd_cli.train.batches import split_micro_batches

    lengths = [5, 50, 7, 48, 6, 30, 50]
    groups = backbone.pack_by_length(lengths, 100)
    assert groups == [[1, 6], [3, 5], [2, 4, 0]]  # longest first, ties by index, rows x longest <= 100
    assert backbone.pack_by_length([200, 3], 100) == [[0], [1]]  # longer than the budget: a batch of its own
    rows = [10 + i for i in range(len(lengths))]
    assert split_micro_batches(rows, lengths, 100) == [[rows[i] for i in g] for g in groups]
