"""The demo's assets: task files, a tokenizer, a teacher and a student start, cached on disk.

``build_assets(root, seed, quick)`` makes (or reuses) ``root/<key>/``::

    demo_assets.json     manifest: spec, steps, accuracies, timings (written last)
    data/{train,val,eval,prompts}.jsonl
    tokenizer/           byte-level BPE trained on task text (eos <|im_end|>, pad <|endoftext|>)
    teacher/             save_pretrained folder (model + tokenizer): the SFT model after all steps
    student/             save_pretrained folder: an early checkpoint of the same SFT run
    bridge_teacher/      a teacher of another width and depth (``DemoSpec.bridge_model``), SFT'd the
                         same way, for OPRD-Bridge

One tiny Qwen2 model is fine-tuned on the reference solutions (loss on response tokens
only, prompts rendered by :func:`oprd_cli.data.render_prompt` with the demo template so
that SFT sees exactly what rollouts will see). The student start is the first
checkpoint whose validation accuracy (sampling at temperature 1.0, the rollout
temperature) reaches ``SftConfig.student_min_acc``; the teacher is the final model,
the same pairing as the paper's (a model and its further-trained descendant). The
held-out ``eval`` split plays no part in any of this.

``key`` hashes the whole spec, the seed and :data:`ASSETS_VERSION`, so a second call
reuses the folder. The build happens in a temporary sibling folder that is renamed
into place at the very end, so an interrupted build is never taken for a finished one.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import os
import shutil
import time
import uuid
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from oprd_cli.config import TemplateConfig
from oprd_cli.demo.task import (
    SplitSizes,
    TaskConfig,
    demo_template,
    generate_splits,
    is_correct,
    solution_text,
    write_splits,
)
from oprd_cli.errors import OprdError
from oprd_cli.io import write_json

# Bump when a change to this module or to the task changes what gets built.
ASSETS_VERSION = 3
MANIFEST = "demo_assets.json"
TEMPERATURES = {"t1.0": 1.0, "t0.7": 0.7, "greedy": 0.0}


# --------------------------------------------------------------------- specs
@dataclass(frozen=True)
class ModelDims:
    arch: str = "qwen2"
    hidden_size: int = 64
    num_layers: int = 2
    num_heads: int = 4
    num_kv_heads: int = 2
    intermediate_size: int = 256
    max_position_embeddings: int = 128


@dataclass(frozen=True)
class SftConfig:
    """Supervised fine-tuning of the teacher, and the rule that picks the student start.

    The student is the first checkpoint, among those validated every ``eval_every``
    steps from ``eval_start`` on, whose validation accuracy at temperature 1.0
    (``val_samples`` samples per validation problem) is at least ``student_min_acc``.
    When none qualifies before the end, it is the checkpoint at ``fallback_fraction``
    of the steps.
    """

    steps: int = 400
    batch_size: int = 64
    lr: float = 2e-3
    warmup: int = 30
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    eval_every: int = 25
    eval_start: int = 100
    student_min_acc: float = 0.15
    val_samples: int = 1
    fallback_fraction: float = 0.5


@dataclass(frozen=True)
class DemoSpec:
    task: TaskConfig = field(default_factory=TaskConfig)
    sizes: SplitSizes = field(default_factory=SplitSizes)
    model: ModelDims = field(default_factory=ModelDims)
    sft: SftConfig = field(default_factory=SftConfig)
    # The OPRD-Bridge teacher: another width and depth, the same tokenizer, SFT'd on the same data
    # with ``sft`` (``bridge_steps`` steps; no student is picked from its run).
    bridge_model: ModelDims = field(default_factory=lambda: ModelDims(hidden_size=96, num_layers=3,
                                                                      intermediate_size=384))
    bridge_steps: int = 250
    vocab_size: int = 300
    tokenizer_texts: int = 2000
    report_samples: int = 4  # samples per validation problem for the reported accuracies

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def demo_spec(quick: bool) -> DemoSpec:
    """The two built-in configurations (``oprd demo --quick`` and the default)."""
    if quick:
        return DemoSpec(
            task=TaskConfig(min_steps=3, max_steps=3, max_operand=9, max_value=19),
            sizes=SplitSizes(eval=128, val=128, prompts=256, train=10000),
            sft=SftConfig(steps=250, batch_size=32, lr=3e-3, warmup=20, eval_every=20, eval_start=60),
            bridge_steps=150,
        )
    return DemoSpec()


# ------------------------------------------------------------------- result
@dataclass(frozen=True)
class DemoAssets:
    """Paths of the built assets and what was measured while building them.

    ``accuracy[model][setting]`` is validation accuracy (the ``val`` split, never the
    held-out ``eval`` split) for model in ``teacher``/``student`` and setting in
    ``t1.0``/``t0.7`` (sampling, ``report_samples`` per problem) and ``greedy``.
    """

    dir: Path
    key: str
    seed: int
    quick: bool
    tokenizer: Path
    teacher: Path
    student: Path
    bridge_teacher: Path
    train: Path
    val: Path
    eval: Path
    prompts: Path
    max_new_tokens: int
    teacher_step: int
    student_step: int
    accuracy: dict[str, dict[str, float]]
    curve: list[dict[str, float]]  # validation accuracy (t=1.0) during SFT: {"step", "acc", "loss"}
    build_seconds: float
    reused: bool
    spec: dict[str, Any]

    @property
    def template(self) -> TemplateConfig:
        """The prompt template of every demo stage (SFT used exactly this)."""
        return demo_template()

    @property
    def teacher_accuracy(self) -> float:
        return self.accuracy["teacher"]["t1.0"]

    @property
    def student_accuracy(self) -> float:
        return self.accuracy["student"]["t1.0"]

    @property
    def data(self) -> dict[str, Path]:
        return {"train": self.train, "val": self.val, "eval": self.eval, "prompts": self.prompts}


def assets_key(seed: int, spec: DemoSpec) -> str:
    blob = json.dumps({"version": ASSETS_VERSION, "seed": seed, "spec": spec.to_dict()}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


def assets_name(seed: int, quick: bool, spec: DemoSpec | None = None) -> str:
    """The folder name of a seed's assets under the assets root (known before they are built)."""
    spec = spec or demo_spec(quick)
    return f"{'quick' if quick else 'full'}-s{seed}-{assets_key(seed, spec)}"


# ------------------------------------------------------------------ helpers
@contextmanager
def _torch_threads(n: int | None):
    import torch

    old = torch.get_num_threads()
    if n:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def default_threads() -> int:
    """Threads for the tiny models: more than a few only adds overhead at this size."""
    return max(1, min(4, os.cpu_count() or 1))


def _record(rec: dict, index: int = 0):
    from oprd_cli.data import Record

    return Record(index=index, id=str(rec["id"]), problem=rec["problem"], messages=None, answer=str(rec["answer"]))


def encode_example(rec: dict, tokenizer, template: TemplateConfig) -> tuple[list[int], list[int]]:
    """(prompt ids exactly as ``render_prompt`` makes them, response ids ending with EOS)."""
    from oprd_cli.data import render_prompt

    prompt = render_prompt(_record(rec), tokenizer, template)
    response = tokenizer(solution_text(rec["problem"]), add_special_tokens=False)["input_ids"]
    return prompt, list(response) + [tokenizer.eos_token_id]


def _collate(examples: list[tuple[list[int], list[int]]], pad_id: int):
    """Right-padded input ids, attention mask and labels (-100 outside the responses)."""
    import torch

    width = max(len(p) + len(r) for p, r in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), -100, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    for j, (p, r) in enumerate(examples):
        n = len(p) + len(r)
        ids[j, :n] = torch.tensor(p + r)
        labels[j, len(p):n] = torch.tensor(r)
        mask[j, :n] = 1
    return ids, mask, labels


def sample_accuracy(model, tokenizer, records: list[dict], template: TemplateConfig, temperature: float,
                    num_samples: int = 1, max_new_tokens: int = 48, seed: int = 0, batch_size: int = 256) -> float:
    """Fraction of correct boxed answers when sampling from ``model`` (greedy when temperature is 0).

    A quick check for building the assets; the demo itself evaluates with ``oprd eval``.
    """
    import torch

    from oprd_cli.data import render_prompt

    prompts = [render_prompt(_record(r), tokenizer, template) for r in records for _ in range(num_samples)]
    answers = [str(r["answer"]) for r in records for _ in range(num_samples)]
    pad = tokenizer.pad_token_id
    was_training = model.training
    model.eval()
    correct = 0
    with torch.random.fork_rng(devices=[]), torch.no_grad():
        torch.manual_seed(seed)
        for start in range(0, len(prompts), batch_size):
            chunk = prompts[start:start + batch_size]
            width = max(len(p) for p in chunk)
            ids = torch.full((len(chunk), width), pad, dtype=torch.long)
            mask = torch.zeros_like(ids)
            for j, p in enumerate(chunk):  # left padding
                ids[j, width - len(p):] = torch.tensor(p)
                mask[j, width - len(p):] = 1
            kw: dict[str, Any] = {"do_sample": False}
            if temperature > 0:
                kw = {"do_sample": True, "temperature": float(temperature), "top_k": 0, "top_p": 1.0}
            out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens,
                                 eos_token_id=tokenizer.eos_token_id, pad_token_id=pad, **kw)
            texts = tokenizer.batch_decode(out[:, width:], skip_special_tokens=True)
            correct += sum(is_correct(t, a) for t, a in zip(texts, answers[start:start + batch_size]))
    model.train(was_training)
    return correct / max(1, len(prompts))


def _lr_at(step: int, cfg: SftConfig) -> float:
    """Linear warm-up, then cosine decay to ``min_lr_ratio * lr`` (step counts from 1)."""
    from oprd_cli.train.schedule import cosine_decay

    if step <= cfg.warmup:
        return cfg.lr * step / max(1, cfg.warmup)
    return cfg.lr * cosine_decay((step - cfg.warmup) / max(1, cfg.steps - cfg.warmup), cfg.min_lr_ratio)


def _save(model, tokenizer, out: Path, meta: dict) -> None:
    from oprd_cli.models import quiet_transformers

    quiet_transformers()  # no tqdm "Writing model shards" bar between our rich progress
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    write_json(out / "demo_model.json", meta, sort_keys=False)


def _clean_stale(root: Path, key: str) -> None:
    """Remove leftovers of interrupted builds of this key (their process is gone)."""
    for p in root.glob(f".tmp-{key}-*"):
        try:
            pid = int(p.name.rsplit("-", 2)[1])
        except (IndexError, ValueError):
            continue
        try:
            os.kill(pid, 0)
            alive = pid != os.getpid()
        except ProcessLookupError:
            alive = False
        except PermissionError:
            alive = True
        if not alive:
            shutil.rmtree(p, ignore_errors=True)


def _load_manifest(folder: Path, reused: bool) -> DemoAssets:
    m = json.loads((folder / MANIFEST).read_text())
    paths = {k: folder / v for k, v in m["paths"].items()}
    return DemoAssets(
        dir=folder, key=m["key"], seed=m["seed"], quick=m["quick"], max_new_tokens=m["max_new_tokens"],
        teacher_step=m["teacher_step"], student_step=m["student_step"], accuracy=m["accuracy"], curve=m["curve"],
        build_seconds=m["build_seconds"], reused=reused, spec=m["spec"], **paths,
    )


# -------------------------------------------------------------------- build
def build_assets(root: str | Path, seed: int = 0, quick: bool = False, spec: DemoSpec | None = None,
                 threads: int | None = None, force: bool = False, show_progress: bool = True) -> DemoAssets:
    """Build (or reuse) the demo's task files, tokenizer, teacher and student start under ``root/<key>``.

    ``spec`` overrides the built-in configuration chosen by ``quick`` (tests use a tiny
    one). ``threads`` is the torch CPU thread count while building (default: up to 4,
    restored afterwards). ``force`` rebuilds even when a finished folder exists.
    """
    spec = spec or demo_spec(quick)
    root = Path(root).expanduser()
    key = assets_name(seed, quick, spec)
    final = root / key
    if (final / MANIFEST).exists() and not force:
        return _load_manifest(final, reused=True)
    root.mkdir(parents=True, exist_ok=True)
    _clean_stale(root, key)
    tmp = root / f".tmp-{key}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
    tmp.mkdir()
    try:
        with _torch_threads(threads or default_threads()):
            _build(tmp, key, seed, quick, spec, show_progress)
        if final.exists():
            if not force and (final / MANIFEST).exists():  # a concurrent build finished first
                shutil.rmtree(tmp, ignore_errors=True)
                return _load_manifest(final, reused=True)
            old = root / f".old-{key}-{uuid.uuid4().hex[:6]}"
            final.rename(old)
            shutil.rmtree(old, ignore_errors=True)
        tmp.rename(final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return _load_manifest(final, reused=False)


def _init_model(out: Path, splits, template, spec: DemoSpec, seed: int):
    """The demo tokenizer (trained on the task's text) and a freshly initialised model of ``spec.model``."""
    from oprd_cli.tiny import build_tokenizer

    texts = [r["problem"] + "\n" + template.instruction + solution_text(r["problem"])
             for r in splits["train"][: spec.tokenizer_texts]]
    texts.append("0123456789+-=?\\boxed{}")
    tokenizer = build_tokenizer(texts, out / "tokenizer", vocab_size=spec.vocab_size, chat_template=True)
    tokenizer.padding_side = "left"

    return tokenizer, _new_model(out, tokenizer, spec.model, seed)


def _new_model(out: Path, tokenizer, dims: ModelDims, seed: int):
    """A freshly initialised model of ``dims`` over ``tokenizer`` (eager attention: see below)."""
    from oprd_cli.tiny import build_tiny_model

    model = build_tiny_model(
        out / "init", tokenizer, arch=dims.arch, hidden_size=dims.hidden_size, num_layers=dims.num_layers,
        num_heads=dims.num_heads, num_kv_heads=dims.num_kv_heads, intermediate_size=dims.intermediate_size,
        max_position_embeddings=dims.max_position_embeddings, seed=seed,
    )
    shutil.rmtree(out / "init", ignore_errors=True)
    # On CPU, SDPA pays a large cost for every new sequence shape (10x slower SFT steps and sampling
    # here, measured); every other stage loads models with eager attention on CPU as well.
    model.set_attn_implementation("eager")
    return model


def _max_new_tokens(splits, train, tokenizer, template, dims: ModelDims) -> int:
    """The response length limit: the longest solution of any split, rounded up; checks the context fits."""
    longest_response = max(len(encode_example(r, tokenizer, template)[1])
                           for name in ("eval", "val", "prompts") for r in splits[name])
    longest_response = max(longest_response, max(len(r) for _, r in train))
    longest = max(len(p) + len(r) for p, r in train)
    if longest + 8 > dims.max_position_embeddings:
        raise OprdError(f"demo sequences reach {longest} tokens; raise max_position_embeddings")
    return int(math.ceil((longest_response + 8) / 8) * 8)


def _sft(model, tokenizer, train, val, template, cfg: SftConfig, seed: int, max_new_tokens: int,
         show_progress: bool, label: str = "demo SFT (teacher)") -> tuple[list[dict[str, float]], dict, int]:
    """SFT the teacher; returns the val curve and the student's state and step (the first checkpoint whose
    val accuracy reaches ``cfg.student_min_acc``, else the one at ``cfg.fallback_fraction`` of the steps)."""
    import torch
    from rich.progress import TextColumn

    from oprd_cli.console import progress

    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, betas=(0.9, 0.98), weight_decay=cfg.weight_decay)
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model.train()
    curve: list[dict[str, float]] = []
    student_state: dict | None = None
    student_step: int | None = None
    fallback_step = max(1, int(round(cfg.fallback_fraction * cfg.steps)))
    fallback_state: dict | None = None
    loss_ema = None
    cols = (TextColumn("loss {task.fields[loss]}"), TextColumn("val@t1 {task.fields[val]}"))
    with progress(*cols, transient=False) as bar:
        task = bar.add_task(label, total=cfg.steps, loss="-", val="-", visible=show_progress)
        for step in range(1, cfg.steps + 1):
            for g in opt.param_groups:
                g["lr"] = _lr_at(step, cfg)
            idx = torch.randint(len(train), (cfg.batch_size,), generator=gen).tolist()
            ids, mask, labels = _collate([train[i] for i in idx], tokenizer.pad_token_id)
            loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if cfg.grad_clip:
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            opt.step()
            lv = float(loss.detach())
            loss_ema = lv if loss_ema is None else 0.9 * loss_ema + 0.1 * lv
            if step == fallback_step:
                fallback_state = copy.deepcopy(model.state_dict())
            if student_state is None and step >= cfg.eval_start and step % cfg.eval_every == 0:
                acc = sample_accuracy(model, tokenizer, val, template, 1.0, cfg.val_samples, max_new_tokens,
                                      seed=seed + step)
                curve.append({"step": step, "acc": acc, "loss": round(loss_ema, 4)})
                bar.update(task, val=f"{acc:.2f}")
                if acc >= cfg.student_min_acc:
                    student_state, student_step = copy.deepcopy(model.state_dict()), step
            bar.update(task, advance=1, loss=f"{loss_ema:.3f}")
    if student_state is None:
        student_state, student_step = fallback_state, fallback_step
    return curve, student_state, student_step


def _build(out: Path, key: str, seed: int, quick: bool, spec: DemoSpec, show_progress: bool) -> None:
    import torch

    t0 = time.perf_counter()
    template = demo_template()
    splits = generate_splits(seed, spec.task, spec.sizes)
    files = write_splits(splits, out / "data")
    tokenizer, model = _init_model(out, splits, template, spec, seed)
    train = [encode_example(r, tokenizer, template) for r in splits["train"]]
    max_new_tokens = _max_new_tokens(splits, train, tokenizer, template, spec.model)
    cfg = spec.sft
    val = splits["val"]
    curve, student_state, student_step = _sft(model, tokenizer, train, val, template, cfg, seed, max_new_tokens,
                                              show_progress)
    sft_seconds = time.perf_counter() - t0

    teacher_step = cfg.steps
    model.eval()
    accuracy: dict[str, dict[str, float]] = {}
    meta = {"task": "oprd demo", "key": key, "seed": seed}
    _save(model, tokenizer, out / "teacher", {**meta, "role": "teacher", "sft_step": teacher_step})
    accuracy["teacher"] = _report(model, tokenizer, val, template, spec, max_new_tokens, seed)
    model.load_state_dict(student_state)
    _save(model, tokenizer, out / "student", {**meta, "role": "student", "sft_step": student_step})
    accuracy["student"] = _report(model, tokenizer, val, template, spec, max_new_tokens, seed)
    accuracy["bridge_teacher"] = _build_bridge_teacher(out, tokenizer, train, val, template, spec, seed,
                                                       max_new_tokens, meta, show_progress)

    manifest = {
        "version": ASSETS_VERSION,
        "key": key,
        "seed": seed,
        "quick": quick,
        "spec": spec.to_dict(),
        "template": asdict(template),
        "paths": {"tokenizer": "tokenizer", "teacher": "teacher", "student": "student",
                  "bridge_teacher": "bridge_teacher",
                  **{k: str(v.relative_to(out)) for k, v in files.items()}},
        "max_new_tokens": max_new_tokens,
        "teacher_step": teacher_step,
        "student_step": student_step,
        "student_rule": f"first checkpoint (every {cfg.eval_every} steps from {cfg.eval_start}) with val acc@t1.0 "
                        f">= {cfg.student_min_acc}",
        "accuracy": accuracy,
        "curve": curve,
        "sft_seconds": round(sft_seconds, 2),
        "build_seconds": round(time.perf_counter() - t0, 2),
        "torch_threads": torch.get_num_threads(),
    }
    write_json(out / MANIFEST, manifest, sort_keys=False)  # last write of the build


def _build_bridge_teacher(out: Path, tokenizer, train, val, template, spec: DemoSpec, seed: int,
                          max_new_tokens: int, meta: dict, show_progress: bool) -> dict[str, float]:
    """SFT a model of ``spec.bridge_model`` (another width and depth) as the OPRD-Bridge teacher."""
    from dataclasses import replace

    model = _new_model(out, tokenizer, spec.bridge_model, seed + 1)
    cfg = replace(spec.sft, steps=spec.bridge_steps, eval_start=spec.bridge_steps + 1,
                  warmup=min(spec.sft.warmup, spec.bridge_steps))
    _sft(model, tokenizer, train, val, template, cfg, seed + 1, max_new_tokens, show_progress,
         label="demo SFT (bridge teacher)")
    model.eval()
    _save(model, tokenizer, out / "bridge_teacher", {**meta, "role": "bridge teacher", "sft_step": cfg.steps})
    # one cheap number (the demo evaluates it on the held-out split anyway)
    return {"greedy": round(sample_accuracy(model, tokenizer, val, template, 0.0, 1, max_new_tokens, seed=seed), 4)}


def _report(model, tokenizer, records, template, spec: DemoSpec, max_new_tokens: int, seed: int) -> dict[str, float]:
    out = {}
    for name, temp in TEMPERATURES.items():
        n = 1 if temp == 0 else spec.report_samples
        out[name] = round(sample_accuracy(model, tokenizer, records, template, temp, n, max_new_tokens,
                                          seed=seed + 7919), 4)
    return out


__all__ = ["ASSETS_VERSION", "DemoAssets", "DemoSpec", "ModelDims", "SftConfig", "assets_key", "assets_name", "build_assets",
           "demo_spec", "encode_example", "sample_accuracy"]
