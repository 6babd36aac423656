"""Terminal output shared by every command: consoles and rich progress bars."""

from __future__ import annotations

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

# soft_wrap keeps one-line messages on one line whatever the terminal width.
console = Console(soft_wrap=True, highlight=False)
err_console = Console(stderr=True, soft_wrap=True, highlight=False)


def warn(message: str) -> None:
    err_console.print(f"[yellow]warning:[/] {message}")


def progress(*extra_columns, transient: bool = False) -> Progress:
    """A progress bar with count, ETA and any extra columns (e.g. a tokens/s field).

    Extra text fields are passed to ``Progress.update(task, field=value)`` and shown
    with ``TextColumn("{task.fields[field]}")``. Goes to stderr so ``--json`` output
    on stdout stays machine-readable.
    """
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        *extra_columns,
        TimeElapsedColumn(),
        TextColumn("eta"),
        TimeRemainingColumn(),
        console=err_console,
        transient=transient,
    )
