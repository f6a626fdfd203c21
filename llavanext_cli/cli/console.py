"""stderr for everything that is not a result: errors, hints, warnings, progress; and whether the libraries' own
noise (their deprecation and future warnings, their logs) is shown: only with -v or LLAVA_DEBUG=1."""

from __future__ import annotations

import os
import warnings

from rich.console import Console

stderr = Console(stderr=True, highlight=False, soft_wrap=True)

_verbose = False


def debugging() -> bool:
    """LLAVA_DEBUG=1: tracebacks, and every warning with where it was raised."""
    return os.environ.get("LLAVA_DEBUG", "") not in ("", "0")


def set_verbose(value: bool) -> bool:
    """The -v flag's callback (run as soon as it is parsed, before the command starts): with -v the libraries'
    warnings are shown, their deprecations included (which Python hides by default)."""
    global _verbose
    _verbose = bool(value)
    if _verbose:
        warnings.simplefilter("default", DeprecationWarning)
    return value


def library_noise_shown() -> bool:
    """Whether a warning raised inside a library reaches stderr: with -v or LLAVA_DEBUG=1 only."""
    return _verbose or debugging()


def print_error(message: str, hint: str | None = None) -> None:
    stderr.print("[bold red]Error:[/bold red] " + _escape(message))
    if hint:
        stderr.print("[yellow]Hint:[/yellow] " + _escape(hint))


def print_stopped(word: str, note: str) -> None:
    """The last line of a run stopped by Ctrl-C or SIGTERM: not an error, and what to do next."""
    stderr.print(f"[yellow]{word}[/yellow]: " + _escape(note))


def warn(message: str) -> None:
    stderr.print("[yellow]Warning:[/yellow] " + _escape(message))


def _escape(text: str) -> str:
    from rich.markup import escape

    return escape(text)
