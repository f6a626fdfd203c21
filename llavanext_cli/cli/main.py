"""The `llava` app: wires the commands together and maps errors onto the contract's exit codes."""

from __future__ import annotations

import errno
import os
import signal
import sys
import traceback
import warnings

import typer

try:  # typer >= 0.22 vendors click; older releases use the click package
    from typer._click import exceptions as click_exceptions
except ImportError:  # pragma: no cover
    from click import exceptions as click_exceptions

from llavanext_cli import __version__
from llavanext_cli.cli import ask, caption, chat, classify, collector, init_model, inspect_config, score, serve
from llavanext_cli.cli import options as opt
from llavanext_cli.cli import out
from llavanext_cli.errors import (
    EXIT_INTERRUPTED, EXIT_SETUP, EXIT_TERMINATED, EXIT_USAGE, LlavaError, Terminated, how_to_go_on)

app = typer.Typer(
    name="llava",
    help="Run LLaVA and LLaVA-NeXT checkpoints: caption, ask, classify, chat, inspect.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)
app.command("caption")(caption.caption)
app.command("ask")(ask.ask)
app.command("classify")(classify.classify)
app.command("chat")(chat.chat)
app.command("inspect-config")(inspect_config.inspect_config)
app.command("init-model")(init_model.init_model)
app.command("score")(score.score)
app.command("serve")(serve.serve)


def _version(value: bool) -> None:
    if value:
        print(f"llava {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Show the version."),
) -> None:
    """Run LLaVA and LLaVA-NeXT checkpoints: caption, ask, classify, chat, inspect.

    Examples:

      llava caption photo.jpg

      llava inspect-config llava-hf/llava-v1.6-mistral-7b-hf --image-size 1024x768
    """


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """The tool's own warnings (InputWarning: inputs, labels, questions files) on stderr as one `Warning:` line each;
    a warning raised inside a library (a deprecation, a future change, an advisory) only with -v or LLAVA_DEBUG=1,
    where it was raised too: it is not the user's business, and the suite turns deprecations into failures."""
    from llavanext_cli.errors import InputWarning

    own = issubclass(category, InputWarning)
    if not own and not out.library_noise_shown():
        return
    text = " ".join(str(message).split())
    if not own:
        text += f" ({category.__name__}, {filename}:{lineno})"
    out.warn(text)


_MACHINE_SAID_NO = frozenset(getattr(errno, name) for name in ("ENOSPC", "EDQUOT", "EACCES", "EPERM", "EROFS", "EIO",
                                                                 "EMFILE", "ENFILE") if hasattr(errno, name))


def _run_app(argv: list[str] | None) -> object:
    """The command's return value (its exit code). Click's own `main` is bypassed: it would turn a closed pipe into
    exit 1 and Ctrl-C into an Abort; every exception reaches `main` below as it was raised."""
    command = typer.main.get_command(app)
    opt.describe_defaults(command)
    try:
        with command.make_context("llava", list(sys.argv[1:] if argv is None else argv)) as context:
            return command.invoke(context)
    except typer.Exit as exc:  # --help, --version
        return exc.exit_code
    finally:
        collector.before_exit()


def main(argv: list[str] | None = None) -> None:
    """Entry point: one `Error:` line (and a `Hint:`) for a user mistake; with LLAVA_DEBUG=1 the traceback too,
    and the same exit code."""
    debug = out.debugging()
    out.set_verbose(False)  # until a command's -v says otherwise

    def fail(message: str, hint: str | None, code: int) -> None:
        if debug:
            traceback.print_exc()
        out.error(message, hint)
        sys.exit(code)

    def terminate(signum: int, frame: object) -> None:
        raise Terminated()

    if argv is None:  # the real process (tests call main() in-process with argv and keep their own handlers)
        signal.signal(signal.SIGTERM, terminate)
        collector.defer_until_loaded()
    warnings.showwarning = _show_warning
    try:
        result = _run_app(argv)
    except LlavaError as exc:
        fail(exc.message, exc.hint, exc.exit_code)
    except click_exceptions.NoArgsIsHelpError as exc:
        print(exc.ctx.get_help() if exc.ctx else "")
        sys.exit(0)
    except click_exceptions.UsageError as exc:
        command = exc.ctx.command_path if exc.ctx is not None else "llava"
        fail(exc.format_message(), f"run '{command} --help' for usage", EXIT_USAGE)
    except (Terminated, KeyboardInterrupt, typer.Abort) as stop:
        # Not an error: the user stopped the run. One line that says what is kept and how to go on.
        if debug:
            traceback.print_exc()
        terminated = isinstance(stop, Terminated)
        out.stopped("Terminated" if terminated else "Interrupted",
                              how_to_go_on(stop) or "finished records are kept.")
        sys.exit(EXIT_TERMINATED if terminated else EXIT_INTERRUPTED)
    except BrokenPipeError:
        # The reader went away (`llava ... | head`): stop quietly, without a second error at exit.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        sys.exit(0)
    except click_exceptions.ClickException as exc:
        fail(exc.format_message(), None, exc.exit_code)
    except OSError as exc:
        # The machine said no while the tool wrote or read its files (disk full, no permission, a read-only file
        # system): one line, not a bug report. Any other OSError is a bug, and keeps its traceback.
        if exc.errno not in _MACHINE_SAID_NO:
            raise
        where = f" ({exc.filename})" if getattr(exc, "filename", None) else ""
        fail(f"{exc.strerror or exc}{where}", None, EXIT_SETUP)
    sys.exit(result if isinstance(result, int) else 0)
