"""A batch command (caption, ask, classify) from its jobs to its outputs: the run planned (api.batch.RunPlan:
resume, sharding, refusals, writers), the model opened only when there is work, its records written and shown."""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from llavanext_cli.api.batch import Job, RunPlan
from llavanext_cli.cli import out
from llavanext_cli.engine.figures import RunFigures
from llavanext_cli.errors import Terminated, say_how_to_go_on
from llavanext_cli.io.dataset_outputs import DataSetFlags
from llavanext_cli.io.records import JsonRecord, Record
from llavanext_cli.io.settings import Settings

if TYPE_CHECKING:
    from llavanext_cli.api.model import Model

# What a command's model makes of the jobs to run (`on_text`: a single answer, streamed to a terminal).
RecordsOf = Callable[["Model", list[Job], "Callable[[str], None] | None"], Iterator[Record]]


def command_model(settings: Settings, server: str | None = None) -> Any:
    """A command's model: nothing is read until it is opened (the collector's policy told when its weights load);
    with `server` (--server), the one a running `llava serve` holds, its key from LLAVA_API_KEY."""
    if server:
        import os

        from llavanext_cli.serve.client import RemoteModel

        return RemoteModel(server, settings, os.environ.get("LLAVA_API_KEY"))
    from llavanext_cli.api.model import Model
    from llavanext_cli.cli import collector

    return Model(settings, on_loaded=collector.model_loaded)


def open_model(model: Any, verbose: bool) -> Any:
    """The model of a command whose settings, inputs and output are checked: its config and processor read now (the
    weights load on first use, while the first inputs are prepared), the libraries quiet unless -v; a server's,
    reached now."""
    if getattr(model, "local", True):
        from llavanext_cli.model.loading import configure_library_logging

        configure_library_logging(verbose)
    return model.open()


def run_batch(model: Model, jobs: Sequence[Job], records_of: RecordsOf, *, output: Path | None, resume: bool,
              verbose: bool, data_set: DataSetFlags = DataSetFlags(),
              draw: Callable[[JsonRecord], None] | None = None, streams: bool = True) -> int:
    """Run the jobs to the output: on a terminal one answer streams as it is generated (where `streams`), or the
    command draws its own view of each record (`draw`); files and pipes get the records. The exit code."""
    settings = model.settings
    plan = RunPlan.decide(jobs, output=output, fmt=settings.format, resume=resume, data_set=data_set)
    try:
        for text in plan.warnings:
            out.warn(text)
        for text in plan.notes:
            out.note(text)
        for record in plan.placed.values():  # known before anything opens
            out.warn(f"{record.subject.describe()}: {record.error}")
        if plan.nothing_to_do and plan.group is None:
            out.note("Nothing to do: every input is done already.")
            return 0
        opened = open_model(model, verbose) if plan.todo else None
        on_terminal = output is None and plan.fmt == "text" and sys.stdout.isatty() and plan.group is None
        display = out.Display(
            streamed=(streams and on_terminal and draw is None and len(plan.positions) == 1 and opened is not None
                      and settings.num_beams == 1),
            draw=draw if on_terminal else None,
            progress=len(plan.positions) > 1 and out.stderr.is_terminal and plan.group is None,
        )
        made = records_of(opened, plan.todo, out.stream if display.streamed else None) if opened is not None else None
        figures = RunFigures() if verbose else None
        code = out.write_records(plan.records(made), plan.writers(), len(plan.positions), display,
                                 reported=list(plan.placed.values()), figures=figures)
        code, notes = plan.finish(code)
        for text in notes:
            out.note(text)
        if figures is not None and opened is not None and opened.checkpoint is not None:  # -v: the run's figures
            checkpoint = opened.checkpoint
            out.note(figures.summary(checkpoint.load_seconds, checkpoint.device_type))
        return code
    except (KeyboardInterrupt, Terminated) as stop:
        say_how_to_go_on(stop, plan.how_to_go_on())
        raise
    finally:
        plan.close()


def answering(model: Model, schema: Any) -> RecordsOf:
    """caption / ask: the schema and the generation settings checked now (exit 2 before anything opens), and what
    the model makes of the jobs."""
    _, _, answer_schema = model.check_answering(schema)

    def records_of(opened: Model, todo: list[Job], on_text: Callable[[str], None] | None) -> Iterator[Record]:
        return opened.answer(todo, schema=answer_schema, on_text=on_text)  # type: ignore[arg-type]

    return records_of
