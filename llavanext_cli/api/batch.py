"""A batch command's run to its outputs (caption, ask, classify), decided once, for a run in one process and for one
process of a data-parallel run alike, before any weight loads:

- the output checked and locked (a second run on the same file refuses), a data-parallel run's shared output
  repaired by its main process only;
- which jobs this process runs: its share (every N-th image under `accelerate launch`), less those done already
  (`--resume`, and for the training-set outputs, an image that has its caption file or its metadata line: a rerun
  is the resume; "done" is `records.input_key`, one definition for all), less those that fail up front (a missing
  input; with --sidecar a URL or a folder that refuses a file);
- where the records go: the writers (a format's sink, a shard, an imagefolder's metadata; caption files beside the
  images ahead of them);
- what is said of it (resuming, skipped, nothing to do), and at the end, a data-parallel run's merge.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from llavanext_cli.errors import EXIT_INPUT_FAILED
from llavanext_cli.io.dataset_outputs import DataSetFlags, ImageFolder, ImageFolderSink, Sidecars
from llavanext_cli.io.formats import APPENDED_FORMATS, format_for
from llavanext_cli.io.images import missing_file
from llavanext_cli.io.records import Record, Subject, resume_key
from llavanext_cli.io.writers import (
    OutputLock, RecordSink, Writer, check_output, end_on_a_whole_line, read_finished_keys)


class Job(Protocol):
    subject: Subject  # what the job is about: its image, or images

    def key(self) -> str:
        """Its input (`records.input_key`): what a finished record answering it is matched by."""

    def failure(self, message: str) -> Record:
        """The job's error record."""


@dataclass
class RunPlan:
    """One batch run's decisions (see the module's docstring); `decide` makes it, `records` and `writers` run it,
    `finish` ends it (the merge of a data-parallel run) and `close` lets go of the locks."""

    jobs: Sequence[Job]
    output: Path | None
    fmt: str
    resume: bool
    several_prompts: bool
    sidecars: Sidecars | None
    folder: ImageFolder | None
    group: Any = None                                   # the data-parallel process group, where there is one
    positions: list[int] = field(default_factory=list)  # the jobs this process makes a record of, by position
    todo: list[Job] = field(default_factory=list)        # those the model runs
    placed: dict[int, Record] = field(default_factory=dict)  # those that fail up front, by their place in `positions`
    notes: list[str] = field(default_factory=list)       # what stderr says before the run
    warnings: list[str] = field(default_factory=list)    # and what it warns about
    locks: list[OutputLock] = field(default_factory=list)

    @classmethod
    def decide(cls, jobs: Sequence[Job], *, output: Path | None, fmt: str | None, resume: bool,
               data_set: DataSetFlags = DataSetFlags()) -> RunPlan:
        from llavanext_cli.io.sharding import data_parallel_from_env

        fmt = format_for(fmt, output)
        # Text lines name the prompt too when the jobs ask more than one (ask -q A -q B, --questions); so do the
        # lines of an imagefolder.
        several_prompts = len({getattr(job, "prompt", None) for job in jobs}) > 1
        sidecars, folder = data_set.outputs(fmt, output, several_prompts, resume)
        if sidecars is not None:
            sidecars.check_jobs(jobs)
        plan = cls(jobs, output, fmt, resume, several_prompts, sidecars, folder)
        if folder is not None:
            folder.check_inputs(jobs)
            plan.warnings += [f"{other} is there too: datasets refuses a folder whose metadata files are of different "
                              "kinds" for other in folder.other_metadata()]
        try:
            if data_parallel_from_env() is not None:
                plan._share()
            else:
                plan._alone()
            plan._refuse_up_front()
        except BaseException:
            plan.close()
            raise
        return plan

    # -- deciding ------------------------------------------------------------------------------------------------
    def _alone(self) -> None:
        lock = check_output(self.output, self.fmt, self.resume)
        if lock is not None:
            self.locks.append(lock)
        jobs = list(self.jobs)
        positions = list(range(len(jobs)))
        if self.resume and self.output is not None and self.folder is None:
            finished = read_finished_keys(self.output, resume_key)
            positions = [i for i in positions if jobs[i].key() not in finished]
            if len(positions) < len(jobs):
                self.notes.append(f"Resuming: {len(jobs) - len(positions)} of {len(jobs)} already done in "
                                  f"{self.output}.")
        self.positions = self._not_done(positions, repair=True)

    def _share(self) -> None:
        """One process of a data-parallel run: --resume is implied (whatever the output or any shard holds is not
        redone, so a rerun after a crash completes the set)."""
        from llavanext_cli.io.sharding import (
            ProcessGroup, existing_shards, my_share, read_shard_records, require_jsonl_output, shard_path)

        output = self.folder.metadata if self.folder is not None else require_jsonl_output(self.output, self.fmt)
        # Writable? Checked in every process, locked by the main one only: a probe taking the lock, however briefly,
        # would make another process of the same run refuse the file as another run's.
        check_output(output, self.fmt, resume=False, lock=False)
        self.group = group = ProcessGroup()
        self.locks.append(OutputLock(shard_path(output, group.rank)))
        if group.is_main:
            self.locks.append(OutputLock(output))
            end_on_a_whole_line(output)  # the shared output is repaired by one process, before any reads it
        group.wait_for_everyone()
        if self.folder is None:  # a jsonl output: what it holds is done
            key_of_record = resume_key
            finished = read_finished_keys(output, resume_key, repair=False)
        else:  # an imagefolder: what has its line is done (`_not_done`)
            key_of_record, finished = self.folder.record_key, set()
        for path in existing_shards(output):
            finished.update(key for key in map(key_of_record, read_shard_records(path)) if key is not None)
        key_of_job = (lambda job: job.key()) if self.folder is None else self.folder.job_key
        mine = [index for index, job in my_share(self.jobs, group) if key_of_job(job) not in finished]
        self.positions = self._not_done(mine, repair=False)
        skipped = len(mine) - len(self.positions)
        already = f" ({self._skipped(skipped).rstrip('.')})" if skipped else ""
        self.notes.append(f"llava: process {group.rank} of {group.world_size} takes {len(self.positions)} "
                          f"inputs{already}.")

    def _not_done(self, positions: list[int], repair: bool) -> list[int]:
        """Less the inputs whose training-set outputs are there, so that a rerun is the resume: with --sidecar, an
        image that has its caption file (never written over without --overwrite: it may have been edited by hand),
        else with --format imagefolder, an input that has its line in metadata.jsonl."""
        if self.sidecars is not None:
            def done(job: Job) -> bool:
                return self.sidecars.has_caption(job.subject)  # type: ignore[union-attr]
        elif self.folder is not None:
            lines = self.folder.finished_keys(repair)

            def done(job: Job) -> bool:
                return self.folder.job_key(job) in lines  # type: ignore[union-attr]
        else:
            return positions
        kept = [index for index in positions if not done(self.jobs[index])]
        if len(kept) < len(positions) and self.group is None:
            self.notes.append(self._skipped(len(positions) - len(kept)))
        return kept

    def _skipped(self, count: int) -> str:
        """What stderr says of the inputs skipped because their training-set outputs are there."""
        sidecars, folder = self.sidecars, self.folder
        has = "a caption file (STEM.txt)" if sidecars is not None or folder is None else f"a line in {folder.metadata}"
        many = count != 1
        noun = "input" if sidecars is None and folder is not None and folder.with_prompt else "image"
        return (f"{count} {noun}{'s' if many else ''} already {'have' if many else 'has'} {has}, skipped; "
                f"--overwrite redoes {'them' if many else 'it'}.")

    def _refuse_up_front(self) -> None:
        """The jobs that fail before any work (an input that is not there; with --sidecar a URL or a folder that
        refuses a new file) become error records in their places; the others are for the model."""
        mine = [self.jobs[index] for index in self.positions]
        refused = self.sidecars.refusals(job.subject for job in mine) if self.sidecars is not None else {}
        for job in mine:
            if job.subject not in refused:
                missing = [(image, why) for image in job.subject.images if (why := missing_file(image))]
                if missing:
                    image, why = missing[0]
                    refused[job.subject] = f"{image}: {why}" if job.subject.together else why
        self.placed = {place: job.failure(refused[job.subject]) for place, job in enumerate(mine)
                       if job.subject in refused}
        self.todo = [job for job in mine if job.subject not in refused]

    # -- running ---------------------------------------------------------------------------------------------------
    @property
    def nothing_to_do(self) -> bool:
        return not self.positions

    @property
    def many(self) -> bool:
        return len(self.jobs) > 1

    def writers(self) -> list[Writer]:
        """Where each record goes, in turn: the caption files beside the images, then the output (a shard under
        `accelerate launch`, an imagefolder's metadata, or the format's sink)."""
        from llavanext_cli.io.sharding import ShardSink, shard_path

        ahead: list[Writer] = [self.sidecars] if self.sidecars is not None else []
        if self.group is not None:
            output = self.folder.metadata if self.folder is not None else self.output
            return [*ahead, ShardSink(shard_path(output, self.group.rank), self.positions)]  # type: ignore[arg-type]
        if self.folder is not None:
            return [*ahead, ImageFolderSink(self.folder)]
        return [*ahead, RecordSink(self.output, self.fmt, many=self.many, with_prompt=self.several_prompts)]

    def records(self, made: Iterator[Record] | None) -> Iterator[Record]:
        """This process's records in input order: those decided up front in their places among the model's (`made`,
        for `todo`, in order). Closing it closes `made`."""
        return _InPlace(self.placed, made)

    def finish(self, code: int) -> tuple[int, list[str]]:
        """The run's end: a data-parallel run waits for every process and its main one merges the shards (its exit
        code then counts the failures of all); an imagefolder keeps one line per input (--overwrite's new ones)."""
        if self.group is None:
            return code, []  # an imagefolder's lines are tidied in `close`, however the run ended
        self.group.wait_for_everyone()
        if not self.group.is_main:
            return code, []
        from llavanext_cli.io.sharding import merge_shards

        output = self.folder.metadata if self.folder is not None else self.output
        merged = self.folder.merge_shards() if self.folder is not None else merge_shards(output)  # type: ignore
        if self.folder is not None:
            self.folder.keep_last_lines()
        code = EXIT_INPUT_FAILED if any("error" in record for record in merged) else 0
        return code, [f"llava: merged {len(merged)} records from {self.group.world_size} processes into {output}."]

    def close(self) -> None:
        """Let go of the locks and the process group, however the run ended."""
        try:
            if self.folder is not None and self.group is None:
                self.folder.keep_last_lines()  # an interrupted run's new lines replace the old ones too
        finally:
            for lock in self.locks:
                lock.release()
            self.locks = []
            if self.group is not None:
                self.group.close()
                self.group = None

    def how_to_go_on(self) -> str:
        """What a run stopped by Ctrl-C or SIGTERM kept, and how to do the rest."""
        output, fmt = self.output, self.fmt
        if output is not None and fmt in APPENDED_FORMATS:
            # a rerun is the resume of an imagefolder and of a data-parallel run, with or without --resume
            again = "run the same command again" if self.resume or fmt == "imagefolder" or self.group is not None \
                else "run the same command with --resume"
            return f"the finished records are in {output}: {again} to do the rest."
        if self.sidecars is not None:
            return ("the finished caption files are written: run the same command again to do the rest (an image that "
                    "has its caption file is skipped).")
        if output is not None:
            return (f"{output} is written whole when a run ends, so it was not written; with -o FILE.jsonl a run keeps "
                    "what it finished and --resume does the rest.")
        return "the records printed are finished."


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
