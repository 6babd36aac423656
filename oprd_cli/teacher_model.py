"""The teacher loaded for caching and its batched forward.

:class:`TeacherModel` loads a teacher truncated to the deepest requested layer (blocks past it are
dropped, the LM head kept only when log-probs are asked for) and runs padded batches of
:class:`SeqRequest` through the one truncated forward (:mod:`oprd_cli.backbone`): hidden states at
the requested positions and the LM head's log-probs on the response positions only.
:func:`unit_batches` turns a unit of a rollout into those requests, packed by length. Two kinds of
positions, kept apart: the hidden state of response token ``y_t`` is the one at sequence index
``Lp + t``; its log-prob comes from the output at ``Lp - 1 + t`` (the position that predicts it).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from oprd_cli import backbone, models
from oprd_cli.errors import OprdError
from oprd_cli.stores import cache as cache_store
from oprd_cli.stores.rollouts import RolloutArrays


# ------------------------------------------------------------------------ the teacher
@dataclass
class SeqRequest:
    """One sequence to run: ``ids`` (prompt + response, cut after the last needed position),
    the sequence indices whose hidden states are wanted, and, for log-probs, the sequence indices of
    every response position with the sampled ids (and the student's top-k ids)."""

    ids: np.ndarray
    hidden_index: np.ndarray
    logprob_index: np.ndarray | None = None
    targets: np.ndarray | None = None
    support: np.ndarray | None = None


class TeacherModel:
    """A teacher loaded for caching: truncated to the deepest requested layer, LM head only if needed."""

    def __init__(self, name: str, layers: str = "all", need_logits: bool = False, device: str = "auto",
                 dtype: str = "auto", trust_remote_code: bool = False, truncate: bool = True,
                 attn_implementation: str | None = None):
        self.name = str(name)
        self.device = models.resolve_device(device)
        self.dtype = models.resolve_dtype(dtype, self.device)
        self.tokenizer = models.load_tokenizer(self.name, trust_remote_code=trust_remote_code)
        self.tokenizer_digest = models.tokenizer_digest(self.tokenizer)
        model = models.load_model(self.name, torch.device("cpu"), self.dtype, trust_remote_code=trust_remote_code,
                                  attn_implementation=attn_implementation
                                  or models.choose_attn_implementation(self.device, self.dtype))
        self.config = model.config
        self.num_layers = models.num_layers(model.config)
        self.hidden_size = models.hidden_size(model.config)
        self.layers_spec = str(layers)
        self.layers = models.select_layers(layers, self.num_layers)
        self.depth = max(self.layers)
        self.need_logits = bool(need_logits)
        self.config_digest = models.config_digest(model.config)
        self.weights_digest = models.weights_digest(model)
        self.full = self.need_logits or self.depth == self.num_layers or not truncate
        if not self.full:
            backbone.truncate_blocks(model, self.depth)
        lm_head = model.get_output_embeddings() if self.need_logits else None
        if self.need_logits and lm_head is None:
            raise OprdError(f"teacher {self.name} has no LM head; it cannot give log-probs (use --logprobs none)")
        backbone.decoder_of(model)[0].to(self.device).eval()
        if lm_head is not None:
            lm_head.to(self.device).eval()
        self.model = model
        pad = self.tokenizer.pad_token_id
        self.pad_id = int(pad) if pad is not None else 0

    def describe(self) -> dict[str, Any]:
        local = Path(os.path.expanduser(self.name))
        return {
            "name": self.name, "path": str(local.resolve()) if local.is_dir() else None,
            "config_digest": self.config_digest, "weights_digest": self.weights_digest,
            "num_layers": self.num_layers, "hidden_size": self.hidden_size, "dtype": cache_store.dtype_name(self.dtype),
            "model_type": getattr(self.config, "model_type", None), "device": str(self.device),
            "blocks_run": self.num_layers if self.full else self.depth, "lm_head": self.need_logits,
        }

    @torch.no_grad()
    def run(self, reqs: list[SeqRequest], logprobs: str = "none", topk: int = 0,
            logit_elements: int = 1 << 27) -> list[dict[str, Any]]:
        """Run one padded batch. Per request: ``hidden`` [n, n_layers, d] (CPU, model dtype) and, with
        log-probs, ``teacher_logprobs`` [T] (+ ``support_logprobs``, ``teacher_topk_ids``,
        ``teacher_topk_logprobs`` [T, K] for ``topk``) as numpy arrays."""
        dev = self.device
        B = len(reqs)
        S = max(len(r.ids) for r in reqs)
        ids = torch.full((B, S), self.pad_id, dtype=torch.long)
        for i, r in enumerate(reqs):
            ids[i, : len(r.ids)] = torch.from_numpy(np.asarray(r.ids, dtype=np.int64))
        ids = ids.to(dev)
        counts = [len(r.hidden_index) for r in reqs]
        bi = torch.repeat_interleave(torch.arange(B), torch.tensor(counts)).to(dev)
        si = torch.from_numpy(np.concatenate([np.asarray(r.hidden_index, dtype=np.int64) for r in reqs])).to(dev)
        out = backbone.backbone_hidden(self.model, ids, self.layers, need_final=self.full,
                                       num_layers=self.num_layers, rows=(bi, si))
        caps, final = out.hidden, out.final
        hidden = torch.stack([caps[i] for i in self.layers], dim=1).to("cpu")
        results: list[dict[str, Any]] = [{} for _ in reqs]
        for i, part in enumerate(torch.split(hidden, counts)):
            results[i]["hidden"] = part
        if logprobs != "none":
            self._logprobs(final, reqs, logprobs, topk, results, logit_elements)
        return results

    def _logprobs(self, final, reqs, mode, topk, results, logit_elements):
        dev = self.device
        lens = [len(r.logprob_index) for r in reqs]
        lbi = torch.repeat_interleave(torch.arange(len(reqs)), torch.tensor(lens)).to(dev)
        lsi = torch.from_numpy(np.concatenate([np.asarray(r.logprob_index, dtype=np.int64) for r in reqs])).to(dev)
        tgt = torch.from_numpy(np.concatenate([np.asarray(r.targets, dtype=np.int64) for r in reqs])).to(dev)
        k = topk if mode == "topk" else 0
        sup = None
        if k:
            sup = torch.from_numpy(np.concatenate([np.asarray(r.support, dtype=np.int64).reshape(-1, k)
                                                   for r in reqs])).to(dev)
        got = backbone.selected_logprobs(self.model, final[lbi, lsi], tgt, support=sup, topk=k,
                                         logit_elements=logit_elements)
        for name, key in (("teacher_logprobs", "logprobs"), ("support_logprobs", "support_logprobs"),
                          ("teacher_topk_ids", "topk_ids"), ("teacher_topk_logprobs", "topk_logprobs")):
            if key in got:
                for i, part in enumerate(torch.split(got[key], lens)):
                    results[i][name] = part.numpy()


# ------------------------------------------------------------------------ requests and batches
def _request(data: RolloutArrays, layout: cache_store.Layout, row: int, logprobs: str,
             support_k: int = 0) -> SeqRequest | None:
    lp = len(data.prompt_ids[row])
    length = int(layout.response_length[row])
    t0, n = int(layout.position_start[row]), int(layout.num_positions[row])
    need = 0  # tokens of prompt + response the forward must see
    if n:
        need = lp + t0 + n  # hidden state of response token t: sequence index lp + t
    if logprobs != "none" and length:
        need = max(need, lp + length - 1)  # log-prob of token t: output at sequence index lp - 1 + t
        if lp < 1:
            raise OprdError(f"sample {row} of {data.path} has an empty prompt; the teacher needs at least "
                            "one prompt token to predict the first response token")
    if need == 0:
        return None
    ids = np.concatenate([data.prompt_ids[row], data.response_ids[row]])[:need]
    req = SeqRequest(ids=ids, hidden_index=np.arange(lp + t0, lp + t0 + n, dtype=np.int64))
    if logprobs != "none":
        req.logprob_index = np.arange(lp - 1, lp - 1 + length, dtype=np.int64)
        req.targets = data.response_ids[row]
        req.support = data.topk_ids[row][:, :support_k] if support_k else None
    return req


def unit_batches(data: RolloutArrays, layout: cache_store.Layout, unit: cache_store.Unit, logprobs: str,
                 max_batch_tokens: int, support_k: int = 0) -> list[list[tuple[int, SeqRequest]]]:
    """The padded batches of one unit: ``(row, request)`` pairs packed by length within the budget
    (rows that need no forward are left out). Batches never cross units."""
    reqs = [(row, q) for row in unit.rows if (q := _request(data, layout, row, logprobs, support_k)) is not None]
    return [[reqs[i] for i in group] for group in backbone.pack_by_length([len(q.ids) for _, q in reqs],
                                                                         max_batch_tokens)]
