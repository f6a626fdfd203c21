"""`llava chat [IMAGES...]`: an interactive conversation on a terminal; one turn a line when piped."""

from __future__ import annotations

import json
import shlex
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from llavanext_cli.cli import options as opt
from llavanext_cli.cli.console import print_error, stderr, warn
from llavanext_cli.errors import EXIT_INPUT_FAILED, LlavaError, UsageError
from llavanext_cli.engine.figures import RunFigures

HELP = """Commands:
  /image PATH [PATH...]  attach images (files or URLs) to your next message
  /reset                 forget the conversation
  /save FILE             write the transcript (JSON) to FILE
  /load FILE             continue a saved transcript
  /help                  this help
  /exit                  quit (Ctrl-D too; Ctrl-C stops an answer)"""


def chat(
    images: opt.ImagesArg = None,
    system: Annotated[Optional[str], typer.Option("--system", help="A system prompt for the conversation.",
                                                  show_default=False)] = None,
    model: opt.ModelOpt = None,
    prompt_format: opt.PromptFormatOpt = None,
    dtype: opt.DtypeOpt = None,
    quant: opt.QuantOpt = None,
    quant_type: opt.QuantTypeOpt = None,
    attn: opt.AttnOpt = None,
    device: opt.DeviceOpt = None,
    max_new_tokens: opt.MaxNewTokensOpt = None,
    temperature: opt.TemperatureOpt = None,
    top_p: opt.TopPOpt = None,
    num_beams: opt.NumBeamsOpt = None,
    seed: opt.SeedOpt = None,
    output_format: Annotated[Optional[str], typer.Option(
        "--format", help="text | jsonl: how answers are printed when stdin is not a terminal.",
        show_default=False)] = None,
    memory_check: opt.MemoryCheckOpt = None,
    config: opt.ConfigOpt = None,
    offline: opt.OfflineOpt = None,
    verbose: opt.VerboseOpt = False,
) -> int:
    """A multi-turn conversation about images. Images given here go with your first message.

    On a terminal: streamed answers and slash commands (/image, /reset, /save, /load, /help, /exit).
    Piped: each input line is one turn (slash commands too) and each answer is one output line.

    Examples:

      llava chat photo.jpg

      printf 'What is this?\\nWhat colour is it?\\n' | llava chat photo.jpg --format jsonl
    """
    flags = opt.model_flags(locals())
    from llavanext_cli.engine.chat import ChatSession
    from llavanext_cli.cli.run import open_run, settings_for
    from llavanext_cli.io.images import ImageFetching
    from llavanext_cli.io.inputs import expand_inputs
    from llavanext_cli.engine.plan import GenerationOptions, check_combinations, plan_execution

    if output_format not in (None, "text", "jsonl"):
        raise UsageError(f"--format must be text or jsonl for chat, not {output_format!r}")
    settings = settings_for(flags, config)
    # A format from the environment or a config file is for the batch commands; chat prints text or jsonl.
    output_format = settings.format if settings.format in ("text", "jsonl") else "text"
    sources = expand_inputs(images, stdin=sys.stdin) if images else []
    options = GenerationOptions.from_settings(settings)
    check_combinations(options, compile=settings.compile)
    run = open_run(settings, verbose)
    plan = plan_execution(run.checkpoint, options, compile=settings.compile)
    run.checkpoint.load()  # now, not while the person waits for the first answer
    session = ChatSession(run.checkpoint, plan, ImageFetching.from_settings(settings), system=system)
    saved_settings = {
        "dtype": settings.dtype, "quant": settings.quant, "quant_type": settings.quant_type, "seed": settings.seed,
        "prompt_format": run.checkpoint.prompt.format.name, "max_new_tokens": settings.max_new_tokens,
        "temperature": settings.temperature, "top_p": settings.top_p, "num_beams": settings.num_beams,
        "system": system,
    }
    repl = ChatRepl(session, saved_settings, output_format, on_terminal=sys.stdin.isatty())
    failed = not repl.attach(sources)
    if sys.stdin.isatty():
        repl.interactive()
    else:
        failed = not repl.piped(sys.stdin) or failed
    if verbose:  # -v: the conversation's figures, as its last line
        stderr.print(repl.figures.summary(run.checkpoint.load_seconds, run.checkpoint.device_type), highlight=False)
    return EXIT_INPUT_FAILED if failed else 0


class ChatRepl:
    """Slash commands and turns, for a terminal or a pipe."""

    def __init__(self, session, settings: dict, output_format: str, on_terminal: bool = False):
        self.session = session
        self.settings = settings
        self.output_format = output_format
        self.on_terminal = on_terminal
        self.turn = 0
        self.figures = RunFigures(noun="turn")

    def note(self, text: str) -> None:
        """What a slash command did, for the person at a terminal; a pipe's stderr carries only warnings and errors."""
        if self.on_terminal:
            stderr.print(text, highlight=False, markup=False)

    def attach(self, sources: list[str]) -> bool:
        ok = True
        for source in sources:
            try:
                self.session.attach(source)
            except LlavaError as exc:
                warn(f"{source}: {exc.message} (not attached)")
                ok = False
        return ok

    def command(self, line: str) -> bool | None:
        """Run a slash command; False when it failed, None to quit."""
        try:
            name, *args = shlex.split(line)
        except ValueError as exc:
            warn(f"cannot parse {line!r}: {exc}")
            return False
        if name in ("/exit", "/quit"):
            return None
        if name == "/help":
            stderr.print(HELP, highlight=False, markup=False)
        elif name == "/reset":
            self.session.reset()
            self.turn = 0
            self.note("Conversation cleared.")
        elif name == "/image":
            if not args:
                warn("usage: /image PATH [PATH...]")
                return False
            if not self.attach(args):
                return False
            self.note(f"Attached to your next message: {', '.join(args)}")
        elif name in ("/save", "/load"):
            if len(args) != 1:
                warn(f"usage: {name} FILE")
                return False
            try:
                if name == "/save":
                    self.session.save(Path(args[0]), self.settings)
                    self.note(f"Saved the conversation to {args[0]}.")
                else:
                    for message in self.session.load(Path(args[0])):
                        warn(message)
                    self.turn = sum(1 for m in self.session.messages if m["role"] == "assistant")
                    self.note(f"Loaded {args[0]}: {len(self.session.messages)} messages.")
            except LlavaError as exc:
                print_error(exc.message, exc.hint)
                return False
        else:
            warn(f"unknown command {name} (/help lists them)")
            return False
        return True

    def say(self, text: str, on_text=None):
        reply = self.session.send(text, on_text=on_text)
        self.turn += 1
        self.figures.add(reply)
        if reply.dropped_turns:
            warn(f"the conversation outgrew the model's context: dropped the oldest {reply.dropped_turns} "
                 f"exchange(s)")
        return reply

    def piped(self, stream) -> bool:
        ok = True
        for raw in stream:
            line = raw.strip()
            if not line:
                continue
            if line.startswith("/"):
                result = self.command(line)
                if result is None:
                    break
                ok = ok and result
                continue
            try:
                reply = self.say(line)
            except LlavaError as exc:
                # Still one line for this turn, so that answers stay aligned with the input lines.
                print_error(exc.message, exc.hint)
                ok = False
                self.turn += 1
                print(json.dumps({"turn": self.turn, "error": exc.message}, ensure_ascii=False)
                      if self.output_format == "jsonl" else "", flush=True)
                continue
            if self.output_format == "jsonl":
                print(json.dumps({"turn": self.turn, "text": reply.text}, ensure_ascii=False), flush=True)
            else:
                print(" ".join(reply.text.splitlines()), flush=True)
        return ok

    def interactive(self) -> None:
        import readline  # noqa: F401  (line editing and history for input())

        from rich.console import Console

        console = Console(highlight=False)
        checkpoint = self.session.checkpoint
        console.print(f"[bold]llava chat[/bold] · {checkpoint.model_id} · prompt format "
                      f"{checkpoint.prompt.format.name} · /help for commands, Ctrl-D to quit", markup=True)
        if self.session.pending:  # the command line's images; /image says so itself
            from rich.markup import escape

            attached = ", ".join(item["path"] for item in self.session.pending)
            console.print(f"[dim]Attached to your next message: {escape(attached)}[/dim]")
        while True:
            try:
                line = console.input("[bold cyan]you>[/bold cyan] ").strip()
            except EOFError:
                console.print()
                return
            except KeyboardInterrupt:
                console.print("\n[dim](use /exit or Ctrl-D to quit)[/dim]")
                continue
            if not line:
                continue
            if line.startswith("/"):
                if self.command(line) is None:
                    return
                continue
            console.print("[bold magenta]llava>[/bold magenta] ", end="")
            try:
                self.say(line, on_text=lambda piece: (sys.stdout.write(piece), sys.stdout.flush()))
                console.print()
            except KeyboardInterrupt:
                console.print("\n[dim](answer stopped; the conversation is as it was before your message)[/dim]")
            except LlavaError as exc:
                console.print()
                print_error(exc.message, exc.hint)
