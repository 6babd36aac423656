"""Cross-tokenizer alignment: pairing student and teacher response positions by the character
offsets of the response text, and computing those offsets for sampled (non-canonical) ids."""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence

import torch
from torch import Tensor

from oprd_cli.errors import OprdError

__all__ = ["Offsets", "align_by_char_offsets", "align_response_positions", "encode_with_offsets", "offsets_for_ids"]

Offsets = Sequence[tuple[int, int]]


def _completing_ends(offsets: Offsets) -> dict[int, int]:
    """``{end offset: token index}`` for the tokens after which the text up to ``end`` is read whole.

    A token completes its end offset when its span is non-empty and no later non-empty token
    starts before that end. That excludes (a) special tokens and other empty spans, (b) a token
    that stops inside a character: fast byte-level tokenizers give every piece of a split
    multi-byte character the character's whole span, so the next piece starts before the end.
    """
    out: dict[int, int] = {}
    min_later_start = math.inf
    for i in range(len(offsets) - 1, -1, -1):
        start, end = int(offsets[i][0]), int(offsets[i][1])
        if end <= start:
            continue
        if min_later_start >= end and end not in out:
            out[end] = i
        min_later_start = min(min_later_start, start)
    return out


def align_by_char_offsets(student_offsets: Offsets, teacher_offsets: Offsets) -> Tensor:
    """Teacher token index for each student token of the same text, or -1: ``[n_student]`` int64.

    Offsets are ``(start, end)`` character spans of each token in the response text (as a fast
    tokenizer's ``return_offsets_mapping`` gives them). Student token ``i`` is paired with teacher
    token ``j`` when both *complete* the same end offset (see :func:`_completing_ends`): after
    either token, exactly ``text[:end]`` has been read. Every other student token gets -1 and is
    masked, never guessed: special tokens, pieces of a split multi-byte character, and tokens whose
    end falls inside a teacher token (the teacher merges what the student splits).

    The paired tokens' hidden states have read the same text, so this is also the pairing of
    response positions (oprd's convention: position ``t`` is the state at sequence index
    ``Lp + t``, which has read ``y_t``); :func:`align_response_positions` applies it to positions.
    """
    teacher_end = _completing_ends(teacher_offsets)
    student_end = _completing_ends(student_offsets)
    out = torch.full((len(student_offsets),), -1, dtype=torch.int64)
    for end, i in student_end.items():
        j = teacher_end.get(end)
        if j is not None:
            out[i] = j
    return out


def align_response_positions(student_offsets: Offsets, teacher_offsets: Offsets,
                             n_student_positions: int | None = None,
                             n_teacher_positions: int | None = None) -> Tensor:
    """Teacher response position for each student response position, or -1: ``[n_student_positions]``.

    Response position ``t`` is the hidden state at sequence index ``Lp + t`` (``Lp`` prompt
    tokens): the state that has read the prompt and ``y_0 .. y_t`` and predicts ``y_{t+1}`` (the
    release's ``hidden_states[l][:, -T:]``, METHOD.md "Which hidden state is position t"; the last
    prompt token's state is not a response position). Student position ``t`` therefore pairs with
    teacher position ``j`` exactly when student token ``t`` and teacher token ``j`` end on the same
    character (:func:`align_by_char_offsets`): both states have read ``text[:end]``. Positions
    without such a partner (special tokens, pieces of a split character, student tokens ending
    inside a teacher token) get -1, as do pairs whose teacher position is ``>= n_teacher_positions``
    (default: the teacher's token count, e.g. smaller when the teacher's response was truncated)
    and student positions ``>= len(student_offsets)``. ``n_student_positions`` (the length of the
    result) defaults to the student's token count.
    """
    n_s = len(student_offsets) if n_student_positions is None else int(n_student_positions)
    n_t = len(teacher_offsets) if n_teacher_positions is None else int(n_teacher_positions)
    tokens = align_by_char_offsets(student_offsets, teacher_offsets)
    out = torch.full((n_s,), -1, dtype=torch.int64)
    k = min(n_s, len(tokens))
    paired = tokens[:k]
    out[:k] = torch.where(paired < n_t, paired, torch.full_like(paired, -1))
    return out


def _require_fast(tokenizer) -> None:
    if not getattr(tokenizer, "is_fast", False):
        raise OprdError(f"cross-tokenizer bridging needs a fast tokenizer (character offsets); "
                        f"{getattr(tokenizer, 'name_or_path', type(tokenizer).__name__)} is not one")


def encode_with_offsets(tokenizer, text: str) -> tuple[list[int], list[tuple[int, int]]]:
    """``(ids, offsets)`` of ``text`` under a fast tokenizer, without special tokens: how the teacher
    reads a response's text (its template adds the prompt around it).

    For a byte-level BPE the offsets are recomputed from the tokens' bytes
    (:func:`offsets_for_ids`), because a ``trim_offsets`` post-processor would move the end of a
    token with trailing whitespace before the whitespace the token has read; elsewhere they are the
    tokenizer's ``offset_mapping``."""
    _require_fast(tokenizer)
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids = list(enc["input_ids"])
    offsets = _byte_level_offsets(tokenizer, ids, text) if _is_byte_level(tokenizer) else None
    if offsets is None:
        offsets = [(int(a), int(b)) for a, b in enc["offset_mapping"]]
    return ids, offsets


@functools.lru_cache(maxsize=1)
def _unicode_to_bytes() -> dict[str, int]:
    """Inverse of GPT-2's byte -> printable character table (byte-level BPE vocabularies are
    written in those characters)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(bs, cs)}


def _is_byte_level(tokenizer) -> bool:
    """True when the fast tokenizer decodes with a ByteLevel decoder (GPT-2 style vocabulary)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    decoder = getattr(backend, "decoder", None)
    return type(decoder).__name__ == "ByteLevel"


def offsets_for_ids(tokenizer, ids: Sequence[int], text: str) -> list[tuple[int, int]] | None:
    """Character spans in ``text`` of the tokens ``ids`` (the student's sampled response), or None.

    ``text`` is the response as the rollout stored it (``decode(ids, skip_special_tokens=True)``);
    special tokens get an empty span. Sampled ids need not be the tokenizer's own tokenisation of
    the text, so offsets are not simply taken from re-encoding:
      - a byte-level BPE (GPT-2, Qwen, Llama 3 style): each token's bytes from the vocabulary,
        mapped to characters of the UTF-8 text (a piece of a split character gets the whole
        character's span, as the fast tokenizers give it); None unless the bytes decode to ``text``;
      - any other fast tokenizer: the ``offset_mapping`` of ``encode(text)`` when that gives the
        same ids (special tokens aside), else None.
    None means the caller masks the sample: no position is guessed.
    """
    _require_fast(tokenizer)
    ids = [int(i) for i in ids]
    if _is_byte_level(tokenizer):
        return _byte_level_offsets(tokenizer, ids, text)
    special = set(getattr(tokenizer, "all_special_ids", []) or [])
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    if list(enc["input_ids"]) != [i for i in ids if i not in special]:
        return None
    out, k, pos = [], 0, 0
    for i in ids:
        if i in special:
            out.append((pos, pos))
        else:
            a, b = enc["offset_mapping"][k]
            out.append((int(a), int(b)))
            pos = int(b)
            k += 1
    return out


def _byte_level_offsets(tokenizer, ids: Sequence[int], text: str) -> list[tuple[int, int]] | None:
    """Offsets of byte-level BPE tokens in ``text`` from their bytes; None unless they decode to it."""
    special = set(getattr(tokenizer, "all_special_ids", []) or [])
    table = _unicode_to_bytes()
    tokens = tokenizer.convert_ids_to_tokens(list(ids))
    pieces: list[bytes] = []
    for i, tok in zip(ids, tokens):
        if i in special or tok is None:
            pieces.append(b"")
            continue
        try:
            pieces.append(bytes(table[c] for c in tok))
        except KeyError:  # an added (non-special) token written in plain text
            pieces.append(tok.encode("utf-8"))
    try:
        decoded = b"".join(pieces).decode("utf-8")
    except UnicodeDecodeError:
        return None
    if decoded != text:
        return None
    char_of_byte: list[int] = []  # index of the character each byte belongs to
    for ci, ch in enumerate(decoded):
        char_of_byte.extend([ci] * len(ch.encode("utf-8")))
    out, b = [], 0
    for piece in pieces:
        if not piece:
            c = char_of_byte[b] if b < len(char_of_byte) else len(decoded)
            out.append((c, c))
            continue
        out.append((char_of_byte[b], char_of_byte[b + len(piece) - 1] + 1))
        b += len(piece)
    return out
