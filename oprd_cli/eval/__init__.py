"""Evaluation: ``oprd eval`` and ``oprd report`` (see docs/eval.md)."""

from oprd_cli.eval.command import *  # noqa: F401,F403
from oprd_cli.eval.command import __all__
