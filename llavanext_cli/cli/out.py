"""Everything the CLI shows a person, in one place (as the `hf` CLI's `out` object): results on stdout (records in
their format, an answer streamed as it is generated, a command's own view: classify's bars, score's tables,
inspect-config's report); on stderr, never mixed with results, `Error:` / `Hint:` / `Warning:` lines, notes, the
progress bar and the line that ends a stopped run. And whether the libraries' own noise (their deprecation and
future warnings, their logs) is shown: only with -v or LLAVA_DEBUG=1."""

from __future__ import annotations

import os
import sys
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import closing
from dataclasses import dataclass
from typing import Any

from rich.console import Console

from llavanext_cli.engine.figures import RunFigures
from llavanext_cli.errors import EXIT_INPUT_FAILED, Terminated
from llavanext_cli.io.records import JsonRecord, Record
from llavanext_cli.io.writers import Writer

stderr = Console(stderr=True, highlight=False, soft_wrap=True)

# --- how much to show ----------------------------------------------------------------------------------------------

_verbose = False


def debugging() -> bool:
    """LLAVA_DEBUG=1: tracebacks, and every warning with where it was raised."""
    return os.environ.get("LLAVA_DEBUG", "") not in ("", "0")


def set_verbose(value: bool) -> bool:
    """The -v flag's callback (run as soon as it is parsed, before the command starts): with -v the libraries'
    warnings are shown, their deprecations included (which Python hides by default)."""
    global _verbose
    _verbose = bool(value)
    if _verbose:
        warnings.simplefilter("default", DeprecationWarning)
    return value


def library_noise_shown() -> bool:
    """Whether a warning raised inside a library reaches stderr: with -v or LLAVA_DEBUG=1 only."""
    return _verbose or debugging()


# --- stderr ----------------------------------------------------------------------------------------------------------

def _escape(text: str) -> str:
    from rich.markup import escape

    return escape(text)


def error(message: str, hint: str | None = None) -> None:
    stderr.print("[bold red]Error:[/bold red] " + _escape(message))
    if hint:
        stderr.print("[yellow]Hint:[/yellow] " + _escape(hint))


def warn(message: str) -> None:
    stderr.print("[yellow]Warning:[/yellow] " + _escape(message))


def note(message: str) -> None:
    """A line of what the tool is doing (resuming, skipping, merging), plain."""
    stderr.print(message, highlight=False, markup=False)


def stopped(word: str, how_to_go_on: str) -> None:
    """The last line of a run stopped by Ctrl-C or SIGTERM: not an error, and what to do next."""
    stderr.print(f"[yellow]{word}[/yellow]: " + _escape(how_to_go_on))


# --- stdout ----------------------------------------------------------------------------------------------------------

def stream(text: str) -> None:
    """A piece of an answer, as it is generated."""
    sys.stdout.write(text)
    sys.stdout.flush()


def line(text: str = "") -> None:
    print(text, flush=True)


def view(renderable: Any) -> None:
    """A command's own rendering (rich tables, bars) on stdout."""
    Console(highlight=False).print(renderable)


def banner(text: str) -> None:
    """A chat's first line, on a terminal."""
    Console(highlight=False).print("[bold]" + _escape(text.split(" · ")[0]) + "[/bold] · "
                                   + _escape(" · ".join(text.split(" · ")[1:])))


def dim(text: str) -> None:
    Console(highlight=False).print("[dim]" + _escape(text) + "[/dim]")


def prompt(text: str) -> str:
    """What the person types after `text` (a chat's turn)."""
    return Console(highlight=False).input(f"[bold cyan]{_escape(text)}[/bold cyan] ")


def speaker(text: str) -> None:
    """Who speaks next, on the line their words follow."""
    Console(highlight=False).print(f"[bold magenta]{_escape(text)}[/bold magenta] ", end="")


def width() -> int:
    """The width stdout's views are drawn to."""
    return Console().width


# --- a batch run's records ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Display:
    """How successes reach the person instead of the sink, on a terminal: `streamed` (the answer was already
    printed as it was generated: end its line) or `draw` (a command's own rendering, classify's bars)."""

    streamed: bool = False
    draw: Callable[[JsonRecord], None] | None = None
    progress: bool = False


def write_records(records: Iterator[Record], writers: Sequence[Writer], total: int, display: Display = Display(),
                  reported: Sequence[Record] = (), figures: RunFigures | None = None) -> int:
    """Drive the record iterator to its end, each record through the writers as it is final (the caption files,
    then the output: a writer may turn a success into a failure); 1 if any input failed, else 0. Failures are
    warned about as they come, but those in `reported` (warned up front); `figures` sums what the records tell (-v).
    The iterator is closed however this ends: on Ctrl-C, SIGTERM or an error the pipeline's threads stop (after the
    step they are in) before this returns (a thread still inside the model when the interpreter exits would abort
    the process instead of exiting with the contract's code)."""
    failures = 0
    already = {id(record) for record in reported}
    progress: Any = None
    complete = False
    *ahead, sink = writers
    with closing(records):  # type: ignore[type-var]
        try:
            for made in records:
                # The model loads while the first record is made: the bar starts after it (and the sink opens on
                # its first record), so a checkpoint that fails to load leaves the terminal and the output as they were.
                if display.progress and progress is None:
                    progress = _start_progress(total)
                record = made
                for writer in ahead:
                    record = writer.write(record)
                streamed = display.streamed and made.ok  # printed as it was generated: its line ends here
                if streamed:
                    sys.stdout.write("\n")
                if not record.ok:
                    failures += 1
                    if id(record) not in already:
                        warn(f"{record.subject.describe()}: {record.error}")
                if display.draw is not None:
                    if record.ok:
                        display.draw(record.to_json())
                elif not streamed:
                    sink.write(record)
                if progress is not None:
                    _advance(progress, failures)
                if figures is not None:
                    figures.add(made)
            complete = True
        except (KeyboardInterrupt, Terminated):
            if progress is not None:
                progress.stop()
                progress = None
            note("Stopping after the current step...")
            raise
        finally:
            if progress is not None:
                progress.stop()
            for writer in writers:
                writer.close(complete=complete)
    return EXIT_INPUT_FAILED if failures else 0


def _start_progress(total: int) -> Any:
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    progress = Progress(TextColumn("[progress.description]{task.description}"), BarColumn(), MofNCompleteColumn(),
                        TextColumn("{task.fields[rate]}"), TimeRemainingColumn(), TextColumn("{task.fields[failed]}"),
                        console=stderr, transient=True)
    progress.add_task("images", total=total, rate="", failed="")
    progress.start()
    return progress


def _advance(progress: Any, failures: int) -> None:
    task = progress.tasks[0]
    done = task.completed + 1
    elapsed = task.elapsed or 0
    progress.update(task.id, advance=1, rate=f"{done / elapsed:.2f} img/s" if elapsed else "",
                    failed=f"[red]{failures} failed[/red]" if failures else "")
