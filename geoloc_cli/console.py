"""All terminal output: rich tables on stdout, progress bars and messages on stderr.

Only this module imports rich. Only the main process (RANK 0, or no RANK at all) prints anything, so
stages can call these functions unconditionally from every distributed worker.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import sys
import time
from collections.abc import Iterator, Sequence
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    TaskProgressColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table
from rich.text import Text

_state = {"quiet": False, "verbose": 0}
PIPE_WIDTH = 160  # columns when writing to a file or pipe (rich's default, 80, wraps paths and tables)


def _console(stderr: bool) -> Console:
    c = Console(stderr=stderr, highlight=False, soft_wrap=not stderr)
    if not c.is_terminal and "COLUMNS" not in os.environ:
        c.width = PIPE_WIDTH
    return c


out, err = _console(False), _console(True)


def set_quiet(quiet: bool) -> None:
    """Quiet: no progress bars; progress is logged as plain lines every few seconds instead."""
    _state["quiet"] = quiet
    if quiet:  # the libraries' own tqdm bars too (Hub downloads, transformers' "Loading weights"): through
        # the environment, which libraries not imported yet and spawned workers read
        os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"
        if "huggingface_hub" in sys.modules:  # (imported already: it read the environment then)
            from huggingface_hub.utils import disable_progress_bars

            disable_progress_bars()


class _StderrHandler(logging.StreamHandler):
    """Log records to whatever sys.stderr is at the time (a handler keeping the stream it was made with would
    write into a closed one after a test runner swapped stderr back)."""

    @property  # type: ignore[override]
    def stream(self) -> Any:
        return sys.stderr

    @stream.setter
    def stream(self, value: Any) -> None:
        pass


_log_handler = _StderrHandler()
_log_handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))


def is_quiet() -> bool:
    return _state["quiet"]


def verbosity() -> int:
    return _state["verbose"]


def set_verbose(level: int) -> None:
    """Verbose (`geoloc -v`): errors come with their traceback, and libraries' log records are shown (level 1:
    INFO and above, 2: DEBUG too); 0 restores Python's default (warnings only)."""
    _state["verbose"] = level
    root = logging.getLogger()
    if _log_handler in root.handlers:  # undo only what an earlier verbose run did
        root.removeHandler(_log_handler)
        root.setLevel(logging.WARNING)
    if level:
        root.addHandler(_log_handler)
        root.setLevel(logging.INFO if level == 1 else logging.DEBUG)


def traceback() -> None:
    """In verbose mode, the traceback of the exception being handled (before its one-line message)."""
    if _state["verbose"] and is_main():
        err.print_exception()


def is_main() -> bool:
    return os.environ.get("RANK", "0") == "0"


def info(msg: str) -> None:
    if is_main():
        err.print(msg, markup=False, soft_wrap=not err.is_terminal)


def warn(msg: str) -> None:
    if is_main():
        err.print(f"[yellow]warning:[/] {escape(msg)}", soft_wrap=not err.is_terminal)


def error(msg: str) -> None:
    # Errors print from every rank: a failing worker must be able to say why. Never wrapped in a log:
    # a URL or path in it must stay copyable.
    err.print(f"[bold red]error:[/] {escape(msg)}", markup=True, highlight=False, soft_wrap=not err.is_terminal)


def print_json(obj: Any) -> None:
    if is_main():
        sys.stdout.write(json.dumps(obj, indent=2, default=str) + "\n")
        sys.stdout.flush()


def table(title: str, columns: Sequence[str], rows: Sequence[Sequence[Any]], caption: str = "") -> None:
    """Print a table; numbers are right-aligned, floats shown with 2 decimals unless already strings."""
    if not is_main():
        return
    t = Table(title=title, caption=caption or None, title_justify="left")
    first = rows[0] if rows else [""] * len(columns)
    for name, sample in zip(columns, first, strict=False):
        t.add_column(name, justify="right" if isinstance(sample, int | float) else "left")
    for row in rows:
        t.add_row(*(Text(_fmt(v)) for v in row))  # cells are data (file names...), never markup
    out.print(t)


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:,.2f}"
    if isinstance(v, int) and not isinstance(v, bool):
        return f"{v:,}"
    return str(v)


class Task:
    """Handle of a progress bar (or of its quiet log-line stand-in)."""

    def __init__(self, progress: Progress | None, task_id: Any, description: str, total: float | None):
        self._progress, self._id, self._desc, self._total = progress, task_id, description, total
        self._done = 0.0
        self._fields: dict[str, Any] = {}
        self._last_log = time.monotonic()
        self._start = time.monotonic()

    def advance(self, n: float = 1, **fields: Any) -> None:
        self._done += n
        self._fields = fields or self._fields
        if self._progress is not None:
            self._progress.update(self._id, advance=n, **fields)
        elif is_main() and time.monotonic() - self._last_log > 10:
            self.log()

    def log(self, final: bool = False) -> None:
        """One plain progress line (the stand-in for a bar in quiet mode and in logs)."""
        self._last_log = time.monotonic()
        seconds = max(time.monotonic() - self._start, 1e-9)
        extra = " ".join(f"{k}={_fmt(v)}" for k, v in self._fields.items())
        total = f"/{self._total:.0f}" if self._total else ""
        done = f" done in {seconds:.1f} s" if final else ""
        err.print(f"{self._desc}: {self._done:.0f}{total} ({self._done / seconds:.1f}/s){done} {extra}".rstrip(),
                  markup=False, soft_wrap=True)


@contextlib.contextmanager
def progress(description: str, total: float | None, unit: str = "it", **fields: Any) -> Iterator[Task]:
    """A progress bar with rate, ETA and free-form fields (e.g. loss=0.1) shown after the bar."""
    if _state["quiet"] or not is_main() or not err.is_terminal:
        # quiet, another rank, or a log file / pipe (where a live bar only garbles): plain lines
        task = Task(None, None, description, total)
        yield task
        if is_main() and not _state["quiet"]:
            task.log(final=True)
        return
    extra = " ".join(f"{k}={{task.fields[{k}]}}" for k in fields)
    columns = [
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TaskProgressColumn(),
        _RateColumn(unit),
        TimeElapsedColumn(),
        TextColumn("eta"),
        TimeRemainingColumn(),
        TextColumn(extra),
    ]
    with Progress(*columns, console=err, transient=False, refresh_per_second=4) as p:
        task_id = p.add_task(description, total=total, **fields)
        yield Task(p, task_id, description, total)


class _RateColumn(ProgressColumn):
    """Items per second (rich's speed is None until two samples exist)."""

    def __init__(self, unit: str) -> None:
        super().__init__()
        self.unit = unit

    def render(self, task: Any) -> Text:
        speed = task.finished_speed or task.speed
        return Text(f"{speed:,.1f} {self.unit}/s" if speed else f"- {self.unit}/s")
