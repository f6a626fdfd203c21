"""caption / ask over many inputs: load, render, generate in batches, one record per job in input order."""

from __future__ import annotations

import io
import json
import os
import threading
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, TextIO

from llavanext_cli.model.checkpoint import Checkpoint
from llavanext_cli.errors import InputError, InputWarning, UsageError
from llavanext_cli.engine.generation import generate
from llavanext_cli.io.images import ImageFetching, is_url
from llavanext_cli.engine.plan import ExecutionPlan
from llavanext_cli.model.prompts import single_image_conversation
from llavanext_cli.io.records import MADE_KEYS, NO_DATA, Answer, Failure, Record, Subject, answer_key
from llavanext_cli.io.textfiles import read_text


@dataclass(frozen=True)
class PromptJob:
    """One question about one image, or (`subject.together`) about several images at once; `extra` holds the
    other keys of a --questions line, copied into the record."""

    subject: Subject
    prompt: str
    extra: dict[str, Any] = field(default_factory=dict)

    def key(self) -> str:
        return answer_key(self.subject, self.prompt)

    def failure(self, message: str) -> Failure:
        return Failure(self.subject, message, self.extra)


def _load_job_images(job: PromptJob, fetching: ImageFetching, draft_edge: int | None) -> list[Any]:
    images = []
    for source in job.subject.images:
        try:
            images.append(fetching.load(source, draft_edge))
        except InputError as exc:
            raise InputError(f"{source}: {exc.message}" if job.subject.together else exc.message) from exc
    return images


@dataclass
class _PreparedBatch:
    failed: dict[int, Record]                        # inputs that failed to load, by job index
    ready: list[tuple[int, PromptJob, list[Any]]]    # (job index, job, images)
    prompts: list[str]
    inputs: Any                                      # the processor's tensors, or None


@dataclass
class _PreparedGroup:
    """Several questions about the same images: the images loaded and preprocessed once, the prompts' shared
    beginning to be encoded once."""

    indices: list[int]
    shared: Any                                      # prefix_cache.SharedPrompts


def group_by_subject(jobs: Sequence[PromptJob]) -> list[list[int]]:
    """The job indices of each subject (the same image, or the same images together), in order of first appearance
    (a --questions file may name an image on lines far apart)."""
    groups: dict[Subject, list[int]] = {}
    for index, job in enumerate(jobs):
        groups.setdefault(job.subject, []).append(index)
    return list(groups.values())


@dataclass(frozen=True)
class Unit:
    """A unit of work: the jobs of one subject asked several questions (`shared`), or a batch of other jobs."""

    indices: list[int]
    shared: bool


def plan_units(jobs: Sequence[PromptJob], counts_of: Callable[[list[int]], list[int]], batch_size: int,
               tolerance: float, share: bool) -> list[Unit]:
    """The units of work, in order of their first job: each subject asked several questions is one unit (its image
    shared by its prompts); the other jobs are batched by image-token count as usual (`counts_of`: the counts of
    the jobs at these indices, asked for those jobs only)."""
    from llavanext_cli.engine.pipeline import plan_batches

    groups = group_by_subject(jobs) if share else [[index] for index in range(len(jobs))]
    several = [Unit(group, shared=True) for group in groups if len(group) > 1]
    singles = [group[0] for group in groups if len(group) == 1]
    batches = [Unit([singles[i] for i in batch], shared=False)
               for batch in plan_batches(counts_of(singles), batch_size, tolerance)]
    return sorted(several + batches, key=lambda unit: min(unit.indices))


def answer_jobs(
    checkpoint: Checkpoint,
    jobs: Sequence[PromptJob],
    plan: ExecutionPlan,
    batch_size: int = 1,
    fetching: ImageFetching = ImageFetching(),
    on_text: Callable[[str], None] | None = None,
    fast_decode: bool = False,
    prefetch: bool = True,
    constraint: Any = None,
) -> Iterator[Record]:
    """Yield one record per job, in order; an unreadable image is an error record and the others go on.

    Questions about the same image(s) form one unit: the image is loaded and preprocessed once, and the prompts'
    shared beginning (the image's tokens included) runs through the model once, each prompt continuing from a copy
    of its cache (`batch_size` prompts at a time). Other jobs are batched by image-token count. The next units are
    loaded and preprocessed in the background (with a processor of that thread's own) while the model loads and
    generates, and the plan's workers generate that many units at once. `on_text` receives the answer as it is
    generated (one job only). With `constraint` (--schema), the schema goes to the model after each question and
    each answer is JSON valid against it, or an error record. Sampling with --seed, each job draws from its own
    random stream (a batch of several, from its first job's)."""
    from llavanext_cli.engine.pipeline import prefetch_depth, run_pipelined, token_counts
    from llavanext_cli.model.preprocessing import largest_model_edge, prepare_inputs

    processor = checkpoint.preparing_processor  # made here, on this thread, before the background one starts
    draft_edge = largest_model_edge(processor.image_processor) if fast_decode else None
    on_cpu = checkpoint.device_type == "cpu"
    # On a GPU a little padding costs less than a smaller batch; on a CPU every padded token is paid in full.
    tolerance = 0.0 if on_cpu else 0.1
    units = plan_units(jobs, lambda indices: token_counts(processor, [jobs[i].subject.images for i in indices],
                                                          batch_size),
                       batch_size, tolerance, share=plan.share_prefixes)
    workers = max(1, min(plan.workers, len(units)))
    cancelled = threading.Event()
    if on_cpu:  # before any worker thread starts: each thread takes torch's thread count when it first runs
        from llavanext_cli.engine.concurrency import use_cpu_cores

        use_cpu_cores(workers)

    def render(job: PromptJob, images: list[Any]) -> str:
        text = constraint.schema.prompt(job.prompt) if constraint is not None else job.prompt
        return checkpoint.prompt.format.render(single_image_conversation(text, len(images)))

    def record(job: PromptJob, result: Any) -> Record:
        if result.error is not None:
            return Failure(job.subject, result.error, job.extra)
        return Answer(job.subject, job.prompt, result.text, checkpoint.model_id, result.new_tokens, result.seconds,
                      job.extra, data=result.data if constraint is not None else NO_DATA,
                      prompt_tokens=result.prompt_tokens)

    def prepare_batch(indices: list[int], loaded: dict[int, list[Any]]) -> _PreparedBatch:
        failed: dict[int, Record] = {}
        ready = []
        for index in indices:
            job = jobs[index]
            try:
                images = loaded[index] if index in loaded else _load_job_images(job, fetching, draft_edge)
                ready.append((index, job, images))
            except InputError as exc:
                failed[index] = Failure(job.subject, exc.message, job.extra)
        prompts = [render(job, images) for _, job, images in ready]
        inputs = prepare_inputs(processor, prompts, [images for _, _, images in ready]) if ready else None
        return _PreparedBatch(failed, ready, prompts, inputs)

    def prepare(unit: Unit) -> list[_PreparedBatch | _PreparedGroup]:
        indices = unit.indices
        if not unit.shared:
            return [prepare_batch(indices, {})]
        from llavanext_cli.engine.prefix_cache import prepare_shared

        first = jobs[indices[0]]
        try:
            images = _load_job_images(first, fetching, draft_edge)
        except InputError as exc:
            return [_PreparedBatch({i: Failure(jobs[i].subject, exc.message, jobs[i].extra) for i in indices}, [],
                                   [], None)]
        shared = prepare_shared(processor, [render(jobs[i], images) for i in indices], images)
        if shared is None:  # the prompts cannot share their beginning: one at a time, the images loaded once
            return [prepare_batch([index], {index: images}) for index in indices]
        return [_PreparedGroup(indices, shared)]

    def run(prepared: list[_PreparedBatch | _PreparedGroup]) -> Iterator[tuple[int, Record]]:
        checkpoint.load()  # the weights load on first use: a checkpoint that fails to load writes no record
        for part in prepared:
            if isinstance(part, _PreparedGroup):
                yield from _run_group(part)
            else:
                yield from _run_batch(part)

    def _run_group(group: _PreparedGroup) -> Iterator[tuple[int, Record]]:
        from llavanext_cli.engine.prefix_cache import generate_shared

        results = generate_shared(checkpoint, group.shared, plan, rows_per_pass=batch_size, cancelled=cancelled,
                                  constraint=constraint, seeds=[plan.seed_for(jobs[i].key()) for i in group.indices])
        for index, result in zip(group.indices, results):
            yield index, record(jobs[index], result)

    def _run_batch(batch: _PreparedBatch) -> Iterator[tuple[int, Record]]:
        yield from batch.failed.items()
        if not batch.ready:
            return
        results = generate(checkpoint, batch.prompts, [images for _, _, images in batch.ready], plan,
                           on_text=on_text if len(jobs) == 1 else None, inputs=batch.inputs, cancelled=cancelled,
                           constraint=constraint, seed=plan.seed_for(batch.ready[0][1].key()))
        for (index, job, _), result in zip(batch.ready, results):
            yield index, record(job, result)

    yield from run_pipelined(prepare, run, units, prefetch=prefetch, workers=workers,
                             depth=prefetch_depth(batch_size, workers), cancelled=cancelled)


def read_question_jobs(stream: TextIO, name: str, folder: str = "") -> list[PromptJob]:
    """`ask --questions`: one JSON object a line with "image" or "images" and "question"; other keys are kept
    and copied into the record, except those named like the record's own (a warning says which). A malformed line
    is a usage error naming the line. A relative image path is relative to `folder` (the file's, as the user spelled
    it; "" for stdin: the current directory), and is named so in its record, as a directory's files are
    (`data/vqa.jsonl`'s `img/1.jpg` is `data/img/1.jpg`)."""

    def located(image: str) -> str:
        return image if not folder or is_url(image) or os.path.isabs(image) else os.path.join(folder, image)

    jobs = []
    not_copied: set[str] = set()
    for number, line in enumerate(stream, start=1):
        if not line.strip():
            continue
        where = f"{name}:{number}"
        try:
            item = json.loads(line)
        except ValueError as exc:
            raise UsageError(f"{where}: not a JSON object ({exc.msg})") from exc
        if not isinstance(item, dict):
            raise UsageError(f"{where}: expected a JSON object")
        question = item.get("question")
        if not isinstance(question, str) or not question.strip():
            raise UsageError(f"{where}: needs a non-empty \"question\" string")
        if ("image" in item) == ("images" in item):
            raise UsageError(f"{where}: needs exactly one of \"image\" or \"images\"")
        if "image" in item:
            if not isinstance(item["image"], str) or not item["image"]:
                raise UsageError(f"{where}: \"image\" must be a path or URL string")
            subject = Subject.of(located(item["image"]))
        else:
            value = item["images"]
            if not isinstance(value, list) or not value or not all(isinstance(v, str) and v for v in value):
                raise UsageError(f"{where}: \"images\" must be a non-empty list of paths or URLs")
            subject = Subject(tuple(map(located, value)), together=True)
        extra = {k: v for k, v in item.items() if k not in ("image", "images", "question")}
        not_copied.update(key for key in extra if key in MADE_KEYS)
        jobs.append(PromptJob(subject, question, extra))
    if not jobs:
        raise UsageError(f"{name}: no questions")
    if not_copied:
        keys = ", ".join(f'"{key}"' for key in sorted(not_copied))
        warnings.warn(f"{name}: {keys} {'is a key' if len(not_copied) == 1 else 'are keys'} of the records this "
                      "command writes, not copied from the questions file (rename to keep)", InputWarning,
                      stacklevel=2)
    return jobs


def open_questions(path: str, stdin: TextIO) -> list[PromptJob]:
    if path == "-":
        return read_question_jobs(stdin, "<stdin>")
    return read_question_jobs(io.StringIO(read_text(path, "questions file")), path, os.path.dirname(path))
