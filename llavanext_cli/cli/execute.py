"""Running a batch command's jobs: the output checked and locked before the model loads, finished inputs skipped
(--resume), records written as they come; and, under `accelerate launch` / `torchrun`, each process taking its
share of the inputs into its own shard, merged by the main process at the end."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import closing
from pathlib import Path
from typing import Any

from llavanext_cli.cli.console import stderr
from llavanext_cli.cli.output import write_records
from llavanext_cli.cli.setup import Run, check_output, open_run
from llavanext_cli.errors import EXIT_INPUT_FAILED
from llavanext_cli.records import Record, format_for, read_finished_keys
from llavanext_cli.settings import Settings

RecordsFor = Callable[[Run, list, Callable[[str], None] | None], Iterator[Record]]


def execute(settings: Settings, jobs: Sequence[Any], job_key: Callable[[Any], str],
            record_key: Callable[[Record], str | None], records_for: RecordsFor, output: Path | None, resume: bool,
            verbose: bool, render_text: Callable[[Record, bool], None] | None = None, compile: bool = False,
            max_memory: str | None = None) -> int:
    from llavanext_cli.loading import parse_max_memory
    from llavanext_cli.sharding import data_parallel_from_env

    limits = parse_max_memory(max_memory) if max_memory else None
    fmt = format_for(settings.format, output)
    parallel = data_parallel_from_env()
    if parallel is not None:
        return _execute_sharded(parallel, settings, jobs, job_key, record_key, records_for, output, fmt, verbose,
                                compile, limits)
    lock = check_output(output, fmt, resume)
    try:
        remaining = list(jobs)
        if resume and output is not None:
            finished = read_finished_keys(output, record_key)
            remaining = [job for job in jobs if job_key(job) not in finished]
            if len(remaining) < len(jobs):
                stderr.print(f"Resuming: {len(jobs) - len(remaining)} of {len(jobs)} already done in {output}.",
                             highlight=False)
        if not remaining:
            stderr.print("Nothing to do: every input already has a record.", highlight=False)
            return 0
        run = open_run(settings, output, verbose, compile, limits)
        return write_records(run, lambda on_text: records_for(run, remaining, on_text), len(remaining),
                             already_done=len(jobs) - len(remaining), render_text=render_text)
    finally:
        if lock is not None:
            lock.release(remove_if_empty=True)


def _execute_sharded(parallel, settings: Settings, jobs: Sequence[Any], job_key, record_key, records_for,
                     output: Path | None, fmt: str, verbose: bool, compile: bool, limits) -> int:
    """One process of a data-parallel run. --resume is implied: whatever the output or any shard already holds
    is not redone, so a rerun after a crash completes the set."""
    from llavanext_cli.records import OutputLock, RecordSink, is_success
    from llavanext_cli.sharding import (
        ProcessGroup, existing_shards, is_mine, merge_shards, read_shard_records, require_jsonl_output, shard_path,
        with_index)

    output = require_jsonl_output(output, fmt)
    check_output(output, fmt, resume=False).release()  # writable? (the main process locks it below)
    group = ProcessGroup(parallel)
    locks = [OutputLock(shard_path(output, parallel.rank))]
    if parallel.is_main:
        locks.append(OutputLock(output))
    try:
        finished = read_finished_keys(output, record_key)
        for path in existing_shards(output):
            finished.update(key for key in map(record_key, read_shard_records(path)) if key is not None)
        mine = [(index, job) for index, job in enumerate(jobs)
                if is_mine(index, parallel) and job_key(job) not in finished]
        stderr.print(f"llava: process {parallel.rank} of {parallel.world_size} takes {len(mine)} inputs.",
                     highlight=False)
        failures = 0
        if mine:
            run = open_run(settings, None, verbose, compile, limits)
            sink = RecordSink(shard_path(output, parallel.rank), "jsonl", many=True)
            complete = False
            # closing(): the pipeline's threads stop before this process goes on (see write_records)
            with closing(records_for(run, [job for _, job in mine], None)) as produced:
                try:
                    for record in with_index([i for i, _ in mine], produced):
                        failures += not is_success(record)
                        sink.write(record)
                    complete = True
                finally:
                    sink.close(complete)
        group.wait_for_everyone()
        if parallel.is_main:
            merged = merge_shards(output)
            failures = sum(1 for record in merged if not is_success(record))
            stderr.print(f"llava: merged {len(merged)} records from {parallel.world_size} processes into {output}.",
                         highlight=False)
        return EXIT_INPUT_FAILED if failures else 0
    finally:
        for lock in locks:
            lock.release()
        group.close()
