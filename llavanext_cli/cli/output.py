"""Writing a command's records (stdout or -o FILE), progress on stderr, and the exit code."""

from __future__ import annotations

import itertools
import sys
from collections.abc import Callable, Iterator
from contextlib import closing

from llavanext_cli.cli.console import stderr, warn
from llavanext_cli.errors import EXIT_INPUT_FAILED
from llavanext_cli.records import Record, RecordSink, is_success


def _describe(record: Record) -> str:
    if "image" in record:
        return str(record["image"])
    return ", ".join(map(str, record.get("images", [])))


def wants_streaming(run, count: int) -> bool:
    """One answer, for a person: stream it token by token on the terminal."""
    return (count == 1 and run.output is None and run.output_format == "text" and sys.stdout.isatty()
            and run.generation.num_beams == 1)


def stream_to_stdout(text: str) -> None:
    sys.stdout.write(text)
    sys.stdout.flush()


def write_records(run, records: Callable[[Callable[[str], None] | None], Iterator[Record]], count: int,
                  already_done: int = 0, render_text: Callable[[Record, bool], None] | None = None) -> int:
    """Drive the record iterator, writing each record as it is final. A progress bar shows on a terminal when
    there is more than one input; failures are reported on stderr as they happen."""
    streaming = wants_streaming(run, count) and render_text is None
    # A command may draw its own text display on stdout (classify's bars); files keep the plain text lines.
    draw = render_text if run.output is None and run.output_format == "text" and sys.stdout.isatty() else None
    sink = None
    failures = 0
    progress = None
    complete = False
    # closing(): on Ctrl-C, SIGTERM or an error the pipeline's threads stop before this returns; a thread still
    # inside the model when the interpreter exits would abort the process instead of exiting with the contract's
    # code.
    with closing(records(stream_to_stdout if streaming else None)) as produced:
        try:
            # The model loads while the first record is made: nothing (not even an empty file, a "[]" or a
            # progress bar) is written before it, so a checkpoint that fails to load leaves the output as it was.
            first = next(produced, None)
            sink = RecordSink(run.output, run.output_format, many=count + already_done > 1)
            if count > 1 and stderr.is_terminal:
                from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

                progress = Progress(TextColumn("[progress.description]{task.description}"), BarColumn(),
                                    MofNCompleteColumn(), TextColumn("{task.fields[rate]}"), TimeRemainingColumn(),
                                    TextColumn("{task.fields[failed]}"), console=stderr, transient=True)
                task = progress.add_task("images", total=count, rate="", failed="")
                progress.start()
            for record in itertools.chain([first] if first is not None else [], produced):
                if not is_success(record):
                    failures += 1
                    warn(f"{_describe(record)}: {record['error']}")
                if streaming and is_success(record):
                    sys.stdout.write("\n")
                elif draw is not None:
                    if is_success(record):
                        draw(record, count + already_done > 1)
                else:
                    sink.write(record)
                if progress is not None:
                    done = progress.tasks[0].completed + 1
                    elapsed = progress.tasks[0].elapsed or 0
                    progress.update(task, advance=1, rate=f"{done / elapsed:.2f} img/s" if elapsed else "",
                                    failed=f"[red]{failures} failed[/red]" if failures else "")
            complete = True
        finally:
            if progress is not None:
                progress.stop()
            if sink is not None:
                sink.close(complete=complete)
    return EXIT_INPUT_FAILED if failures else 0
