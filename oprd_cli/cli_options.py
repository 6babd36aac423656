"""Option declarations of the OPD+, TrOPD and teacher-prefix guidance flags, shared by the commands of
``cli.py`` (kept here so the command signatures stay one line per group of related flags)."""

from __future__ import annotations

from typing import Optional

import typer

DIVERGENCE: Optional[str] = typer.Option(None, "--divergence", help="opd-plus: the f-divergence D_f(teacher || student): rkl | fkl | jsd | alpha | hellinger | chi2 | tv. (default: <train.divergence>)")
ALPHA: Optional[float] = typer.Option(None, "--alpha", help="opd-plus --divergence alpha: the alpha of the alpha-divergence. (default: 0.5)")
ADVANTAGE: Optional[str] = typer.Option(None, "--advantage", help="opd-plus: corrected (OPD+: -f(u) + u f'(u)) | stopgrad (standard OPD: -f(u); biased for every f but rkl). (default: <train.advantage>)")
LOG_RATIO_CLIP: Optional[float] = typer.Option(None, "--log-ratio-clip", help="opd-plus: clamp log(pi_T/pi_S) to +-C before the advantage; 0 = off. (default: <train.log_ratio_clip>)")
TRUST: Optional[str] = typer.Option(None, "--trust", help="tropd: hard (M ~ Bernoulli(min(pi_T/pi_S, 1)), the paper) | soft (weight by that probability). (default: <train.trust>)")
TROPD_TOPK: Optional[int] = typer.Option(None, "--tropd-topk", help="tropd: the teacher's top-k of the outlier forward KL (the cache needs --logprobs topk with at least this --topk). (default: <train.tropd_topk>)")
OUTLIER: Optional[str] = typer.Option(None, "--outlier", help="tropd outlier tokens: fkl (top-k forward KL, the paper) | mask (nothing) | clip (policy gradient on max(r, tau)). (default: <train.outlier>)")
TAU: Optional[float] = typer.Option(None, "--tau", help="tropd --outlier clip: the floor tau of the log-ratio reward. (default: <train.tau>)")
GUIDANCE_BETA: Optional[float] = typer.Option(None, "--guidance-beta", help="tropd: weight of -log pi_S on teacher-prefix tokens. (default: <train.guidance_beta>)")
TEACHER_PREFIX: Optional[str] = typer.Option(None, "--teacher-prefix", help="Guidance: this model (same tokenizer as the student) writes the first tokens of each response; the student continues.")
PREFIX_MAX_TOKENS: Optional[int] = typer.Option(None, "--prefix-max-tokens", help="Guidance: teacher tokens per response at most (L). In `oprd loop`: the start of the cosine schedule. (default in loop: --max-new-tokens)")
PREFIX_MODE: Optional[str] = typer.Option(None, "--prefix-mode", help="Guidance: fixed (L tokens) | uniform (uniform in [0, L], seeded per sample). (default: fixed)")
PREFIX_SCHEDULE: str = typer.Option("none", "--prefix-schedule", help="Teacher-prefix guidance in the loop: cosine (L anneals from --prefix-max-tokens to 0 over the rounds) | none (a fixed L with --prefix-max-tokens, else no guidance). (default: none)")
CACHE_OBJECTIVE: Optional[str] = typer.Option(None, "--objective", help="Default --logprobs/--topk to what this training objective needs: oprd | opd-top1 | opd-plus | opd-topk | tropd (topk, 64).")
