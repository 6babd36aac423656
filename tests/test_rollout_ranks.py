"""Rollouts under torchrun by units: the seeded batch of the global job order is the unit a rank
samples, so the ranks' samples put together are the one process's (no torchrun here; the two-rank
run is in tests/test_distributed.py)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from oprd_cli.config import SamplingConfig
from oprd_cli.rollout import HFBackend
from oprd_cli.rollout_ranks import BatchShare


class Gathered(Exception):
    """Raised by a test gather once it has seen this rank's part."""


def same(a, b) -> bool:
    return (a.finish_reason == b.finish_reason and a.text == b.text and np.array_equal(a.response_ids, b.response_ids)
            and np.array_equal(a.logprobs, b.logprobs))


@pytest.fixture(scope="module")
def backend(tiny_dir):
    from oprd_cli.models import load_model, load_tokenizer

    tok = load_tokenizer(str(tiny_dir / "qwen2"))
    return HFBackend(load_model(str(tiny_dir / "qwen2"), torch.device("cpu"), torch.float32), tok)


def test_each_rank_samples_its_seeded_batches_and_the_union_is_one_process(backend):
    # 5 prompts x 2 samples = 10 jobs, longest prompt first, batches of 3: b0 b1 b2 b3 (the last has 1 job)
    prompts = [[5, 6, 7], [8, 9, 10, 11, 12, 13], [14, 15], [16, 17, 18, 19], [20, 21, 22, 23, 24]]
    sampling = SamplingConfig(num_samples=2, max_new_tokens=6, temperature=1.0, top_k=50, batch_size=3, seed=3)
    seen = []
    one = backend.generate(prompts, sampling, on_sequences_done=lambda n, t: seen.append(n))
    assert sum(seen) == 10
    order = sorted(range(5), key=lambda i: (-len(prompts[i]), i))
    jobs = [(p, j) for p in order for j in range(2)]

    parts = {}

    def capture(rank):
        def gather(obj, dst):
            assert dst == 0  # the samples go to the writer alone
            parts[rank] = obj
            raise Gathered
        return gather

    for rank in (0, 1):
        with pytest.raises(Gathered):
            backend.generate(prompts, sampling, share=BatchShare(rank, 2, gather=capture(rank)))
    # rank 0 sampled batches 0 and 2, rank 1 batches 1 and 3, each seeded with its global batch number
    assert [i for i, _ in parts[0]] == [0, 1, 2, 6, 7, 8]
    assert [i for i, _ in parts[1]] == [3, 4, 5, 9]
    for rank in (0, 1):
        for i, s in parts[rank]:
            p, j = jobs[i]
            assert same(s, one[p][j]), (rank, p, j)
    # rank 0 receives every rank's part and holds the one-process samples; its progress counts them all
    seen.clear()
    got = backend.generate(prompts, sampling, on_sequences_done=lambda n, t: seen.append(n),
                           share=BatchShare(0, 2, gather=lambda obj, dst: [obj, parts[1]]))
    assert sum(seen) == 10
    assert all(same(a, b) for ga, gb in zip(got, one) for a, b in zip(ga, gb))
    # rank 1 receives nothing: it keeps its own samples, the rest None
    got = backend.generate(prompts, sampling, share=BatchShare(1, 2, gather=lambda obj, dst: None))
    assert [i for i, (p, j) in enumerate(jobs) if got[p][j] is not None] == [3, 4, 5, 9]


def test_a_rank_without_a_batch_still_joins_the_gather(backend):
    sampling = SamplingConfig(num_samples=1, max_new_tokens=3, batch_size=4, seed=0)
    one = backend.generate([[5, 6, 7]], sampling)
    sent = {}

    def gather(rank):
        def run(obj, dst):
            sent[rank] = obj
            return [sent[0], []] if rank == dst else None
        return run

    got = backend.generate([[5, 6, 7]], sampling, share=BatchShare(0, 2, gather=gather(0)))
    assert [i for i, _ in sent[0]] == [0] and same(got[0][0], one[0][0])
    got = backend.generate([[5, 6, 7]], sampling, share=BatchShare(1, 2, gather=gather(1)))
    assert sent[1] == [] and got == [[None]]  # rank 1 had no batch, sampled nothing, and still joined
