"""The run shared by caption and ask."""

from __future__ import annotations

from pathlib import Path

from llavanext_cli.cli.execute import execute
from llavanext_cli.settings import Settings


def run_prompt_jobs(settings: Settings, jobs: list, output: Path | None, resume: bool, verbose: bool,
                    fast_decode: bool = False, compile: bool = False, max_memory: str | None = None) -> int:
    from llavanext_cli.answering import ImageFetching, answer_jobs, record_resume_key
    from llavanext_cli.concurrency import check_workers, resolve_workers
    from llavanext_cli.sharding import data_parallel_from_env

    seeded_sampling = settings.seed is not None and settings.temperature > 0
    check_workers(settings.workers, seeded_sampling, compile, source=settings.sources.get("workers", "--workers"))
    fetching = ImageFetching(settings.url_timeout, settings.url_max_bytes)

    def records_for(run, todo, on_text):
        workers = resolve_workers(settings.workers, run.checkpoint.device_type, len(todo), seeded_sampling, compile,
                                  data_parallel_from_env() is not None)
        return answer_jobs(run.checkpoint, todo, run.generation, settings.batch_size, fetching, on_text,
                           fast_decode=fast_decode, workers=workers)

    return execute(settings, jobs, lambda job: job.resume_key(), record_resume_key, records_for, output, resume,
                   verbose, compile=compile, max_memory=max_memory)
