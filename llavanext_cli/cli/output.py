"""The one loop that writes a run's records: each record finished (its caption file written, --sidecar) and written
to its sink (stdout or -o FILE) as it is final, failures reported on stderr as they happen, a progress bar on a
terminal, and the exit code."""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterable, Iterator
from contextlib import closing
from dataclasses import dataclass
from typing import Any

from llavanext_cli.cli.console import stderr, warn
from llavanext_cli.errors import EXIT_INPUT_FAILED, Terminated
from llavanext_cli.engine.figures import RunFigures
from llavanext_cli.io.records import JsonRecord, Record
from llavanext_cli.io.writers import RecordSink


@dataclass(frozen=True)
class Display:
    """How successes reach the person instead of the sink, on a terminal: `streamed` (the answer was already
    printed as it was generated: end its line) or `draw` (a command's own rendering, classify's bars)."""

    streamed: bool = False
    draw: Callable[[JsonRecord], None] | None = None
    progress: bool = False


def stream_to_stdout(text: str) -> None:
    sys.stdout.write(text)
    sys.stdout.flush()


def write_records(records: Iterator[Record], sink: RecordSink, total: int, display: Display = Display(),
                  finish: Callable[[Record], Record] | None = None, reported: Iterable[Record] = (),
                  figures: RunFigures | None = None) -> int:
    """Drive the record iterator to its end, writing each record as it is final; 1 if any input failed, else 0.
    `finish` is a record's last step before the sink (--sidecar writes its caption file there), which may turn it
    into a failure; the failures in `reported` were reported on stderr already; `figures` sums what the records
    tell (-v). The iterator is closed however this ends: on Ctrl-C, SIGTERM or an error the pipeline's threads stop
    (after the step they are in) before this returns (a thread still inside the model when the interpreter exits
    would abort the process instead of exiting with the contract's code)."""
    failures = 0
    already = {id(record) for record in reported}
    progress: Any = None
    complete = False
    with closing(records):
        try:
            for made in records:
                # The model loads while the first record is made: the bar starts after it (and the sink opens on
                # its first record), so a checkpoint that fails to load leaves the terminal and the output as they were.
                if display.progress and progress is None:
                    progress = _start_progress(total)
                record = made if finish is None else finish(made)
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
            stderr.print("Stopping after the current step...", highlight=False)
            raise
        finally:
            if progress is not None:
                progress.stop()
            sink.close(complete=complete)
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
