"""What ``oprd demo`` compares, and the budget every method gets.

A :class:`Method` is one row of the demo's table: an objective of ``oprd train`` with its settings
(the same flags a user would pass to ``oprd loop``). :class:`Budget` is what every method gets: the
same rounds, prompts, samples, optimizer steps, learning-rate grid and evaluation. Each method's
learning rate is the grid value with the best validation accuracy (the ``val`` split) on the tuning
seeds; the held-out ``eval`` split plays no part in any choice.
"""

from __future__ import annotations

from dataclasses import dataclass

from oprd_cli.errors import OprdError


@dataclass(frozen=True)
class Method:
    """One distillation method of the demo (``name`` is its key in ``--json`` and ``--methods``)."""

    name: str
    label: str
    objective: str
    mu: float | None = None  # coefficient of the OPRD term next to an OPD objective (Eq. 7)
    topk: int | None = None  # teacher cache top-k support (opd-topk)
    divergence: str | None = None  # OPD+
    guidance: bool = False  # TrOPD's teacher-prefix rollouts, annealed to none over the rounds (cosine)
    bridge: bool = False  # OPRD-Bridge from the bridge teacher (another width and depth)

    def train_settings(self) -> dict:
        """Flat :class:`oprd_cli.train.TrainConfig` settings of this method (no lr, budget or paths)."""
        out: dict = {"objective": self.objective, "mu": self.mu}
        if self.divergence:
            out["divergence"] = self.divergence
        return out


METHODS: tuple[Method, ...] = (
    Method("opd-top1", "OPD top-1", "opd-top1"),
    Method("opd-top16", "OPD top-16", "opd-topk", topk=16),
    Method("opd-plus-jsd", "OPD+ (JSD)", "opd-plus", divergence="jsd"),
    Method("tropd", "TrOPD (guided)", "tropd", guidance=True),
    Method("oprd", "OPRD", "oprd"),
    Method("opd-top16+oprd", "OPD top-16 + OPRD", "opd-topk", mu=1.0, topk=16),
    Method("tropd+oprd", "TrOPD + OPRD", "tropd", mu=1.0, guidance=True),
    Method("oprd-bridge", "OPRD-Bridge", "oprd", bridge=True),
)
METHOD_NAMES = tuple(m.name for m in METHODS)


def select_methods(names: str | None) -> tuple[Method, ...]:
    """``--methods a,b``: the named methods in table order (all when ``names`` is empty)."""
    if not names:
        return METHODS
    wanted = [n.strip() for n in names.split(",") if n.strip()]
    unknown = [n for n in wanted if n not in METHOD_NAMES]
    if unknown or not wanted:
        what = ", ".join(unknown) if unknown else repr(names)
        raise OprdError(f"unknown method(s) {what}; choose from {', '.join(METHOD_NAMES)}")
    return tuple(m for m in METHODS if m.name in wanted)


@dataclass(frozen=True)
class Budget:
    """What every method gets: the same rounds, prompts, samples, optimizer steps and lr grid.

    ``lr_grid`` is searched for every method on the ``val`` split of the first ``tune_seeds`` seeds
    (mean accuracy; ties go to the smaller rate); the other seeds train at the chosen rate.
    """

    rounds: int = 4
    prompts_per_round: int = 256
    num_samples: int = 2  # per prompt, temperature 1.0 (the paper's rollout setting)
    batch_size: int = 16  # samples per optimizer step (8 prompts x 2 samples, as in the paper)
    lr_grid: tuple[float, ...] = (2.5e-4, 1e-3, 4e-3)
    tune_seeds: int = 1
    warmup_ratio: float = 0.03
    oprd_form: str = "raw"
    eval_every: int = 2  # rounds between held-out evaluations (the curve's points)
    eval_samples: int = 4  # per problem (Avg@n), held out and val
    eval_temperature: float = 0.7
    # OPRD-Bridge's rank r: half the student's width of 64 (the paper's r = 8 is for widths of 1,536+; at
    # r = 8 or 64 the bridge lowered the student's val accuracy here, see docs/demo.md)
    bridge_rank: int = 32

    @property
    def steps_per_round(self) -> int:
        return -(-self.prompts_per_round * self.num_samples // self.batch_size)

    @property
    def total_steps(self) -> int:
        return self.rounds * self.steps_per_round

    def curve_steps(self) -> list[int]:
        """The training steps evaluated on the held-out split (0 is the student start)."""
        rounds = list(range(self.eval_every, self.rounds + 1, self.eval_every))
        if not rounds or rounds[-1] != self.rounds:
            rounds.append(self.rounds)
        return [0] + [r * self.steps_per_round for r in rounds]


DEFAULT_SEEDS = (0, 1, 2)
QUICK_SEEDS = (0, 1)


def demo_budget(quick: bool) -> Budget:
    """The default budget, or the quick one (a smoke test of every stage: too short to close much)."""
    if quick:
        return Budget(rounds=2, prompts_per_round=32, lr_grid=(1e-3, 2e-3), eval_every=2, eval_samples=1)
    return Budget()


__all__ = [
    "DEFAULT_SEEDS",
    "METHODS",
    "METHOD_NAMES",
    "QUICK_SEEDS",
    "Budget",
    "Method",
    "demo_budget",
    "select_methods",
]
