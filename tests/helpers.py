"""Helpers for driving the real CLI in tests."""

from __future__ import annotations

import json

from typer.testing import CliRunner

from oprd_cli.cli import app

_runner = CliRunner()


def run_cli(*args, expect: int | None = 0):
    """Invoke ``oprd ARGS`` in-process; assert the exit code when ``expect`` is not None."""
    result = _runner.invoke(app, [str(a) for a in args], catch_exceptions=False)
    if expect is not None:
        assert result.exit_code == expect, (
            f"oprd {' '.join(map(str, args))} exited {result.exit_code}, expected {expect}\n"
            f"stdout:\n{result.stdout}\nstderr:\n{result.stderr}"
        )
    return result


def info_json(path) -> dict:
    return json.loads(run_cli("info", path, "--json").stdout)
