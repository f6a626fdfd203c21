"""What every model-running command does first: settings, inputs and the output checked before the model loads."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from llavanext_cli.cli.console import warn
from llavanext_cli.errors import UsageError
from llavanext_cli.generation import GenerationOptions
from llavanext_cli.records import OutputLock, format_for
from llavanext_cli.settings import Settings, load_settings


@dataclass
class Run:
    settings: Settings
    output: Path | None
    output_format: str
    checkpoint: Any
    generation: GenerationOptions


def check_output(output: Path | None, fmt: str, resume: bool) -> OutputLock | None:
    """Fail fast on an output that cannot be written, before any weights load; lock a file that records are
    appended to, so that a second run on the same file refuses instead of interleaving."""
    if resume and output is None:
        raise UsageError("--resume needs -o FILE (the jsonl file of the interrupted run)")
    if resume and fmt != "jsonl":
        raise UsageError(f"--resume works on jsonl output, not {fmt}", hint="use -o FILE.jsonl or --format jsonl")
    if output is None:
        return None
    if output.is_dir():
        raise UsageError(f"-o {output} is a directory")
    parent = output.parent if str(output.parent) else Path(".")
    if not parent.is_dir():
        raise UsageError(f"-o {output}: directory {parent} does not exist")
    lock = OutputLock(output)  # really opens it: os.access says yes to root even where the file system says no
    if fmt != "jsonl":
        lock.release(remove_if_empty=True)  # json / csv are written to a temporary file and renamed: no lock needed
        return None
    return lock


def settings_for(flags: dict[str, Any], config: Path | None) -> Settings:
    settings = load_settings(flags, config)
    if settings.quant_type != "nf4" and settings.quant != "4bit":
        raise UsageError(f"quant_type {settings.quant_type} (from {settings.sources.get('quant_type')}) applies to "
                         f"--quant 4bit only, and quant is {settings.quant}")
    return settings


def open_run(settings: Settings, output: Path | None, verbose: bool, compile: bool = False,
             max_memory: dict | None = None) -> Run:
    """Open the checkpoint for a run whose settings, inputs and output have been checked (the weights load on
    first use, while the first inputs are being prepared)."""
    from llavanext_cli.cli import collector
    from llavanext_cli.loading import configure_library_logging
    from llavanext_cli.session import open_checkpoint

    configure_library_logging(verbose)
    checkpoint = open_checkpoint(settings, compile, max_memory, on_loaded=collector.model_loaded)
    if checkpoint.prompt.warning:
        warn(checkpoint.prompt.warning)
    generation = GenerationOptions(
        max_new_tokens=settings.max_new_tokens,
        temperature=settings.temperature,
        top_p=settings.top_p,
        num_beams=settings.num_beams,
        seed=settings.seed,
    )
    return Run(settings, output, format_for(settings.format, output), checkpoint, generation)
