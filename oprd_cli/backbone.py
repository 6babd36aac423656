"""The student's forward pass for training: backbone hidden states, and logits only where needed.

Hidden-state indexing follows HF ``output_hidden_states=True`` of the full causal LM, which is what
the teacher cache stores (checked in the tests for equality):

- ``hidden_states[0]``: the input of the first decoder block (the embedding output);
- ``hidden_states[l]`` for ``1 <= l < L``: the output of block ``l`` (before any norm);
- ``hidden_states[L]``: the decoder's ``last_hidden_state``, i.e. AFTER the final norm (transformers 5
  ties the last entry to ``last_hidden_state``; the raw output of block ``L`` is never exposed).

:func:`backbone_hidden` calls the decoder (``model.get_decoder()``, without the LM head), captures the
requested entries with forward hooks and stops after the deepest block it needs, so a cache of the
first layers costs only those layers. The LM head is applied by the helpers below to gathered
positions only: :func:`token_logprobs` (log-probs of given ids, chunked), :func:`support_logits`
(``h @ W[S].T``, chunked and recomputed in backward) and :func:`chunked_entropy` (no grad).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from oprd_cli.errors import OprdError


class _StopForward(Exception):
    """Raised by a hook after the deepest needed block: the rest of the decoder never runs."""


@dataclass
class BackboneOutput:
    hidden: dict[int, Tensor]  # hidden_states index -> [B, S, d]
    final: Tensor | None  # [B, S, d] post-final-norm states (hidden_states[L]) when asked for


def decoder_of(model):
    """The decoder stack (``model.model`` for HF causal LMs) and its list of blocks."""
    get = getattr(model, "get_decoder", None)
    decoder = get() if callable(get) else getattr(model, "model", None)
    layers = getattr(decoder, "layers", None)
    if decoder is None or layers is None:
        raise OprdError(f"{type(model).__name__} has no decoder with a .layers list; oprd train cannot run it")
    return decoder, layers


def _first_tensor(x):
    return x[0] if isinstance(x, (tuple, list)) else x


def backbone_hidden(model, input_ids: Tensor, layers: list[int], need_final: bool = False) -> BackboneOutput:
    """Run the student's decoder on ``input_ids`` ``[B, S]`` (right-padded; no attention mask is
    needed because causal attention never lets a valid position see the padding after it) and
    return ``hidden_states[l]`` for every ``l`` in ``layers`` (HF indexing, see the module doc) and,
    when ``need_final``, the post-norm final states that the LM head consumes.

    Only as many blocks run as the deepest requested index needs; the LM head never runs here.
    """
    decoder, blocks = decoder_of(model)
    n_layers = len(blocks)
    wanted = sorted(set(int(i) for i in layers))
    if wanted and (wanted[0] < 0 or wanted[-1] > n_layers):
        raise OprdError(f"hidden_states index {wanted[-1] if wanted[-1] > n_layers else wanted[0]} is out of range "
                        f"for a model with {n_layers} layers (0..{n_layers})")
    run_all = need_final or (n_layers in wanted)
    deepest_block = n_layers if run_all else (max(wanted) if wanted else 0)

    captured: dict[int, Tensor] = {}
    active = [True]  # hooks fire again when gradient checkpointing recomputes a block: ignore those
    handles = []

    def make_hook(block_idx: int):
        def hook(module, args, kwargs, output):
            if not active[0]:
                return None
            if block_idx == 0 and 0 in wanted:
                h0 = args[0] if args else kwargs.get("hidden_states")
                captured[0] = h0
            idx = block_idx + 1  # output of block i is hidden_states[i + 1]
            if idx in wanted and idx < n_layers:
                captured[idx] = _first_tensor(output)
            if not run_all and idx >= deepest_block:
                raise _StopForward
            return None

        return hook

    try:
        for i, block in enumerate(blocks):
            if i < max(deepest_block, 1):
                handles.append(block.register_forward_hook(make_hook(i), with_kwargs=True))
        final = None
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
        captured[n_layers] = final
    missing = [i for i in wanted if i not in captured]
    if missing:  # pragma: no cover - an architecture whose blocks do not see the hidden states as args[0]
        raise OprdError(f"could not capture hidden_states {missing} of {type(model).__name__}")
    return BackboneOutput(hidden=captured, final=final if need_final else None)


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


def _logprob_chunk(h: Tensor, w: Tensor, b: Tensor | None, ids: Tensor, cap: float | None) -> Tensor:
    logits = _softcap(torch.nn.functional.linear(h, w, b), cap).float()
    return logits.gather(-1, ids[:, None])[:, 0] - torch.logsumexp(logits, dim=-1)


def token_logprobs(model, h: Tensor, ids: Tensor, chunk: int = 0) -> Tensor:
    """``log softmax(lm_head(h))[ids]`` -> ``[N]`` float32, for states ``h`` ``[N, d]`` and ids ``[N]``.

    With ``chunk > 0`` and ``N > chunk`` the ``[N, V]`` logits never exist at once: each chunk of
    rows is computed under activation checkpointing (recomputed in backward), so peak memory is
    ``O(chunk * V)``."""
    return _by_chunks(_logprob_chunk, model, h, ids, chunk)


def _support_chunk(h: Tensor, w: Tensor, b: Tensor | None, ids: Tensor, cap: float | None) -> Tensor:
    logits = torch.einsum("nd,nkd->nk", h, w[ids])
    if b is not None:
        logits = logits + b[ids]
    return _softcap(logits, cap)


def support_logits(model, h: Tensor, support_ids: Tensor, chunk: int = 0) -> Tensor:
    """Logits at the support ids only: ``h @ W[S].T`` -> ``[N, K]`` for ``h`` ``[N, d]`` and
    ``support_ids`` ``[N, K]``. Enough for a KL renormalised on the support (the full softmax
    normaliser cancels). Chunked and checkpointed like :func:`token_logprobs`, so the gathered
    ``[chunk, K, d]`` rows of ``W`` are the largest temporary."""
    return _by_chunks(_support_chunk, model, h, support_ids, chunk)


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
