"""caption / ask over many inputs: load, render, generate in batches, one record per job in input order."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from llavanext_cli.model.checkpoint import Checkpoint
from llavanext_cli.errors import InputError
from llavanext_cli.engine.generation import generate
from llavanext_cli.io.images import ImageFetching
from llavanext_cli.engine.plan import ExecutionPlan
from llavanext_cli.model.prompts import single_image_conversation
from llavanext_cli.io.questions import PromptJob
from llavanext_cli.io.records import NO_DATA, Answer, Record, Subject


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


class AnswerEngine:
    """caption / ask over many jobs, in named steps: `units` (questions about the same images form one unit, whose
    image is loaded, preprocessed and encoded once, its prompts continuing from that prefix; other jobs are batched
    by image-token count), `prepare` (images loaded and decoded, prompts rendered, tensors made: CPU work, done in
    the background, with a processor of that thread's own, while the model loads and generates), `run` (the model's
    work on a prepared unit, on the plan's workers), `record` (each result as the job's record). `answer` drives them
    through the pipeline and yields one record per job, in input order; an unreadable image is an error record and
    the others go on.

    `on_text` receives the answer as it is generated (one job only). With `constraint` (--schema), the schema goes to
    the model after each question and each answer is JSON valid against it, or an error record. Sampling with a
    seed, each job draws from its own random stream (a batch of several, from its first job's)."""

    def __init__(self, checkpoint: Checkpoint, plan: ExecutionPlan, *, batch_size: int = 1,
                 fetching: ImageFetching = ImageFetching(), on_text: Callable[[str], None] | None = None,
                 fast_decode: bool = False, prefetch: bool = True, constraint: Any = None,
                 cancelled: threading.Event | None = None) -> None:
        from llavanext_cli.model.preprocessing import largest_model_edge

        self.checkpoint = checkpoint
        self.plan = plan
        self.batch_size = batch_size
        self.fetching = fetching
        self.on_text = on_text
        self.prefetch = prefetch
        self.constraint = constraint
        self.processor = checkpoint.preparing_processor  # made here, before the background thread starts
        self.draft_edge = largest_model_edge(self.processor.image_processor) if fast_decode else None
        self.cancelled = cancelled if cancelled is not None else threading.Event()  # set: stop after the current step
        self.jobs: Sequence[PromptJob] = ()

    # -- the steps -----------------------------------------------------------------------------------------------
    def units(self) -> list[Unit]:
        from llavanext_cli.engine.pipeline import token_counts

        jobs = self.jobs
        # On a GPU a little padding costs less than a smaller batch; on a CPU every padded token is paid in full.
        tolerance = 0.0 if self.checkpoint.device_type == "cpu" else 0.1
        return plan_units(jobs, lambda indices: token_counts(self.processor, [jobs[i].subject.images for i in indices],
                                                             self.batch_size),
                          self.batch_size, tolerance, share=self.plan.share_prefixes)

    def prepare(self, unit: Unit) -> list[_PreparedBatch | _PreparedGroup]:
        indices = unit.indices
        if not unit.shared:
            return [self._prepare_batch(indices, {})]
        from llavanext_cli.engine.prefix_cache import prepare_shared

        jobs = self.jobs
        try:
            images = _load_job_images(jobs[indices[0]], self.fetching, self.draft_edge)
        except InputError as exc:
            return [_PreparedBatch({i: jobs[i].failure(exc.message) for i in indices}, [], [], None)]
        shared = prepare_shared(self.processor, [self._render(jobs[i], images) for i in indices], images)
        if shared is None:  # the prompts cannot share their beginning: one at a time, the images loaded once
            return [self._prepare_batch([index], {index: images}) for index in indices]
        return [_PreparedGroup(indices, shared)]

    def run(self, prepared: list[_PreparedBatch | _PreparedGroup]) -> Iterator[tuple[int, Record]]:
        self.checkpoint.load()  # the weights load on first use: a checkpoint that fails to load writes no record
        for part in prepared:
            if isinstance(part, _PreparedGroup):
                yield from self._run_group(part)
            else:
                yield from self._run_batch(part)

    def record(self, job: PromptJob, result: Any) -> Record:
        if result.error is not None:
            return job.failure(result.error)
        return Answer(job.subject, job.prompt, result.text, self.checkpoint.model_id, result.new_tokens,
                      result.seconds, job.extra, data=result.data if self.constraint is not None else NO_DATA,
                      prompt_tokens=result.prompt_tokens)

    def answer(self, jobs: Sequence[PromptJob]) -> Iterator[Record]:
        """One record per job, in order (the steps above, through the pipeline)."""
        from llavanext_cli.engine.pipeline import prefetch_depth, run_pipelined

        self.jobs = jobs
        units = self.units()
        workers = max(1, min(self.plan.workers, len(units)))
        if self.checkpoint.device_type == "cpu":  # before any worker starts: a thread takes torch's count when it runs
            from llavanext_cli.engine.concurrency import use_cpu_cores

            use_cpu_cores(workers)
        yield from run_pipelined(self.prepare, self.run, units, prefetch=self.prefetch, workers=workers,
                                 depth=prefetch_depth(self.batch_size, workers), cancelled=self.cancelled)

    # -- within the steps ----------------------------------------------------------------------------------------
    def _render(self, job: PromptJob, images: list[Any]) -> str:
        text = self.constraint.schema.prompt(job.prompt) if self.constraint is not None else job.prompt
        return self.checkpoint.prompt.format.render(single_image_conversation(text, len(images)))

    def _prepare_batch(self, indices: list[int], loaded: dict[int, list[Any]]) -> _PreparedBatch:
        from llavanext_cli.model.preprocessing import prepare_inputs

        failed: dict[int, Record] = {}
        ready = []
        for index in indices:
            job = self.jobs[index]
            try:
                images = loaded[index] if index in loaded else _load_job_images(job, self.fetching, self.draft_edge)
                ready.append((index, job, images))
            except InputError as exc:
                failed[index] = job.failure(exc.message)
        prompts = [self._render(job, images) for _, job, images in ready]
        inputs = prepare_inputs(self.processor, prompts, [images for _, _, images in ready]) if ready else None
        return _PreparedBatch(failed, ready, prompts, inputs)

    def _run_group(self, group: _PreparedGroup) -> Iterator[tuple[int, Record]]:
        from llavanext_cli.engine.prefix_cache import generate_shared

        jobs = self.jobs
        results = generate_shared(self.checkpoint, group.shared, self.plan, rows_per_pass=self.batch_size,
                                  cancelled=self.cancelled, constraint=self.constraint,
                                  seeds=[self.plan.seed_for(jobs[i].key()) for i in group.indices])
        for index, result in zip(group.indices, results):
            yield index, self.record(jobs[index], result)

    def _run_batch(self, batch: _PreparedBatch) -> Iterator[tuple[int, Record]]:
        yield from batch.failed.items()
        if not batch.ready:
            return
        results = generate(self.checkpoint, batch.prompts, [images for _, _, images in batch.ready], self.plan,
                           on_text=self.on_text if len(self.jobs) == 1 else None, inputs=batch.inputs,
                           cancelled=self.cancelled, constraint=self.constraint,
                           seed=self.plan.seed_for(batch.ready[0][1].key()))
        for (index, job, _), result in zip(batch.ready, results):
            yield index, self.record(job, result)


def answer_jobs(checkpoint: Checkpoint, jobs: Sequence[PromptJob], plan: ExecutionPlan, batch_size: int = 1,
                fetching: ImageFetching = ImageFetching(), on_text: Callable[[str], None] | None = None,
                fast_decode: bool = False, prefetch: bool = True, constraint: Any = None) -> Iterator[Record]:
    """One record per job, in order: AnswerEngine's `answer`."""
    engine = AnswerEngine(checkpoint, plan, batch_size=batch_size, fetching=fetching, on_text=on_text,
                          fast_decode=fast_decode, prefetch=prefetch, constraint=constraint)
    return engine.answer(jobs)
