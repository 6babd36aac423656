"""What every command of the CLI shares: help defaults filled from the config dataclasses, one-line
errors (``guarded``), and JSON / summary output. ``cli.py`` (the commands) and ``cli_bridge.py`` use it."""

from __future__ import annotations

import functools
import json
import os
import re
import sys

import click
import typer
from typer.core import TyperCommand

from oprd_cli.console import err_console
from oprd_cli.errors import OprdError, from_os_error

_DEFAULT_RE = re.compile(r"<(data|template|rollout|teacher_cache|train|bench_loss)\.(\w+)>")


def fill_help_defaults(command: click.Command) -> None:
    """Replace the ``<section.field>`` placeholders in option help with the default of that field of the
    section's configuration dataclass (:func:`oprd_cli.config.help_default`): ``--help`` shows the
    defaults the code uses, and the dataclasses are imported only when help is shown."""
    from oprd_cli.config import help_default

    for p in command.params:
        text = getattr(p, "help", None)
        if text:
            p.help = _DEFAULT_RE.sub(lambda m: help_default(m.group(1), m.group(2)), text)


class DefaultsCommand(TyperCommand):
    """A command whose option help names its defaults through ``<section.field>`` placeholders."""

    def format_help(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        fill_help_defaults(self)
        super().format_help(ctx, formatter)


def _debug() -> bool:
    if os.environ.get("OPRD_DEBUG"):
        return True
    ctx = click.get_current_context(silent=True)
    root = ctx.find_root() if ctx else None
    return bool(root and (root.obj or {}).get("debug"))


def guarded(fn):
    """Turn OprdError into one line + exit code; hide other tracebacks unless --debug."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except (typer.Exit, typer.Abort, click.exceptions.ClickException):
            raise
        except (OprdError, OSError) as e:  # OSError: a path that is a file, a full disk, no permission
            if _debug():
                raise
            e = e if isinstance(e, OprdError) else from_os_error(e)
            err_console.print(f"[red]error:[/] {e}", markup=True)
            raise typer.Exit(e.exit_code) from None
        except KeyboardInterrupt:
            err_console.print("[red]interrupted[/]")
            raise typer.Exit(130) from None
        except Exception as e:  # a bug: say so briefly
            if _debug():
                raise
            msg = str(e).strip().splitlines()[0] if str(e).strip() else ""
            err_console.print(f"[red]error:[/] {type(e).__name__}: {msg} (run with --debug for the traceback)")
            raise typer.Exit(1) from None

    return wrapper


def emit_json(obj) -> None:
    """One JSON object on stdout (machine-readable; nothing else goes to stdout with --json)."""
    sys.stdout.write(json.dumps(obj, indent=2, default=str) + "\n")
    sys.stdout.flush()


def show(result, as_json: bool, printer) -> None:
    """A command's result: one JSON object with ``--json``, else the human summary ``printer`` writes."""
    if as_json:
        emit_json(result)
    else:
        printer(result)
