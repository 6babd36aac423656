"""Loading HF models and tokenizers, devices and dtypes, digests, layer selection.

Models are hub ids or local ``save_pretrained`` folders loaded through
``AutoModelForCausalLM``/``AutoTokenizer``; ``trust_remote_code`` is off unless
asked for.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import torch

from oprd_cli.errors import OprdError

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}


def quiet_transformers() -> None:
    """Keep transformers' own progress bars and advisory warnings off our terminal."""
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def _proc_field(path: str, key: str) -> str | None:
    try:
        for line in Path(path).read_text().splitlines():
            if line.startswith(key):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


def machine_info(device: torch.device | str = "cpu") -> dict:
    """What a measurement ran on (benchmarks and the demo record it next to their figures)."""
    import platform

    device = torch.device(device)
    mem = _proc_field("/proc/meminfo", "MemTotal:")
    out = {"cpu": _proc_field("/proc/cpuinfo", "model name") or platform.processor() or platform.machine(),
           "cpu_cores": os.cpu_count(), "memory_bytes": int(mem.split()[0]) * 1024 if mem else None,
           "torch_threads": torch.get_num_threads(), "torch": torch.__version__, "platform": platform.platform(),
           "device": str(device), "cuda": torch.cuda.is_available()}
    if device.type == "cuda":
        out["gpu"] = torch.cuda.get_device_name(device)
    return out


def resolve_device(device: str = "auto") -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise OprdError(f"unknown device {device!r}; use auto, cpu, cuda or cuda:N") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise OprdError(f"device {device!r} asked for, but this machine has no CUDA GPU; use --device cpu")
    return dev


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """``auto`` is bf16 on GPU and fp32 on CPU."""
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if dtype not in DTYPES:
        raise OprdError(f"unknown dtype {dtype!r}; use auto, {', '.join(DTYPES)}")
    return DTYPES[dtype]


def _load_error(kind: str, name: str, e: Exception) -> OprdError:
    path = Path(os.path.expanduser(str(name)))
    if path.exists():
        if path.is_dir() and not (path / "config.json").exists():
            return OprdError(f"{name} is a folder but not a {kind} saved with save_pretrained (no config.json)")
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        if "custom code" in first:  # transformers refuses model code unless trusted
            return OprdError(f"{kind} {name} needs its own Python code to load; oprd runs it only with "
                             "--trust-remote-code (read that code first)")
        return OprdError(f"could not load {kind} from {name}: {first}")
    looks_local = str(name).startswith((".", "/", "~")) or str(name).count("/") > 1
    if looks_local:
        return OprdError(f"{kind} path {name} does not exist")
    first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    return OprdError(
        f"could not load {kind} {name!r}: not a local folder, and the hub could not provide it "
        f"(no network, a typo, or a gated repo?): {first}"
    )


def load_tokenizer(name: str, trust_remote_code: bool = False):
    """Tokenizer with a pad token (EOS when it has none) and left padding for generation."""
    from transformers import AutoTokenizer

    from oprd_cli.urlpath import local_copy

    quiet_transformers()
    try:
        tok = AutoTokenizer.from_pretrained(local_copy(str(name)), trust_remote_code=trust_remote_code)
    except Exception as e:  # OSError, ValueError, HF hub errors
        raise _load_error("tokenizer", name, e) from None
    if tok.pad_token is None:
        if tok.eos_token is None:
            raise OprdError(f"tokenizer {name} has neither a pad nor an EOS token")
        tok.pad_token = tok.eos_token
    tok.padding_side = "left"
    return tok


CPU_SDPA_MIN_HIDDEN = 512  # generation on CPU: SDPA from this model width up, eager below


def choose_attn_implementation(device: torch.device, dtype: torch.dtype | None = None,
                               training: bool = False, hidden_size: int | None = None) -> str:
    """The attention kernel for a model on ``device``.

    CUDA: ``flash_attention_2`` when the ``flash_attn`` package is installed and the dtype is
    half precision (the kernel has no fp32 path), else ``sdpa``. CPU: ``sdpa`` for training (whole
    sequences: torch's CPU flash kernel keeps attention memory O(T) where eager keeps
    ``[heads, T, T]`` scores, 0.8 GB per tensor at T = 4096 with 12 heads) and for models of width
    ``hidden_size >= 512`` (SmolLM2-135M generation: SDPA about 20% more tokens per CPU-second than
    eager, docs/performance.md); ``eager`` otherwise: tiny models, whose generation SDPA slows down
    (a per-shape set-up cost that dominates at their size), and callers that do not pass the width.
    """
    device = torch.device(device)
    if device.type != "cuda":
        return "sdpa" if training or (hidden_size or 0) >= CPU_SDPA_MIN_HIDDEN else "eager"
    from transformers.utils import is_flash_attn_2_available

    if dtype in (torch.bfloat16, torch.float16) and is_flash_attn_2_available():
        return "flash_attention_2"
    return "sdpa"


def load_model(
    name: str,
    device: torch.device,
    dtype: torch.dtype,
    trust_remote_code: bool = False,
    attn_implementation: str | None = None,
    config_overrides: dict | None = None,
):
    """A causal LM in eval mode on ``device``; attention as :func:`choose_attn_implementation`
    picks it for ``device`` unless ``attn_implementation`` says otherwise."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from oprd_cli.urlpath import local_copy

    quiet_transformers()
    try:
        local = local_copy(str(name))  # a checkpoint on object storage: loaded from a local copy
        config = AutoConfig.from_pretrained(local, trust_remote_code=trust_remote_code)
        for k, v in (config_overrides or {}).items():
            setattr(config, k, v)
        if attn_implementation is None:
            width = getattr(config.get_text_config(), "hidden_size", None)
            attn_implementation = choose_attn_implementation(device, dtype, hidden_size=width)
        kwargs = {"config": config, "dtype": dtype, "trust_remote_code": trust_remote_code}
        if attn_implementation:
            kwargs["attn_implementation"] = attn_implementation
        model = AutoModelForCausalLM.from_pretrained(local, **kwargs)
    except OprdError:
        raise
    except Exception as e:
        raise _load_error("model", name, e) from None
    model.to(device)
    model.eval()
    return model


def num_layers(config) -> int:
    cfg = getattr(config, "text_config", None) or config
    return int(cfg.num_hidden_layers)


def hidden_size(config) -> int:
    cfg = getattr(config, "text_config", None) or config
    return int(cfg.hidden_size)


def context_length(model, tokenizer=None) -> int | None:
    cfg = getattr(model.config, "text_config", None) or model.config
    n = getattr(cfg, "max_position_embeddings", None)
    return int(n) if n else None


# ---------------------------------------------------------------------- digests
def tokenizer_digest(tok) -> str:
    """Identity of a tokenizer's token<->id mapping (vocabulary, merges, special tokens).

    Two tokenizers with equal digests tokenize text into the same ids, which is what
    sharing rollouts between a student and a teacher requires. Chat templates and
    padding settings are deliberately not part of it.
    """
    h = hashlib.sha256()
    h.update(json.dumps(sorted(tok.get_vocab().items()), ensure_ascii=False).encode())
    backend = getattr(tok, "backend_tokenizer", None)
    if backend is not None:
        model = json.loads(backend.to_str()).get("model", {})
        h.update(json.dumps(model.get("merges"), ensure_ascii=False).encode())
        h.update(json.dumps(model.get("type")).encode())
    h.update(json.dumps([tok.bos_token_id, tok.eos_token_id]).encode())
    return "sha256:" + h.hexdigest()[:32]


WEIGHTS_DIGEST_DTYPE = torch.bfloat16  # the one precision floating weights are compared in


def sample_indices(numel: int, samples: int) -> torch.Tensor:
    """``samples`` evenly spaced int64 indices into ``numel`` elements, first and last included.

    Integer arithmetic: a float32 ``linspace`` cannot address tensors over 2**24 elements (its
    last index rounds up past the end, the IndexError every real LLM embedding hit).
    """
    if numel <= samples:
        return torch.arange(numel, dtype=torch.int64)
    return torch.arange(samples, dtype=torch.int64) * (numel - 1) // (samples - 1)


@torch.no_grad()
def weights_digest(model, samples_per_tensor: int = 4096) -> str:
    """A fast fingerprint of a policy's weights, independent of the dtype it runs in.

    Hashes every tensor's name and shape and up to ``samples_per_tensor`` evenly spaced values
    (integer indices). Floating values are first rounded to bfloat16 and hashed as bf16 bit
    patterns, and the dtype itself is not hashed, so fp32 master weights and the bf16 (or fp32)
    copy a rollout runs in give one digest: a rollout made in bf16 from the trainer's current fp32
    weights is on-policy. It changes whenever training changes the weights (an AdamW step of 1e-5 moves
    several percent of the thousands of sampled values across a bf16 rounding step) and costs about
    0.1 s for a 135M model of 273 tensors on 2 CPU cores (it never reads whole tensors).
    """
    h = hashlib.sha256()
    h.update(b"weights-digest-v2|")
    for name, t in sorted(model.state_dict().items()):
        h.update(f"{name}|{tuple(t.shape)}|".encode())
        flat = t.detach().reshape(-1)
        if flat.numel() > samples_per_tensor:
            # index_select: 1000x faster than advanced indexing on CPU for a few thousand of 28M values
            flat = flat.index_select(0, sample_indices(flat.numel(), samples_per_tensor).to(flat.device))
        if flat.is_floating_point():
            flat = flat.to(WEIGHTS_DIGEST_DTYPE)
            h.update(b"f|")
        else:
            h.update(f"{flat.dtype}|".encode())
        flat = flat.cpu().contiguous()
        h.update(flat.view(torch.uint8).numpy().tobytes() if flat.dtype != torch.bool else flat.numpy().tobytes())
    return "sha256:" + h.hexdigest()[:32]


def config_digest(config) -> str:
    d = config.to_dict()
    for k in ("_name_or_path", "transformers_version", "torch_dtype", "dtype", "_commit_hash"):
        d.pop(k, None)
    return "sha256:" + hashlib.sha256(json.dumps(d, sort_keys=True, default=str).encode()).hexdigest()[:32]


# --------------------------------------------------------------- layer selection
LAYER_MODES = ("last", "all", "even", "odd")


def select_layers(spec: str, n_layers: int) -> list[int]:
    """HF ``hidden_states`` indices for a layer spec.

    ``hidden_states[0]`` is the embedding output and ``1..L`` are the block outputs.
    As in the authors' release: ``last`` = [L]; ``all`` = 1..L; ``even`` = the blocks with an even
    0-based index (HF indices 1, 3, 5, ...); ``odd`` = the blocks with an odd 0-based index (HF
    indices 2, 4, 6, ...); or an explicit comma-separated list such as ``"4,8,12"`` (0..L allowed).
    """
    spec = str(spec).strip()
    if spec == "last":
        return [n_layers]
    if spec == "all":
        return list(range(1, n_layers + 1))
    if spec == "even":  # 0-based blocks 0, 2, 4, ... = hidden_states 1, 3, 5, ...
        return list(range(1, n_layers + 1, 2))
    if spec == "odd":  # 0-based blocks 1, 3, 5, ... = hidden_states 2, 4, 6, ...
        return list(range(2, n_layers + 1, 2))
    try:
        layers = [int(x) for x in spec.replace(" ", "").split(",") if x != ""]
    except ValueError:
        raise OprdError(
            f"--layers {spec!r} is neither one of {', '.join(LAYER_MODES)} nor a comma-separated list of "
            "hidden_states indices"
        ) from None
    if not layers:
        raise OprdError("--layers is empty")
    bad = [i for i in layers if i < 0 or i > n_layers]
    if bad:
        raise OprdError(
            f"--layers {spec} asks for hidden_states index {bad[0]}, but the model has {n_layers} layers "
            f"(valid indices 0..{n_layers}; 0 is the embedding output)"
        )
    if len(set(layers)) != len(layers):
        raise OprdError(f"--layers {spec} repeats a layer")
    return sorted(layers)
