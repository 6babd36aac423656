"""The one truncated decoder forward, shared by the teacher pass and the trainer, and the LM head on
selected rows.

Hidden-state indexing follows HF ``output_hidden_states=True`` of the full causal LM (checked in the
tests for equality, Qwen2 and Llama):

- ``hidden_states[0]``: the input of the first decoder block (the embedding output);
- ``hidden_states[l]`` for ``1 <= l < L``: the output of block ``l`` (before any norm);
- ``hidden_states[L]``: the decoder's ``last_hidden_state``, i.e. AFTER the final norm (transformers 5
  ties the last entry to ``last_hidden_state``; the raw output of block ``L`` is never exposed).

:func:`decoder_of` is the one rule for finding the decoder and its blocks; :func:`truncate_blocks`
drops the blocks past the deepest needed layer (the teacher, which never needs them). :func:`backbone_hidden`
calls the decoder (without the LM head), captures the requested entries with forward hooks (optionally
gathered at selected rows right away) and stops after the deepest block it needs, so a cache of the
first layers costs only those layers. The LM head is applied to gathered positions only:
:func:`token_logprobs` (log-probs of given ids, chunked), :func:`support_logits` (``h @ W[S].T``,
chunked and recomputed in backward), :func:`selected_logprobs` (the teacher's log-probs: sampled
ids, its top-k and the student's support, chunked by logit elements) and :func:`chunked_entropy`.
:func:`pack_by_length` is the one length packing of sequences into padded batches.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Sequence

import torch
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from oprd_cli.errors import OprdError

_BLOCK_ATTRS = ("layers", "h", "blocks")


class _StopForward(Exception):
    """Raised by a hook after the deepest needed block: the rest of the decoder never runs."""


@dataclass
class BackboneOutput:
    hidden: dict[int, Tensor]  # hidden_states index -> [B, S, d] (or [N, d] gathered at ``rows``)
    final: Tensor | None  # [B, S, d] post-final-norm states (hidden_states[L]) when asked for


def decoder_of(model) -> tuple[torch.nn.Module, str, torch.nn.ModuleList]:
    """``(decoder, attribute, blocks)``: the decoder stack (``model.get_decoder()``, else the attribute
    named by ``base_model_prefix``) and its ``ModuleList`` of blocks (``layers``, ``h`` or ``blocks``)."""
    get = getattr(model, "get_decoder", None)
    decoder = get() if callable(get) else None
    if decoder is None:
        decoder = getattr(model, getattr(model, "base_model_prefix", "model"), None)
    for attr in _BLOCK_ATTRS:
        blocks = getattr(decoder, attr, None) if decoder is not None else None
        if isinstance(blocks, torch.nn.ModuleList):
            return decoder, attr, blocks
    raise OprdError(f"cannot find the decoder blocks of {type(model).__name__}; this architecture is not "
                    "supported by oprd yet")


def truncate_blocks(model, depth: int) -> None:
    """Drop the decoder blocks past ``hidden_states[depth]`` (at least one block stays)."""
    decoder, attr, blocks = decoder_of(model)
    setattr(decoder, attr, torch.nn.ModuleList(list(blocks)[: max(int(depth), 1)]))


def _first_tensor(x):
    return x[0] if isinstance(x, (tuple, list)) else x


def backbone_hidden(model, input_ids: Tensor, layers: list[int], need_final: bool = False, *,
                    num_layers: int | None = None, rows: tuple[Tensor, Tensor] | None = None) -> BackboneOutput:
    """Run the decoder on ``input_ids`` ``[B, S]`` (right-padded; no attention mask is needed because
    causal attention never lets a valid position see the padding after it) and return
    ``hidden_states[l]`` for every ``l`` in ``layers`` (HF indexing, see the module doc) and, when
    ``need_final``, the post-norm final states that the LM head consumes.

    ``num_layers`` is the model's depth L when :func:`truncate_blocks` dropped blocks (default: the
    number of blocks). ``rows = (batch_index [N], seq_index [N])`` gathers every captured state at
    those positions as soon as it exists (``[N, d]``), so full ``[B, S, d]`` states of many layers
    never live at once. Only as many blocks run as the deepest requested index needs; the LM head
    never runs here.
    """
    decoder, _, blocks = decoder_of(model)
    n_layers = int(num_layers) if num_layers is not None else len(blocks)
    wanted = sorted(set(int(i) for i in layers))
    if wanted and (wanted[0] < 0 or wanted[-1] > n_layers):
        raise OprdError(f"hidden_states index {wanted[-1] if wanted[-1] > n_layers else wanted[0]} is out of range "
                        f"for a model with {n_layers} layers (0..{n_layers})")
    run_all = need_final or (n_layers in wanted)
    deepest_block = n_layers if run_all else (max(wanted) if wanted else 0)
    pick = (lambda h: h[rows[0], rows[1]]) if rows is not None else (lambda h: h)

    captured: dict[int, Tensor] = {}
    active = [True]  # hooks fire again when gradient checkpointing recomputes a block: ignore those
    handles = []

    def make_hook(block_idx: int):
        def hook(module, args, kwargs, output):
            if not active[0]:
                return None
            if block_idx == 0 and 0 in wanted:
                h0 = args[0] if args else kwargs.get("hidden_states")
                captured[0] = pick(h0)
            idx = block_idx + 1  # output of block i is hidden_states[i + 1]
            if idx in wanted and idx < n_layers:
                captured[idx] = pick(_first_tensor(output))
            if not run_all and idx >= deepest_block:
                raise _StopForward
            return None

        return hook

    final = None
    try:
        for i, block in enumerate(blocks):
            if i < max(deepest_block, 1):
                handles.append(block.register_forward_hook(make_hook(i), with_kwargs=True))
        try:
            out = decoder(input_ids=input_ids, use_cache=False)
            final = out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]
        except _StopForward:
            pass
    finally:
        active[0] = False
        for h in handles:
            h.remove()
    if n_layers in wanted:
        captured[n_layers] = pick(final)
    missing = [i for i in wanted if i not in captured]
    if missing:  # pragma: no cover - an architecture whose blocks do not see the hidden states as args[0]
        raise OprdError(f"could not capture hidden_states {missing} of {type(model).__name__}")
    return BackboneOutput(hidden=captured, final=final if need_final else None)


def pack_by_length(lengths: Sequence[int], budget: int) -> list[list[int]]:
    """Indices of ``lengths`` packed into batches whose padded size ``len(batch) * max(length)`` stays
    within ``budget`` tokens (a sequence longer than the budget gets a batch of its own). Longest
    first, ties by index; deterministic."""
    order = sorted(range(len(lengths)), key=lambda i: (-int(lengths[i]), i))
    groups: list[list[int]] = []
    cur: list[int] = []
    for i in order:
        longest = int(lengths[cur[0]]) if cur else int(lengths[i])
        if cur and longest * (len(cur) + 1) > budget:
            groups.append(cur)
            cur = []
        cur.append(i)
    if cur:
        groups.append(cur)
    return groups


# --------------------------------------------------------------------------------- LM head helpers
def lm_head_params(model) -> tuple[Tensor, Tensor | None, float | None]:
    """``(W [V, d], bias [V] or None, final_logit_softcapping or None)`` of the output layer."""
    head = model.get_output_embeddings()
    if head is None or not hasattr(head, "weight"):
        raise OprdError(f"{type(model).__name__} has no output embedding (LM head); OPD objectives need one")
    cfg = getattr(model.config, "text_config", None) or model.config
    cap = getattr(cfg, "final_logit_softcapping", None)
    return head.weight, getattr(head, "bias", None), (float(cap) if cap else None)


def _softcap(logits: Tensor, cap: float | None) -> Tensor:
    return logits if cap is None else torch.tanh(logits / cap) * cap


def full_logits(model, h: Tensor) -> Tensor:
    """Full-vocabulary logits ``[N, V]`` of states ``h`` ``[N, d]`` (the verl-style baseline path)."""
    w, b, cap = lm_head_params(model)
    return _softcap(torch.nn.functional.linear(h, w, b), cap)


def _by_chunks(fn, model, h: Tensor, ids: Tensor, chunk: int) -> Tensor:
    """``fn(h, W, b, ids, cap)`` of the LM head, over row chunks of ``h``/``ids`` under activation
    checkpointing when ``chunk > 0`` and gradients are on (so only one chunk's output lives at once)."""
    w, b, cap = lm_head_params(model)
    n = h.shape[0]
    if chunk <= 0 or n <= chunk or not torch.is_grad_enabled():
        return fn(h, w, b, ids, cap)
    parts = [checkpoint(fn, h[i:i + chunk], w, b, ids[i:i + chunk], cap, use_reentrant=False)
             for i in range(0, n, chunk)]
    return torch.cat(parts)


def _head_logits(h: Tensor, w: Tensor, b: Tensor | None, cap: float | None) -> Tensor:
    """float32 logits ``[N, V]`` of states ``h`` ``[N, d]`` (soft-capped after the cast)."""
    return _softcap(torch.nn.functional.linear(h, w, b).float(), cap)


def _logprob_chunk(h: Tensor, w: Tensor, b: Tensor | None, ids: Tensor, cap: float | None) -> Tensor:
    logits = _head_logits(h, w, b, cap)
    return logits.gather(-1, ids[:, None])[:, 0] - torch.logsumexp(logits, dim=-1)


def token_logprobs(model, h: Tensor, ids: Tensor, chunk: int = 0) -> Tensor:
    """``log softmax(lm_head(h))[ids]`` -> ``[N]`` float32, for states ``h`` ``[N, d]`` and ids ``[N]``.

    With ``chunk > 0`` and ``N > chunk`` the ``[N, V]`` logits never exist at once: each chunk of
    rows is computed under activation checkpointing (recomputed in backward), so peak memory is
    ``O(chunk * V)``."""
    return _by_chunks(_logprob_chunk, model, h, ids, chunk)


def _logprobs_at_chunk(h: Tensor, w: Tensor, b: Tensor | None, ids: Tensor, cap: float | None) -> Tensor:
    logits = _head_logits(h, w, b, cap)
    return logits.gather(-1, ids) - torch.logsumexp(logits, dim=-1, keepdim=True)


def logprobs_at(model, h: Tensor, ids: Tensor, chunk: int = 0) -> Tensor:
    """Full-vocabulary log-probs at given ids: ``logits[ids] - logsumexp(logits)`` -> ``[N, K]`` float32
    for ``h`` ``[N, d]`` and ``ids`` ``[N, K]`` (TrOPD: the sampled token and the teacher's top-k in one
    pass). Chunked and checkpointed like :func:`token_logprobs`: no ``[N, V]`` log-softmax is kept."""
    return _by_chunks(_logprobs_at_chunk, model, h, ids, chunk)


def _support_chunk(h: Tensor, w: Tensor, b: Tensor | None, ids: Tensor, cap: float | None) -> Tensor:
    logits = torch.einsum("nd,nkd->nk", h, w[ids])
    if b is not None:
        logits = logits + b[ids]
    return _softcap(logits, cap)


def _full_logprob_chunk(h: Tensor, w: Tensor, b: Tensor | None, ids: Tensor, cap: float | None) -> Tensor:
    logits = _head_logits(h, w, b, cap)
    return torch.log_softmax(logits, dim=-1).gather(-1, ids)


def full_logprobs_at(model, h: Tensor, ids: Tensor, chunk: int = 0) -> Tensor:
    """``log_softmax(lm_head(h))`` gathered at ``ids`` ``[N, K]`` -> ``[N, K]`` float32: the verl-style
    top-k path (full-vocabulary logits and log-softmax), chunked and checkpointed like
    :func:`token_logprobs` so only one chunk's ``[chunk, V]`` logits live at once."""
    return _by_chunks(_full_logprob_chunk, model, h, ids, chunk)


def support_logits(model, h: Tensor, support_ids: Tensor, chunk: int = 0) -> Tensor:
    """Logits at the support ids only: ``h @ W[S].T`` -> ``[N, K]`` for ``h`` ``[N, d]`` and
    ``support_ids`` ``[N, K]``. Enough for a KL renormalised on the support (the full softmax
    normaliser cancels). Chunked and checkpointed like :func:`token_logprobs`, so the gathered
    ``[chunk, K, d]`` rows of ``W`` are the largest temporary."""
    return _by_chunks(_support_chunk, model, h, support_ids, chunk)


@torch.no_grad()
def selected_logprobs(model, h: Tensor, targets: Tensor, *, support: Tensor | None = None, topk: int = 0,
                      logit_elements: int = 1 << 27) -> dict[str, Tensor]:
    """The LM head's log-probs at states ``h`` ``[N, d]``, without gradient, never more than about
    ``logit_elements`` logits at once: ``logprobs`` ``[N]`` of ``targets`` ``[N]`` and, with ``topk``,
    ``topk_ids`` / ``topk_logprobs`` ``[N, topk]`` (the model's own top-k) and ``support_logprobs``
    ``[N, K]`` at ``support`` ``[N, K]`` ids. All float32 (ids int32) on the CPU."""
    w, b, cap = lm_head_params(model)
    step = max(1, logit_elements // int(w.shape[0]))
    names = ["logprobs"] + (["support_logprobs", "topk_ids", "topk_logprobs"] if topk else [])
    outs: dict[str, list[Tensor]] = {n: [] for n in names}
    for a in range(0, int(h.shape[0]), step):
        logits = _head_logits(h[a: a + step], w, b, cap)
        logz = torch.logsumexp(logits, dim=-1, keepdim=True)
        outs["logprobs"].append((logits.gather(1, targets[a: a + step, None]) - logz)[:, 0].cpu())
        if topk:
            vals, top = logits.topk(topk, dim=-1)
            outs["topk_ids"].append(top.to(torch.int32).cpu())
            outs["topk_logprobs"].append((vals - logz).cpu())
            outs["support_logprobs"].append((logits.gather(1, support[a: a + step]) - logz).cpu())
    empty = {"logprobs": (0,), "support_logprobs": (0, topk), "topk_ids": (0, topk), "topk_logprobs": (0, topk)}
    return {n: torch.cat(v) if v else torch.zeros(empty[n], dtype=torch.int32 if n == "topk_ids" else torch.float32)
            for n, v in outs.items()}


@torch.no_grad()
def chunked_entropy(model, h: Tensor, chunk: int = 2048) -> Tensor:
    """Entropy of the student's next-token distribution at states ``h`` ``[N, d]`` -> ``[N]`` float32,
    computed without gradient in chunks of rows (a diagnostic: ``actor/entropy``)."""
    from oprd_cli.losses import entropy_from_logits

    w, b, cap = lm_head_params(model)
    chunk = chunk if chunk > 0 else max(1, h.shape[0])
    out = [entropy_from_logits(_softcap(torch.nn.functional.linear(h[i:i + chunk].detach(), w, b), cap))
           for i in range(0, h.shape[0], chunk)]
    return torch.cat(out) if out else torch.zeros(0, device=h.device)


def autocast_context(device: torch.device, dtype: torch.dtype | None):
    """bf16/fp16 autocast on GPU when asked; a no-op otherwise (CPU runs float32)."""
    if device.type == "cuda" and dtype in (torch.bfloat16, torch.float16):
        return torch.autocast("cuda", dtype=dtype)
    return contextlib.nullcontext()
