"""The one error type of the tool, and the contract's exit codes."""

from __future__ import annotations

EXIT_INPUT_FAILED = 1
EXIT_USAGE = 2
EXIT_SETUP = 3
EXIT_INTERRUPTED = 130
EXIT_TERMINATED = 143  # 128 + SIGTERM


class LlavaError(Exception):
    """A problem the user can act on: printed as one `Error:` line (and a `Hint:`), no traceback."""

    exit_code = EXIT_SETUP

    def __init__(self, message: str, hint: str | None = None):
        super().__init__(message)
        self.message = message
        self.hint = hint


class UsageError(LlavaError):
    """Bad flag or value, no inputs, unknown prompt format, invalid config or spec (exit 2)."""

    exit_code = EXIT_USAGE


class SetupError(LlavaError):
    """The checkpoint, a config file or a needed component cannot be loaded (exit 3)."""

    exit_code = EXIT_SETUP


class InputError(LlavaError):
    """One input (an image, a URL) cannot be used; the run goes on with the others."""

    exit_code = EXIT_INPUT_FAILED


class Cancelled(Exception):
    """A call its caller gave up on (a server's client that went away) stopped after its current step; what it made
    is not kept."""


class Terminated(BaseException):
    """SIGTERM, raised where the process is, so that every `finally` runs (records flushed, temporary files
    removed) before exit 143. Not a KeyboardInterrupt: nothing treats it as Ctrl-C on an answer."""


def say_how_to_go_on(stop: BaseException, text: str) -> None:
    """Attach to a Ctrl-C or SIGTERM what the user can do next (rerun with --resume, ...), for the line that ends
    the run."""
    stop.how_to_go_on = text  # type: ignore[attr-defined]


def how_to_go_on(stop: BaseException) -> str | None:
    return getattr(stop, "how_to_go_on", None)


class InputWarning(UserWarning):
    """Something about the inputs the user should hear of (the CLI shows it on stderr, without where it was
    raised)."""
