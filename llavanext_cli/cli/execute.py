"""Running a batch command's jobs: the output checked and locked before the model loads, finished inputs skipped
(--resume), the records written as they come by the one loop in output.py; and, under `accelerate launch` /
`torchrun`, each process taking its share of the inputs into its own shard, merged by the main process at the end.

caption and ask come in through `answer`; classify calls `execute` with its own records."""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, Protocol

from llavanext_cli.cli.console import stderr
from llavanext_cli.cli.output import Display, stream_to_stdout, write_records
from llavanext_cli.cli.run import Run, check_output, open_run
from llavanext_cli.errors import EXIT_INPUT_FAILED
from llavanext_cli.records import JsonRecord, Record, Subject, resume_key
from llavanext_cli.settings import Settings
from llavanext_cli.writers import OutputLock, RecordSink, format_for, read_finished_keys


class Job(Protocol):
    subject: Subject  # what the job is about: its image, or images

    def key(self) -> str:
        """What --resume matches a finished record to this job by (`records.resume_key` of its record)."""


OnText = Callable[[str], None]
RecordsFor = Callable[[Run, list[Any], OnText | None], Iterator[Record]]


def answer(settings: Settings, jobs: Sequence[Job], output: Path | None, resume: bool, verbose: bool) -> int:
    """caption / ask: generate an answer for each job."""
    from llavanext_cli.answering import answer_jobs
    from llavanext_cli.concurrency import check_workers, resolve_workers
    from llavanext_cli.images import ImageFetching
    from llavanext_cli.sharding import data_parallel_from_env

    seeded_sampling = settings.seed is not None and settings.temperature > 0
    check_workers(settings.workers, seeded_sampling, settings.compile,
                  source=settings.sources.get("workers", "--workers"))
    fetching = ImageFetching.from_settings(settings)

    def records_for(run: Run, todo: list[Any], on_text: OnText | None) -> Iterator[Record]:
        workers = resolve_workers(settings.workers, run.checkpoint.device_type, len(todo), seeded_sampling,
                                  settings.compile, data_parallel_from_env() is not None)
        return answer_jobs(run.checkpoint, todo, run.generation, settings.batch_size, fetching, on_text,
                           fast_decode=settings.fast_decode, workers=workers)

    return execute(settings, jobs, records_for, output, resume, verbose)


def execute(settings: Settings, jobs: Sequence[Job], records_for: RecordsFor, output: Path | None, resume: bool,
            verbose: bool, draw: Callable[[JsonRecord], None] | None = None) -> int:
    """Run `records_for` over the jobs not yet done and write its records. On a terminal, one answer streams as it
    is generated, or a command draws its own display (`draw`); files and pipes get the records."""
    from llavanext_cli.sharding import data_parallel_from_env

    fmt = format_for(settings.format, output)
    if data_parallel_from_env() is not None:
        return _execute_shard(settings, jobs, records_for, output, fmt, verbose)
    lock = check_output(output, fmt, resume)
    try:
        remaining = list(jobs)
        if resume and output is not None:
            finished = read_finished_keys(output, resume_key)
            remaining = [job for job in jobs if job.key() not in finished]
            if len(remaining) < len(jobs):
                stderr.print(f"Resuming: {len(jobs) - len(remaining)} of {len(jobs)} already done in {output}.",
                             highlight=False)
        if not remaining:
            stderr.print("Nothing to do: every input already has a record.", highlight=False)
            return 0
        run = open_run(settings, verbose)
        on_terminal = output is None and fmt == "text" and sys.stdout.isatty()
        display = Display(
            streamed=on_terminal and draw is None and len(remaining) == 1 and run.generation.num_beams == 1,
            draw=draw if on_terminal else None,
            progress=len(remaining) > 1 and stderr.is_terminal,
        )
        records = records_for(run, remaining, stream_to_stdout if display.streamed else None)
        # Text lines name the prompt too when the jobs ask more than one (ask -q A -q B, --questions).
        several_prompts = len({getattr(job, "prompt", None) for job in jobs}) > 1
        sink = RecordSink(output, fmt, many=len(jobs) > 1, with_prompt=several_prompts)
        return write_records(records, sink, len(remaining), display)
    finally:
        if lock is not None:
            lock.release()


def _execute_shard(settings: Settings, jobs: Sequence[Job], records_for: RecordsFor, output: Path | None, fmt: str,
                   verbose: bool) -> int:
    """One process of a data-parallel run. --resume is implied: whatever the output or any shard already holds
    is not redone, so a rerun after a crash completes the set."""
    from llavanext_cli.sharding import (
        ProcessGroup, existing_shards, merge_shards, my_share, read_shard_records, require_jsonl_output, shard_path,
        shard_shape)

    output = require_jsonl_output(output, fmt)
    probe = check_output(output, fmt, resume=False)  # writable? (the main process locks it below)
    if probe is not None:
        probe.release()
    group = ProcessGroup()
    locks = [OutputLock(shard_path(output, group.rank))]
    if group.is_main:
        locks.append(OutputLock(output))
    try:
        finished = read_finished_keys(output, resume_key)
        for path in existing_shards(output):
            finished.update(key for key in map(resume_key, read_shard_records(path)) if key is not None)
        mine = [(index, job) for index, job in my_share(jobs, group) if job.key() not in finished]
        stderr.print(f"llava: process {group.rank} of {group.world_size} takes {len(mine)} inputs.", highlight=False)
        failed = 0
        if mine:
            run = open_run(settings, verbose)
            sink = RecordSink(shard_path(output, group.rank), "jsonl", many=True,
                              shape=shard_shape(index for index, _ in mine))
            failed = write_records(records_for(run, [job for _, job in mine], None), sink, len(mine))
        group.wait_for_everyone()
        if group.is_main:
            merged = merge_shards(output)
            failed = sum(1 for record in merged if "error" in record)
            stderr.print(f"llava: merged {len(merged)} records from {group.world_size} processes into {output}.",
                         highlight=False)
        return EXIT_INPUT_FAILED if failed else 0
    finally:
        for lock in locks:
            lock.release()
        group.close()
