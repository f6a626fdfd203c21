"""What every model-running command does first: its settings resolved and checked, its output checked (and
locked) before the model loads, then the checkpoint opened (the weights load on first use)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from llavanext_cli.cli.console import warn
from llavanext_cli.errors import UsageError
from llavanext_cli.io.settings import Settings, load_settings
from llavanext_cli.io.writers import APPENDED_FORMATS, OutputLock, check_writable


def user_config_path() -> Path:
    """`$LLAVA_HOME/config.yaml`, else config.yaml in the platform's per-user config directory
    (~/.config/llava on Linux)."""
    import typer

    home = os.environ.get("LLAVA_HOME")
    return (Path(home).expanduser() if home else Path(typer.get_app_dir("llava"))) / "config.yaml"


def settings_for(flags: dict[str, Any], config: Path | None) -> Settings:
    """The run's settings through every layer, and the combinations no layer can check alone."""
    settings = load_settings(flags, config, user_config=user_config_path())
    if settings.quant_type != "nf4" and settings.quant != "4bit":
        raise UsageError(f"quant_type {settings.quant_type} (from {settings.sources.get('quant_type')}) applies to "
                         f"--quant 4bit only, and quant is {settings.quant}")
    return settings


def check_output(output: Path | None, fmt: str, resume: bool, lock: bool = True) -> OutputLock | None:
    """Fail fast on an output that cannot be written, before any weights load; lock a file that records are
    appended to (unless not `lock`), so that a second run on the same file refuses instead of interleaving."""
    if resume and output is None:
        raise UsageError("--resume needs -o FILE (the jsonl file of the interrupted run)")
    if resume and fmt not in APPENDED_FORMATS:
        raise UsageError(f"--resume works on jsonl output, not {fmt}", hint="use -o FILE.jsonl or --format jsonl")
    if output is None:
        return None
    if output.is_dir():
        raise UsageError(f"-o {output} is a directory")
    parent = output.parent if str(output.parent) else Path(".")
    if not parent.is_dir():
        raise UsageError(f"-o {output}: directory {parent} does not exist")
    check_writable(output)
    # json / csv are written to a temporary file and renamed: only an appended file (jsonl, an imagefolder's
    # metadata.jsonl) needs the lock.
    return OutputLock(output) if lock and fmt in APPENDED_FORMATS else None


@dataclass
class Run:
    checkpoint: Any


def open_run(settings: Settings, verbose: bool) -> Run:
    """Open the checkpoint for a run whose settings, inputs and output have been checked (the weights load on
    first use, while the first inputs are being prepared)."""
    from llavanext_cli.model.checkpoint import open_checkpoint
    from llavanext_cli.cli import collector
    from llavanext_cli.model.loading import configure_library_logging

    configure_library_logging(verbose)
    checkpoint = open_checkpoint(settings, on_loaded=collector.model_loaded)
    if checkpoint.prompt.warning:
        warn(checkpoint.prompt.warning)
    return Run(checkpoint)
