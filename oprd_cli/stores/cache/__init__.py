"""The teacher-cache store: teacher hidden states (and optionally log-probs) for one rollout store.

Format owner: every command reads and writes a cache through this module.

Layout (Zarr v3 group)::

    attrs["oprd"]          kind="teacher_cache", format_version, created_at, rollout{path, store_id,
                           content_digest, ...}, tokenizer_digest, teacher{name, config_digest,
                           weights_digest, num_layers, hidden_size, dtype, ...}, layers, hidden_size,
                           positions{mode, k}, logprobs{mode, k, support_k}, encoding{...},
                           compression{compressor, level}, layout{...}, num_samples, num_positions,
                           num_tokens; after completion also content_digest, stored_bytes, raw_bytes,
                           compression_ratio, bytes_per_value, encoding.cosine
    hidden                 [H, n_layers, d]  hidden states of the stored positions, flat over samples;
                           dtype float32 / float16 / uint16 (= the bit pattern of bfloat16, see
                           ``encoding``); sharded: one shard = ``layout.hidden_shard_rows`` rows,
                           inner chunks of ``layout.hidden_chunk_rows`` rows
    token/teacher_logprobs       float32 [R]     log q(y_t) of every response token ("sampled", "topk")
    token/support_logprobs       float32 [R, K]  teacher log-probs at the rollout's student top-K ids ("topk")
    token/teacher_topk_ids       int32   [R, K]  the teacher's own top-K ids ("topk")
    token/teacher_topk_logprobs  float32 [R, K]  and their log-probs ("topk")
    sample/hidden_offset   int64 [N]   first row of sample i in ``hidden``
    sample/num_positions   int32 [N]   number of stored hidden positions of sample i
    sample/position_start  int32 [N]   response position t of its first stored row (rows are t0, t0+1, ...)
    sample/token_offset    int64 [N]   first row of sample i in ``token/*``
    sample/response_length int32 [N]   T of sample i (== the rollout's)
    sample/prompt_length   int32 [N]
    unit/sample_start      int64 [U+1] samples [s_u, s_{u+1}) form unit u
    unit/hidden_start, unit/hidden_rows, unit/token_start, unit/token_rows   int64 [U]
    units/u00000000.json   per-unit done marker: written after the unit's data, holds the per-sample digests
    oprd_layout.json       written once every array above exists (creation is finished)
    oprd_complete.json     completion marker (the last write; atomic)

Positions (format version 2). Response token ``y_t`` of a sample whose prompt has ``Lp`` tokens sits
at sequence index ``Lp + t``. Its stored hidden state is the one at that same index (the state that
has read ``y_t`` and predicts ``y_{t+1}``; the release's ``hidden_states[l][:, -T:]``); the last
prompt token's state is never stored. Log-probs are another position: the distribution over ``y_t``
comes from the output at ``Lp - 1 + t``, so ``teacher_logprobs[t] = log_softmax(logits[Lp - 1 + t])[y_t]``.
Every stored position range is contiguous: ``all`` = [0, T), ``last`` = [T-1] (the final valid
token), ``first_k`` = [0, min(k, T)), ``last_k`` = [T - min(k, T), T). Version 1 stored the state at
``Lp - 1 + t``; such a cache is refused with a one-line message.

Units. Samples are grouped, in order, into *units* of whole samples. A unit owns a region of
``hidden`` (and of ``token/*``) that starts on a shard boundary and spans whole shards, so a worker
always writes whole shards and never touches another unit's files; rows between the end of a unit's
data and the next shard boundary are never read and hold zeros (empty inner chunks are not even
stored). A unit is done once its marker ``units/uNNNNNNNN.json`` exists; the marker is written after
the data, so a killed worker leaves at worst a unit without marker, which the next worker recomputes.
Several workers (``--shard I/N``) fill disjoint units of one store; whoever finds every unit done
writes the completion marker. Nothing relies on renames except the local-disk JSON writes
(object stores get single PUTs), so a cache can live on fsspec object storage.

Digests. Each sample's digest covers its stored bytes (hidden rows in their stored encoding, its
position range and its per-token arrays); ``content_digest`` is a sha256 over the value-defining
metadata (layers, positions, log-prob mode, encoding, source rollout digest) and the ordered sample
digests. It is therefore independent of units, sharding, compression, chunking and restarts.

Modules: ``format`` (version, modes, value encoding, codecs, digests), ``layout`` (units and shards),
``writer`` (create/join/resume, units and markers, completion), ``reader`` (the read-only view).
"""

from oprd_cli.stores.cache.format import (  # noqa: F401
    DEFAULT_COMPRESSOR, DEFAULT_LEVEL, FORMAT, HIDDEN, LOGPROB_MODES, POSITION_MODES, STORE_DTYPES, TOKEN_ARRAYS, VALID,
    CosineStats, Encoding, dtype_name, hidden_codecs, position_range, round_mantissa, token_arrays_for,
)
from oprd_cli.stores.cache.layout import Layout, Unit, plan_layout  # noqa: F401
from oprd_cli.stores.cache.reader import CacheBatch, TeacherCache, open_cache  # noqa: F401
from oprd_cli.stores.cache.writer import BackgroundWriter, CacheWriter, read_unit_markers  # noqa: F401
