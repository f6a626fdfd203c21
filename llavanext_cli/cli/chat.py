"""`llava chat [IMAGES...]`: an interactive conversation on a terminal; one turn a line when piped."""

from __future__ import annotations

import json
import shlex
import sys
from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from llavanext_cli.cli import options as opt
from llavanext_cli.cli import out
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
    server: opt.ServerOpt = None,
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
    from llavanext_cli.cli.batch import command_model, open_model
    from llavanext_cli.engine.plan import GenerationOptions, check_combinations
    from llavanext_cli.io.formats import check_format
    from llavanext_cli.io.inputs import expand_inputs
    from llavanext_cli.io.settings import resolve_settings

    if output_format is not None:
        check_format("chat", output_format)
    model = command_model(resolve_settings(flags, config), server)
    settings = model.settings
    # A format from the environment or a config file is for the batch commands; chat prints text or jsonl.
    output_format = settings.format if settings.format in ("text", "jsonl") else "text"
    sources = expand_inputs(images, stdin=sys.stdin) if images else []
    check_combinations(GenerationOptions.from_settings(settings), compile=settings.compile)
    conversation = open_model(model, verbose).chat(system=system)
    if model.checkpoint is not None:  # a local model: its weights now, not while the person waits for an answer
        model.checkpoint.load()
    repl = ChatRepl(conversation, output_format, on_terminal=sys.stdin.isatty())
    failed = not repl.attach(sources)
    if sys.stdin.isatty():
        repl.interactive()
    else:
        failed = not repl.piped(sys.stdin) or failed
    if verbose and model.checkpoint is not None:  # -v: the conversation's figures, as its last line
        out.note(repl.figures.summary(model.checkpoint.load_seconds, model.checkpoint.device_type))
    return EXIT_INPUT_FAILED if failed else 0


class ChatRepl:
    """Slash commands and turns of a conversation (an api.Chat), for a terminal or a pipe."""

    def __init__(self, conversation: Any, output_format: str, on_terminal: bool = False):
        self.chat = conversation
        self.output_format = output_format
        self.on_terminal = on_terminal
        self.turn = 0
        self.figures = RunFigures(noun="turn")

    def note(self, text: str) -> None:
        """What a slash command did, for the person at a terminal; a pipe's stderr carries only warnings and errors."""
        if self.on_terminal:
            out.note(text)

    def attach(self, sources: list[str]) -> bool:
        ok = True
        for source in sources:
            try:
                self.chat.attach(source)
            except LlavaError as exc:
                out.warn(f"{source}: {exc.message} (not attached)")
                ok = False
        return ok

    def command(self, line: str) -> bool | None:
        """Run a slash command; False when it failed, None to quit."""
        try:
            name, *args = shlex.split(line)
        except ValueError as exc:
            out.warn(f"cannot parse {line!r}: {exc}")
            return False
        if name in ("/exit", "/quit"):
            return None
        if name == "/help":
            out.note(HELP)
        elif name == "/reset":
            self.chat.reset()
            self.turn = 0
            self.note("Conversation cleared.")
        elif name == "/image":
            if not args:
                out.warn("usage: /image PATH [PATH...]")
                return False
            if not self.attach(args):
                return False
            self.note(f"Attached to your next message: {', '.join(args)}")
        elif name in ("/save", "/load"):
            if len(args) != 1:
                out.warn(f"usage: {name} FILE")
                return False
            try:
                if name == "/save":
                    self.chat.save(args[0])
                    self.note(f"Saved the conversation to {args[0]}.")
                else:
                    for message in self.chat.load(args[0]):
                        out.warn(message)
                    self.turn = sum(1 for m in self.chat.messages if m["role"] == "assistant")
                    self.note(f"Loaded {args[0]}: {len(self.chat.messages)} messages.")
            except LlavaError as exc:
                out.error(exc.message, exc.hint)
                return False
        else:
            out.warn(f"unknown command {name} (/help lists them)")
            return False
        return True

    def say(self, text: str, on_text=None):
        answer = self.chat.send(text, on_text=on_text)
        self.turn += 1
        self.figures.add(answer)
        return answer

    def piped(self, stream) -> bool:
        ok = True
        for raw in stream:
            text = raw.strip()
            if not text:
                continue
            if text.startswith("/"):
                result = self.command(text)
                if result is None:
                    break
                ok = ok and result
                continue
            try:
                answer = self.say(text)
            except LlavaError as exc:
                # Still one line for this turn, so that answers stay aligned with the input lines.
                out.error(exc.message, exc.hint)
                ok = False
                self.turn += 1
                out.line(json.dumps({"turn": self.turn, "error": exc.message}, ensure_ascii=False)
                         if self.output_format == "jsonl" else "")
                continue
            if self.output_format == "jsonl":
                out.line(json.dumps({"turn": self.turn, "text": answer.text}, ensure_ascii=False))
            else:
                out.line(" ".join(answer.text.splitlines()))
        return ok

    def interactive(self) -> None:
        import readline  # noqa: F401  (line editing and history for input())

        out.banner(f"llava chat · {self.chat.model.name} · prompt format {self.chat.prompt_format} · /help for "
                   "commands, Ctrl-D to quit")
        if self.chat.pending:  # the command line's images; /image says so itself
            out.dim("Attached to your next message: " + ", ".join(item["path"] for item in self.chat.pending))
        while True:
            try:
                text = out.prompt("you>").strip()
            except EOFError:
                out.line()
                return
            except KeyboardInterrupt:
                out.dim("\n(use /exit or Ctrl-D to quit)")
                continue
            if not text:
                continue
            if text.startswith("/"):
                if self.command(text) is None:
                    return
                continue
            out.speaker("llava>")
            try:
                self.say(text, on_text=out.stream)
                out.line()
            except KeyboardInterrupt:
                out.dim("\n(answer stopped; the conversation is as it was before your message)")
            except LlavaError as exc:
                out.line()
                out.error(exc.message, exc.hint)
