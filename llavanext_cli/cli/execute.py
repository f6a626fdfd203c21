"""Running a batch command's jobs: the output checked and locked before the model loads, finished inputs skipped
(--resume; the training-set outputs: the images that have their caption file, their metadata.jsonl line), the
records written as they come by the one loop in
output.py (--sidecar: each caption file written there too); and, under `accelerate launch` / `torchrun`, each process
taking its share of the inputs into its own shard, merged by the main process at the end.

caption and ask come in through `answer`; classify calls `execute` with its own records."""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, Protocol

from llavanext_cli.cli.console import stderr, warn
from llavanext_cli.cli.output import Display, stream_to_stdout, write_records
from llavanext_cli.cli.run import Run, check_output, open_run
from llavanext_cli.io.dataset_outputs import DataSetFlags, ImageFolder, Sidecars
from llavanext_cli.errors import EXIT_INPUT_FAILED, Terminated, say_how_to_go_on
from llavanext_cli.engine.figures import RunFigures
from llavanext_cli.io.images import missing_file
from llavanext_cli.io.records import JsonRecord, Record, Subject, resume_key
from llavanext_cli.io.settings import Settings
from llavanext_cli.io.writers import (
    APPENDED_FORMATS, OutputLock, RecordSink, end_on_a_whole_line, format_for, read_finished_keys)


class Job(Protocol):
    subject: Subject  # what the job is about: its image, or images

    def key(self) -> str:
        """What --resume matches a finished record to this job by (`records.resume_key` of its record)."""


OnText = Callable[[str], None]
RecordsFor = Callable[[Run, list[Any], OnText | None], Iterator[Record]]


def answer(settings: Settings, jobs: Sequence[Job], output: Path | None, resume: bool, verbose: bool,
           schema: str | None = None, data_set: DataSetFlags = DataSetFlags()) -> int:
    """caption / ask: generate an answer for each job; with `schema` (--schema), a JSON answer valid against it."""
    from llavanext_cli.engine.answering import answer_jobs
    from llavanext_cli.engine.concurrency import resolve_workers
    from llavanext_cli.io.images import ImageFetching
    from llavanext_cli.engine.plan import GenerationOptions, check_combinations, plan_execution
    from llavanext_cli.io.sharding import data_parallel_from_env

    options = GenerationOptions.from_settings(settings)
    fetching = ImageFetching.from_settings(settings)
    answer_schema = None
    if schema is not None:  # read and checked now: a schema the decoder cannot enforce is exit 2 before any load
        from llavanext_cli.engine.structured import load_schema

        answer_schema = load_schema(schema)
    check_combinations(options, compile=settings.compile, workers=settings.workers, schema=answer_schema,
                       source=settings.sources.get("workers", "--workers"))

    def records_for(run: Run, todo: list[Any], on_text: OnText | None) -> Iterator[Record]:
        workers = resolve_workers(settings.workers, run.checkpoint.device_type, len(todo), options.seeded_sampling,
                                  settings.compile, data_parallel_from_env() is not None)
        plan = plan_execution(run.checkpoint, options, compile=settings.compile, workers=workers,
                              schema=answer_schema)
        # Compiled against the checkpoint's tokenizer, before its weights load.
        constraint = answer_schema.compile(run.checkpoint) if answer_schema is not None else None
        return answer_jobs(run.checkpoint, todo, plan, settings.batch_size, fetching, on_text,
                           fast_decode=settings.fast_decode, constraint=constraint)

    # A JSON answer is shown once it is whole: one cut short is an error, and its part must not reach stdout.
    return execute(settings, jobs, records_for, output, resume, verbose, data_set=data_set,
                   streams=answer_schema is None)


def execute(settings: Settings, jobs: Sequence[Job], records_for: RecordsFor, output: Path | None, resume: bool,
            verbose: bool, draw: Callable[[JsonRecord], None] | None = None,
            data_set: DataSetFlags = DataSetFlags(), streams: bool = True) -> int:
    """Run `records_for` over the jobs not yet done and write its records. On a terminal, one answer streams as it
    is generated (where `streams`), or a command draws its own display (`draw`); files and pipes get the records.
    `data_set`: the training-set outputs (caption files beside the images, an imagefolder's metadata.jsonl)."""
    from llavanext_cli.io.sharding import data_parallel_from_env

    fmt = format_for(settings.format, output)
    # Text lines name the prompt too when the jobs ask more than one (ask -q A -q B, --questions); so do the lines
    # of an imagefolder.
    several_prompts = len({getattr(job, "prompt", None) for job in jobs}) > 1
    sidecars, folder = data_set.outputs(fmt, output, several_prompts, resume)
    if sidecars is not None:
        sidecars.check_jobs(jobs)
    if folder is not None:
        folder.check_inputs(jobs)
        for other in folder.other_metadata():
            warn(f"{other} is there too: datasets refuses a folder whose metadata files are of different kinds")
    try:
        if data_parallel_from_env() is not None:
            return _execute_shard(settings, jobs, records_for, output, fmt, verbose, sidecars, folder)
        return _execute_here(settings, jobs, records_for, output, fmt, resume, verbose, draw, streams, several_prompts,
                             sidecars, folder)
    except (KeyboardInterrupt, Terminated) as stop:
        say_how_to_go_on(stop, _how_to_go_on(output, fmt, resume or data_parallel_from_env() is not None, sidecars))
        raise


def _how_to_go_on(output: Path | None, fmt: str, resumes: bool, sidecars: Sidecars | None) -> str:
    """What a run stopped by Ctrl-C or SIGTERM kept, and how to do the rest."""
    if output is not None and fmt in APPENDED_FORMATS:
        # an imagefolder's rerun is its resume, with or without --resume
        again = "run the same command again" if resumes or fmt == "imagefolder" else \
            "run the same command with --resume"
        return f"the finished records are in {output}: {again} to do the rest."
    if sidecars is not None:
        return ("the finished caption files are written: run the same command again to do the rest (an image that "
                "has its caption file is skipped).")
    if output is not None:
        return (f"{output} is written whole when a run ends, so it was not written; with -o FILE.jsonl a run keeps "
                "what it finished and --resume does the rest.")
    return "the records printed are finished."


def _execute_here(settings: Settings, jobs: Sequence[Job], records_for: RecordsFor, output: Path | None, fmt: str,
                  resume: bool, verbose: bool, draw: Callable[[JsonRecord], None] | None, streams: bool,
                  several_prompts: bool, sidecars: Sidecars | None, folder: ImageFolder | None) -> int:
    """A run in this process alone."""
    lock = check_output(output, fmt, resume)
    try:
        remaining = list(jobs)
        if resume and output is not None and folder is None:
            finished = read_finished_keys(output, resume_key)
            remaining = [job for job in jobs if job.key() not in finished]
            if len(remaining) < len(jobs):
                stderr.print(f"Resuming: {len(jobs) - len(remaining)} of {len(jobs)} already done in {output}.",
                             highlight=False)
        done = _training_outputs_done(sidecars, folder)
        todo_count = len(remaining)
        remaining = [job for job in remaining if not done(job)]
        if len(remaining) < todo_count:
            stderr.print(_skipped(todo_count - len(remaining), sidecars, folder), highlight=False)
        if not remaining:
            stderr.print("Nothing to do: every input is done already.", highlight=False)
            return 0
        placed, todo = _refused_up_front(remaining, sidecars)
        run = open_run(settings, verbose) if todo else None
        on_terminal = output is None and fmt == "text" and sys.stdout.isatty()
        display = Display(
            streamed=(streams and on_terminal and draw is None and len(remaining) == 1 and run is not None
                      and settings.num_beams == 1),
            draw=draw if on_terminal else None,
            progress=len(remaining) > 1 and stderr.is_terminal,
        )
        made = records_for(run, todo, stream_to_stdout if display.streamed else None) if run is not None else None
        sink = RecordSink(output, fmt, many=len(jobs) > 1, with_prompt=several_prompts, **_shape(folder))
        figures = RunFigures() if verbose else None
        code = write_records(_InPlace(placed, made), sink, len(remaining), display,
                             finish=sidecars.finish if sidecars is not None else None, reported=placed.values(),
                             figures=figures)
        if figures is not None and run is not None:  # -v: the run's figures, as its last line
            stderr.print(figures.summary(run.checkpoint.load_seconds, run.checkpoint.device_type), highlight=False)
        return code
    finally:
        try:
            if folder is not None:
                folder.keep_last_lines()  # --overwrite's new lines replace the old ones
        finally:
            if lock is not None:
                lock.release()


def _shape(folder: ImageFolder | None) -> dict[str, Any]:
    return {} if folder is None else {"shape": lambda record: folder.row(record.to_json())}


def _training_outputs_done(sidecars: Sidecars | None, folder: ImageFolder | None,
                           repair: bool = True) -> Callable[[Job], bool]:
    """Whether an input is done for the training-set outputs, so that a rerun is the resume: with --sidecar, its
    image has a caption file (which is never written over without --overwrite: it may have been edited by hand),
    else with --format imagefolder, it has its line in metadata.jsonl; with --overwrite, or without such outputs,
    none is."""
    if sidecars is not None:
        return lambda job: sidecars.has_caption(job.subject)
    if folder is not None:
        lines = folder.finished_keys(repair)
        return lambda job: folder.job_key(job) in lines
    return lambda job: False


def _skipped(count: int, sidecars: Sidecars | None, folder: ImageFolder | None) -> str:
    """What stderr says of the inputs skipped because their training-set outputs are there."""
    has = "a caption file (STEM.txt)" if sidecars is not None or folder is None else f"a line in {folder.metadata}"
    many = count != 1
    noun = "input" if sidecars is None and folder is not None and folder.with_prompt else "image"
    return (f"{count} {noun}{'s' if many else ''} already {'have' if many else 'has'} {has}, skipped; "
            f"--overwrite redoes {'them' if many else 'it'}.")


def _refused_up_front(jobs: Sequence[Job], sidecars: Sidecars | None) -> tuple[dict[int, Record], list[Job]]:
    """The jobs that fail before any work, as error records by their position, and the others, for the model: an
    input that is not there, and with --sidecar a URL or a folder that refuses a new file. Each is reported now,
    before the checkpoint is even opened (its record still comes in input order)."""
    refused = sidecars.refusals(job.subject for job in jobs) if sidecars is not None else {}
    for job in jobs:
        if job.subject not in refused:
            missing = [(image, why) for image in job.subject.images if (why := missing_file(image))]
            if missing:
                image, why = missing[0]
                refused[job.subject] = f"{image}: {why}" if job.subject.together else why
    placed: dict[int, Record] = {position: job.failure(refused[job.subject])
                                 for position, job in enumerate(jobs) if job.subject in refused}
    for record in placed.values():
        warn(f"{record.subject.describe()}: {record.error}")
    return placed, [job for job in jobs if job.subject not in refused]


class _InPlace:
    """The records of a run in input order: those decided before it (`placed`, by position) in their places among
    the model's (`made`, in order; None when the model has nothing to do). Closing it closes `made`."""

    def __init__(self, placed: dict[int, Record], made: Iterator[Record] | None):
        self._placed = dict(placed)
        self._made = made
        self._position = 0

    def __iter__(self) -> _InPlace:
        return self

    def __next__(self) -> Record:
        record = self._placed.pop(self._position, None)
        if record is None:
            if self._made is None:
                raise StopIteration
            record = next(self._made)
        self._position += 1
        return record

    def close(self) -> None:
        close = getattr(self._made, "close", None)
        if close is not None:
            close()


def _execute_shard(settings: Settings, jobs: Sequence[Job], records_for: RecordsFor, output: Path | None, fmt: str,
                   verbose: bool, sidecars: Sidecars | None, folder: ImageFolder | None) -> int:
    """One process of a data-parallel run. --resume is implied: whatever the output or any shard already holds
    is not redone, so a rerun after a crash completes the set. The shards hold records (with their inputs'
    positions); an imagefolder's lines are made from them at the merge. Each process writes the caption files of
    its own images (--sidecar)."""
    from llavanext_cli.io.sharding import (
        ProcessGroup, existing_shards, merge_shards, my_share, read_shard_records, require_jsonl_output, shard_path,
        shard_shape)

    output = folder.metadata if folder is not None else require_jsonl_output(output, fmt)
    # Writable? Checked in every process, locked by the main one only (below): a probe taking the lock, however
    # briefly, would make another process of the same run refuse the file as another run's.
    check_output(output, fmt, resume=False, lock=False)
    group = None
    locks: list[OutputLock] = []
    try:  # the group joined inside: whatever fails after, the locks go and the group is left
        group = ProcessGroup()
        locks.append(OutputLock(shard_path(output, group.rank)))
        if group.is_main:
            locks.append(OutputLock(output))
            end_on_a_whole_line(output)  # the shared output is repaired by one process, before any reads it
        group.wait_for_everyone()
        if folder is None:  # a jsonl output: what it holds is done
            key_of_job, key_of_record = (lambda job: job.key()), resume_key
            finished = read_finished_keys(output, resume_key, repair=False)
        else:  # an imagefolder: what has its line is done (_training_outputs_done)
            key_of_job, key_of_record, finished = folder.job_key, folder.record_key, set()
        for path in existing_shards(output):
            finished.update(key for key in map(key_of_record, read_shard_records(path)) if key is not None)
        mine = [(index, job) for index, job in my_share(jobs, group) if key_of_job(job) not in finished]
        done = _training_outputs_done(sidecars, folder, repair=False)
        kept = [(index, job) for index, job in mine if not done(job)]
        skipped, mine = len(mine) - len(kept), kept
        already = f" ({_skipped(skipped, sidecars, folder).rstrip('.')})" if skipped else ""
        stderr.print(f"llava: process {group.rank} of {group.world_size} takes {len(mine)} inputs{already}.",
                     highlight=False)
        failed = 0
        if mine:
            placed, todo = _refused_up_front([job for _, job in mine], sidecars)
            run = open_run(settings, verbose) if todo else None
            sink = RecordSink(shard_path(output, group.rank), "jsonl", many=True,
                              shape=shard_shape(index for index, _ in mine))
            made = records_for(run, todo, None) if run is not None else None
            failed = write_records(_InPlace(placed, made), sink, len(mine),
                                   finish=sidecars.finish if sidecars is not None else None, reported=placed.values())
        group.wait_for_everyone()
        if group.is_main:
            merged = folder.merge_shards() if folder is not None else merge_shards(output)
            if folder is not None:
                folder.keep_last_lines()
            failed = sum(1 for record in merged if "error" in record)
            stderr.print(f"llava: merged {len(merged)} records from {group.world_size} processes into {output}.",
                         highlight=False)
        return EXIT_INPUT_FAILED if failed else 0
    finally:
        for lock in locks:
            lock.release()
        if group is not None:
            group.close()
