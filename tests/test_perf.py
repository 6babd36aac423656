"""Issue 16 (performance near the floor): correctness of the memory levers and of the bench's figures.

Speed and memory themselves are measured by ``oprd bench`` and written into docs/performance.md; these
tests only check that the levers leave the numbers the same and that the reported breakdowns add up.
"""

from __future__ import annotations

import copy
import json

import pytest
import torch

from helpers import run_cli


def _reference_adamw_run(model, fused: bool, steps: int = 4):
    from oprd_cli.train.step import make_adamw

    params = [p for p in model.parameters() if p.requires_grad]
    if fused:
        opt = make_adamw(params, 1e-3, (0.9, 0.95), 1e-8, 0.1, torch.device("cpu"))
        assert opt.defaults.get("fused"), "the trainer's AdamW is not the fused kernel on CPU"
    else:  # the reference: torch's single-tensor AdamW
        opt = torch.optim.AdamW(params, lr=1e-3, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1, foreach=False)
    g = torch.Generator().manual_seed(0)
    for _ in range(steps):
        ids = torch.randint(0, model.config.vocab_size, (2, 12), generator=g)
        opt.zero_grad(set_to_none=True)
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
    return model


def test_fused_adamw_equals_reference_adamw(tiny_dir):
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(tiny_dir / "qwen2", attn_implementation="eager")
    ref = _reference_adamw_run(copy.deepcopy(base), fused=False)
    fused = _reference_adamw_run(copy.deepcopy(base), fused=True)
    moved = max((a - b).abs().max().item() for a, b in zip(base.parameters(), ref.parameters()))
    assert moved > 1e-4  # the steps changed the weights
    diff = max((a - b).abs().max().item() for a, b in zip(ref.parameters(), fused.parameters()))
    assert diff <= 1e-6, diff


def test_trainer_uses_fused_adamw_and_chunked_full_topk_equals_unchunked(tiny_dir):
    """The verl-style top-k path (full log-softmax) is chunked and checkpointed; values and gradients are
    the same as one unchunked pass."""
    from transformers import AutoModelForCausalLM

    from oprd_cli import backbone
    from oprd_cli.train import TrainConfig, Trainer

    model = AutoModelForCausalLM.from_pretrained(tiny_dir / "qwen2", attn_implementation="eager")
    trainer = Trainer(model, TrainConfig.from_flat(objective="opd-topk", topk_logits="full"), [],
                      torch.device("cpu"), total_steps=None)
    assert trainer.optimizer.defaults.get("fused")
    h = torch.randn(37, model.config.hidden_size, requires_grad=True)
    ids = torch.randint(0, model.config.vocab_size, (37, 4))
    grads = []
    for chunk in (0, 8):
        z = backbone.full_logprobs_at(model, h, ids, chunk)
        ref = torch.log_softmax(backbone.full_logits(model, h).float(), dim=-1).gather(-1, ids)
        torch.testing.assert_close(z, ref, rtol=0, atol=1e-6)
        (g,) = torch.autograd.grad((z * torch.arange(4.0)).sum(), h)
        grads.append(g)
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-5, atol=1e-7)


def test_breakdown_adds_up_to_delta_peak():
    from oprd_cli.bench.loss import breakdown

    base = 1000
    fb_peak = {"fwd_bwd_peak": base + 900, "opt_peak": base + 700, "after_forward": base + 300,
               "after_loss": base + 450, "after_backward": base + 520, "grad_bytes": 500}
    opt_peak = dict(fb_peak, opt_peak=base + 1200)
    for phases, phase in ((fb_peak, "forward/backward"), (opt_peak, "optimizer")):
        b = breakdown(phases, base)
        parts = sum(b[k] for k in ("gradients", "optimizer", "activations", "lm_head", "backward_other"))
        assert parts == b["delta_peak"] == max(phases["fwd_bwd_peak"], phases["opt_peak"]) - base
        assert b["peak_phase"] == phase and b["gradients"] == 500
    assert breakdown(opt_peak, base)["optimizer"] == 1200 - 520


@pytest.mark.parametrize("ckpt", [False, True])
def test_bench_loss_json_reports_breakdown_and_trained_parameters(tiny_dir, ckpt):
    args = ["bench", "loss", "--json", "--no-isolate", "--num-layers", "2", "--seq-len", "16", "--last-k", "8",
            "--prompt-len", "4", "--hidden-size", "32", "--num-heads", "4", "--num-kv-heads", "2",
            "--intermediate-size", "64", "--vocab-size", "300", "--repeats", "1", "--topk", "4",
            "--objectives", "opd_top16,oprd"]
    r = json.loads(run_cli(*(args + (["--grad-checkpointing"] if ckpt else []))).stdout)
    V, d = 300, 32
    for name in ("opd_top16", "oprd"):
        o = r[name]
        b = o["breakdown"]
        assert sum(b[k] for k in ("gradients", "optimizer", "activations", "lm_head", "backward_other")) \
            == b["delta_peak"] == o["delta_peak_bytes"]
        assert o["grad_bytes"] == 4 * o["trained_parameters"] == b["gradients"]
        assert o["grad_checkpointing"] is ckpt
    # OPRD never runs the LM head: the untied head gets no gradient; top-16 trains it too
    assert r["opd_top16"]["trained_parameters"] - r["oprd"]["trained_parameters"] == V * d


def test_train_overhead_arithmetic():
    from oprd_cli.bench.train import overhead_of

    rows = [{"time_s": 10.0, "step_time_s": 9.0, "data_wait_s": 0.5},
            {"time_s": 12.0, "step_time_s": 1.5, "data_wait_s": 0.6},
            {"time_s": 14.5, "step_time_s": 2.0, "data_wait_s": 0.9}]
    o = overhead_of(rows)
    assert o["wall_s"] == 4.5 and o["step_s"] == 3.5 and o["steps_measured"] == 2
    assert o["overhead"] == pytest.approx(1.0 / 3.5) and o["data_path_s"] == pytest.approx(1.0)


def test_bench_rollout_runs_oprd_and_both_bare_engines_on_the_same_prompts(tiny_qwen):
    r = json.loads(run_cli("bench", "rollout", "--model", tiny_qwen, "--num-prompts", "2", "--max-new-tokens", "4",
                           "--batch-size", "2", "--device", "cpu", "--json").stdout)
    for k in ("oprd", "bare_eager", "bare_sdpa"):
        assert 2 <= r[k]["tokens"] <= 8 and r[k]["tok_s"] > 0
    assert r["ratio"] == pytest.approx(r["oprd"]["tok_s"] / r[r["fastest_bare"]]["tok_s"])
    assert r["machine"]["cpu_cores"] and r["attn_implementation"] == "eager"


def test_bench_all_small_prints_every_ratio_with_the_machine():
    r = json.loads(run_cli("bench", "all", "--small", "--device", "cpu", "--json").stdout)
    assert set(r["ratios"]) == {"loss/opd_top1/delta_peak_over_grads", "loss/opd_top16/delta_peak_over_grads",
                                "loss/oprd/delta_peak_over_grads", "loss/oprd_speedup_vs_top16",
                                "rollout/oprd_over_fastest_bare", "train/data_path_overhead", "cache/writer_overhead"}
    assert all(isinstance(v, float) for v in r["ratios"].values())
    assert r["machine"]["cpu_cores"] and r["load_average"]["before"] is not None


def test_attention_rule_sdpa_for_training_on_cpu():
    from oprd_cli.models import choose_attn_implementation

    assert choose_attn_implementation(torch.device("cpu"), torch.float32) == "eager"
    assert choose_attn_implementation(torch.device("cpu"), torch.float32, training=True) == "sdpa"
    assert choose_attn_implementation(torch.device("cpu"), torch.float32, hidden_size=64) == "eager"  # tiny
    assert choose_attn_implementation(torch.device("cpu"), torch.float32, hidden_size=576) == "sdpa"  # SmolLM2
