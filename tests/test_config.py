"""Configuration: one merge path (defaults <- oprd.toml <- flags) for every command, and `--help`
defaults that are the dataclass defaults."""

from __future__ import annotations

import dataclasses

import re
from dataclasses import fields
from pathlib import Path

import click
import pytest
import typer

from helpers import run_cli
from oprd_cli import loop as loop_mod
from oprd_cli.cli import app, fill_help_defaults
from oprd_cli.config import (DataConfig, SamplingConfig, TemplateConfig, field_default, field_types, format_default,
                             merge, section_class)
from oprd_cli.errors import OprdError

TOML = """
[models]
student = "toml-student"
teacher = "toml-teacher"

[data]
split = "toml-split"

[rollout]
temperature = 0.5
top_p = 0.9
seed = 7

[template]
system_prompt = "from toml"

[teacher_cache]
k = 77
compressor = "zstd"
topk = 4

[train]
lr = 0.002
warmup_ratio = 0.1
seed = 5
"""


@pytest.fixture
def run_dir(tmp_path) -> Path:
    run = tmp_path / "run"
    run.mkdir()
    (run / "oprd.toml").write_text(TOML)
    return run


# ------------------------------------------------------------------ merge itself
def test_merge_precedence_flag_over_toml_over_defaults_over_dataclass():
    s = merge(SamplingConfig, {"temperature": 0.5, "top_p": 0.9}, defaults={"temperature": 0.7, "top_k": 20},
              temperature=0.3, seed=None)
    assert (s.temperature, s.top_p, s.top_k, s.seed) == (0.3, 0.9, 20, 0)  # flag, toml, defaults, dataclass


@pytest.mark.parametrize("section, words", [
    ({"temprature": 0.5}, ["unknown key", "temprature", "SamplingConfig"]),
    ({"num_samples": "two"}, ["num_samples", "'two'", "int"]),
    ({"temperature": True}, ["temperature", "float"]),
    ({"num_samples": 2.5}, ["num_samples", "int"]),
])
def test_bad_toml_keys_and_types_are_one_line(section, words):
    with pytest.raises(OprdError) as e:
        merge(SamplingConfig, section)
    msg = str(e.value)
    assert "\n" not in msg and all(w in msg for w in words), msg


def test_toml_ints_fill_float_fields_and_none_fills_optional():
    assert merge(SamplingConfig, {"temperature": 1}).temperature == 1
    assert merge(DataConfig, {"limit": 3}).limit == 3


def test_wrong_toml_type_through_the_cli_is_one_line_exit_2(run_dir, aime24_path, tmp_path):
    (run_dir / "oprd.toml").write_text('[rollout]\nnum_samples = "2"\n')
    r = run_cli("rollout", "--run-dir", run_dir, "--model", tmp_path / "nope", "--prompts", aime24_path, expect=2)
    assert "num_samples" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert not (run_dir / "rollouts").exists()


# ------------------------------------------------------------------ every command
def test_rollout_precedence(run_dir, aime24_path, monkeypatch):
    import oprd_cli.rollout as R

    seen = {}
    monkeypatch.setattr(R, "run_rollout", lambda **kw: seen.update(kw))
    monkeypatch.setattr(R, "print_summary", lambda s: None)
    run_cli("rollout", "--run-dir", run_dir, "--prompts", aime24_path, "--temperature", 0.25)
    s, d, t = seen["sampling"], seen["data"], seen["template"]
    assert s.temperature == 0.25  # flag over toml
    assert (s.top_p, s.seed, d.split, t.system_prompt) == (0.9, 7, "toml-split", "from toml")  # toml
    assert (s.num_samples, s.max_new_tokens, t.chat_template) == (2, 1024, True)  # dataclass defaults


def test_teacher_cache_precedence(run_dir, monkeypatch):
    import oprd_cli.teacher as T

    seen = {}
    monkeypatch.setattr(T, "cache_run_dir", lambda teacher, run_dir, **kw: seen.update(kw, teacher=teacher) or [])
    run_cli("teacher-cache", "--run-dir", run_dir, "--compressor", "lz4")
    seen.update(dataclasses.asdict(seen.pop("cfg")))  # the command resolves TeacherCacheConfig once
    assert seen["compressor"] == "lz4"  # flag over toml
    assert (seen["k"], seen["topk"], seen["teacher"]) == (77, 4, "toml-teacher")  # toml
    assert (seen["positions"], seen["layers"], seen["max_batch_tokens"]) == ("last_k", "all", 16384)  # defaults


def test_train_precedence(run_dir, monkeypatch):
    import oprd_cli.train as TR

    seen = {}
    monkeypatch.setattr(TR, "run_train", lambda **kw: seen.update(kw))
    monkeypatch.setattr(TR, "print_result", lambda r: None)
    run_cli("train", "--run-dir", run_dir, "--lr", 0.003)
    c = seen["config"].to_flat()
    assert c["lr"] == 0.003  # flag over toml
    assert (c["warmup_ratio"], c["seed"]) == (0.1, 5)  # toml
    assert (c["objective"], c["batch_size"], c["max_grad_norm"]) == ("oprd", 16, 1.0)  # dataclass defaults


def test_loop_precedence(run_dir, aime24_path, monkeypatch):
    seen = {}
    monkeypatch.setattr(loop_mod._Loop, "run_all", lambda self: seen.update(loop=self))
    run_cli("loop", "--run-dir", run_dir, "--prompts", aime24_path, "--rounds", 1, "--objective", "opd-topk",
            "--logprobs", "topk", "--k", 5, "--lr", 0.004, "--temperature", 0.75)
    lp = seen["loop"]
    assert (lp.model, lp.teacher) == ("toml-student", "toml-teacher")  # toml [models]
    assert (lp.ccfg.k, lp.ccfg.logprobs, lp.train.optim.lr, lp.sampling.temperature) == (5, "topk", 0.004, 0.75)  # flags
    assert (lp.ccfg.compressor, lp.ccfg.topk, lp.train.optim.warmup_ratio, lp.sampling.top_p) == ("zstd", 4, 0.1, 0.9)
    assert lp.sampling.record_topk == 4  # raised to the top-k support the objective needs
    # what the objective needs is a default below oprd.toml: OPD alone caches the last layer only
    assert (lp.ccfg.layers, lp.ccfg.positions, lp.train.batching.batch_size) == ("last", "last_k", 16)


def test_loop_toml_overrides_what_the_objective_needs(run_dir, aime24_path, monkeypatch):
    (run_dir / "oprd.toml").write_text(TOML.replace("k = 77", 'k = 77\nlayers = "odd"'))
    seen = {}
    monkeypatch.setattr(loop_mod._Loop, "run_all", lambda self: seen.update(loop=self))
    run_cli("loop", "--run-dir", run_dir, "--prompts", aime24_path, "--rounds", 1, "--objective", "opd-top1")
    assert (seen["loop"].ccfg.layers, seen["loop"].ccfg.logprobs, seen["loop"].ccfg.k) == ("odd", "sampled", 77)


# ------------------------------------------------------------------ --help defaults
# options whose default is not a dataclass default (it depends on other settings) and says so in words
OWN_DEFAULTS = {("loop", "layers"), ("loop", "logprobs"), ("loop", "epochs"), ("loop", "total_steps")}
SECTIONS_OF = {"rollout": ("data", "rollout", "template"), "teacher-cache": ("teacher_cache",),
               "train": ("train",), "loop": ("data", "template", "teacher_cache", "train", "rollout"),
               "eval": ("template",), "bench loss": ("bench_loss",)}
LOOP_NAMES = {"gen_batch_size": ("rollout", "batch_size"), "num_samples": ("rollout", "num_samples"),
              "temperature": ("rollout", "temperature"), "max_new_tokens": ("rollout", "max_new_tokens"),
              "seed": ("rollout", "seed"), "batch_size": ("train", "batch_size")}


def _commands() -> dict[str, click.Command]:
    group = typer.main.get_command(app)
    out = {name: group.commands[name] for name in SECTIONS_OF if name in group.commands}
    out["bench loss"] = group.commands["bench"].commands["loss"]
    return out


def test_every_help_default_is_the_dataclass_default():
    checked = 0
    for name, cmd in _commands().items():
        raw = {p.name: p.help or "" for p in cmd.params}
        fill_help_defaults(cmd)
        for p in cmd.params:
            if name == "loop" and p.name in LOOP_NAMES:
                loc = LOOP_NAMES[p.name]
            elif name == "loop" and p.name in ("num_samples",):
                continue
            else:
                loc = next(((s, p.name) for s in SECTIONS_OF[name] if p.name in field_types(section_class(s))), None)
            if loc is None or (name, p.name) in OWN_DEFAULTS or (name == "eval" and loc[0] != "template"):
                continue
            default = field_default(section_class(loc[0]), loc[1])
            if p.default is not None:  # typer's own default, shown by typer: it must be the dataclass's
                assert p.default == default, (name, p.name, p.default, default)
                continue
            shown = re.search(r"\(default: ([^)]*)\)", p.help or "")
            if shown is None:
                continue  # no default shown (a switch that is off unless given)
            if default is None and "<" not in raw[p.name]:
                continue  # None means "derived": the help says how, in words
            assert f"<{loc[0]}.{loc[1]}>" in raw[p.name], f"oprd {name} --{p.name}: default typed by hand"
            assert shown and shown.group(1).startswith(format_default(default)), (name, p.name, p.help)
            checked += 1
    assert checked >= 75, checked


def test_help_shows_the_defaults(monkeypatch):
    r = run_cli("train", "--help", expect=0)
    text = re.sub(r"[\s│]+", " ", r.stdout)
    assert "(default: 1e-5)" in text and "(default: 16 = 8 prompts x 2 samples)" in text
    assert "<train." not in text
    r = run_cli("rollout", "--help", expect=0)
    text = re.sub(r"[\s│]+", " ", r.stdout)
    assert "(default: 0 = off)" in text and "<rollout." not in text and "<template." not in text


def test_sections_name_their_dataclasses():
    assert section_class("data") is DataConfig and section_class("template") is TemplateConfig
    assert section_class("rollout") is SamplingConfig
    assert {f.name for f in fields(section_class("teacher_cache"))} >= {"layers", "positions", "k"}
