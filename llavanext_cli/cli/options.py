"""Options shared by several commands, each defined once (`Annotated` aliases read like prose in signatures)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from llavanext_cli.cli.out import set_verbose

_MODEL = "Model"
_RUN = "Running"
_GEN = "Generation"
_OUT = "Output"

ModelOpt = Annotated[Optional[str], typer.Option(
    "-m", "--model", help="Hub id or local checkpoint directory.", rich_help_panel=_MODEL, show_default=False)]
PromptFormatOpt = Annotated[Optional[str], typer.Option(
    "--prompt-format", help="A registry format (see prompts/) or a format .yaml file.", rich_help_panel=_MODEL,
    show_default=False)]
DtypeOpt = Annotated[Optional[str], typer.Option(
    "--dtype", help="auto | float16 | bfloat16 | float32.", rich_help_panel=_RUN, show_default=False)]
QuantOpt = Annotated[Optional[str], typer.Option(
    "--quant", help="none | 4bit | 8bit (bitsandbytes).", rich_help_panel=_RUN, show_default=False)]
QuantTypeOpt = Annotated[Optional[str], typer.Option(
    "--quant-type", help="nf4 | fp4 (with --quant 4bit).", rich_help_panel=_RUN, show_default=False)]
AttnOpt = Annotated[Optional[str], typer.Option(
    "--attn", help="auto | sdpa | eager | flash_attention_2.", rich_help_panel=_RUN, show_default=False)]
DeviceOpt = Annotated[Optional[str], typer.Option(
    "--device", help="auto | cpu | cuda | cuda:N | mps.", rich_help_panel=_RUN, show_default=False)]
BatchSizeOpt = Annotated[Optional[int], typer.Option(
    "--batch-size", help="Images per forward pass.", rich_help_panel=_RUN, show_default=False)]
WorkersOpt = Annotated[Optional[int], typer.Option(
    "--workers", help="Batches generated at once, each on its share of the CPU cores (on a GPU, --batch-size is "
    "the knob).", rich_help_panel=_RUN, show_default=False)]
OfflineOpt = Annotated[Optional[bool], typer.Option(
    "--offline/--online", help="Use only local files and the Hub cache.", rich_help_panel=_RUN, show_default=False)]
ConfigOpt = Annotated[Optional[Path], typer.Option(
    "--config", help="A settings YAML file (same keys as configs/default.yaml).", rich_help_panel=_RUN,
    show_default=False)]
VerboseOpt = Annotated[bool, typer.Option(
    "-v", "--verbose", help="Show library logs, warnings and progress bars on stderr.", rich_help_panel=_RUN,
    callback=set_verbose)]
MaxNewTokensOpt = Annotated[Optional[int], typer.Option(
    "--max-new-tokens", help="Most tokens to generate.", rich_help_panel=_GEN, show_default=False)]
TemperatureOpt = Annotated[Optional[float], typer.Option(
    "--temperature", help="Sampling temperature; 0 means greedy.", rich_help_panel=_GEN, show_default=False)]
TopPOpt = Annotated[Optional[float], typer.Option(
    "--top-p", help="Nucleus sampling (with --temperature > 0).", rich_help_panel=_GEN, show_default=False)]
NumBeamsOpt = Annotated[Optional[int], typer.Option(
    "--num-beams", help="Beam search width.", rich_help_panel=_GEN, show_default=False)]
SeedOpt = Annotated[Optional[int], typer.Option(
    "--seed", help="Seed for reproducible sampling.", rich_help_panel=_GEN, show_default=False)]
FormatOpt = Annotated[Optional[str], typer.Option(
    "--format", help="text | json | jsonl | csv | imagefolder. imagefolder: -o DIR/metadata.jsonl, one {file_name, "
    "text or label} line per success, for datasets' imagefolder.",
    rich_help_panel=_OUT, show_default=False)]
OutputOpt = Annotated[Optional[Path], typer.Option(
    "-o", "--output", help="Write records to FILE instead of stdout.", rich_help_panel=_OUT, show_default=False)]
PromptOpt = Annotated[Optional[str], typer.Option(
    "--prompt", help="The prompt text.", show_default=False)]


FastDecodeOpt = Annotated[Optional[bool], typer.Option(
    "--fast-decode/--no-fast-decode", help="Decode large JPEGs at a reduced scale (faster; pixels differ slightly "
    "from a full decode).", rich_help_panel=_RUN, show_default=False)]
CompileOpt = Annotated[Optional[bool], typer.Option(
    "--compile/--no-compile", help="CUDA only: static KV cache and torch.compile for the language model (slow "
    "first batch).", rich_help_panel=_RUN, show_default=False)]
MaxMemoryOpt = Annotated[Optional[str], typer.Option(
    "--max-memory", help="With --device auto on GPUs: memory per device for the weights, e.g. "
    "0=70GiB,1=70GiB,cpu=200GiB.", rich_help_panel=_RUN, show_default=False)]
MemoryCheckOpt = Annotated[Optional[bool], typer.Option(
    "--memory-check/--no-memory-check", help="Refuse, before reading them, weights that cannot fit in the free memory "
    "of the device(s) they are planned for.", rich_help_panel=_RUN, show_default=False)]
ServerOpt = Annotated[Optional[str], typer.Option(
    "--server", envvar="LLAVA_SERVER", show_envvar=False, help="Send the work to a running `llava serve` at this URL "
    "instead of loading a model (the images go as bytes; records, order, resume and outputs as a local run's; its key "
    "from LLAVA_API_KEY).", rich_help_panel=_MODEL, show_default=False)]
RecursiveOpt = Annotated[bool, typer.Option("--recursive", "-r", help="Descend into subdirectories.")]
ResumeOpt = Annotated[bool, typer.Option(
    "--resume", help="Skip inputs that already have a success record in -o FILE.jsonl (or a line in an imagefolder's "
    "metadata.jsonl); append the rest.",
    rich_help_panel=_OUT)]
SchemaOpt = Annotated[Optional[str], typer.Option(
    "--schema", help="Constrain each answer to JSON valid against a JSON Schema: a file, inline JSON ({...}), or the "
    "concise form 'count int, kind: person|animal|object, outdoor bool, tags list' (see the README).",
    rich_help_panel=_GEN, show_default=False)]
_DATA = "Training-set outputs"
SidecarOpt = Annotated[bool, typer.Option(
    "--sidecar", help="Also write each answer to STEM.txt beside its image (the caption file kohya-ss sd-scripts, "
    "OneTrainer, SimpleTuner and ai-toolkit read): one line, UTF-8, no trailing newline, written whole. Images that "
    "already have one are skipped before any work, so a rerun resumes. Local images only; one answer per image.",
    rich_help_panel=_DATA)]
OverwriteOpt = Annotated[bool, typer.Option(
    "--overwrite", help="Do again the images that are done: with --sidecar, those that have a STEM.txt (replaced); "
    "with --format imagefolder, those that have a line in metadata.jsonl (the line replaced).",
    rich_help_panel=_DATA)]
PrefixOpt = Annotated[Optional[str], typer.Option(
    "--prefix", help="Text put before each answer in STEM.txt (--sidecar) and in the text column (--format "
    "imagefolder), verbatim: --prefix 'sks dog, ' brings its own comma and space.", rich_help_panel=_DATA,
    show_default=False)]
SuffixOpt = Annotated[Optional[str], typer.Option(
    "--suffix", help="Text put after each answer, as --prefix: --suffix ', film grain'.", rich_help_panel=_DATA,
    show_default=False)]
ImagesArg = Annotated[Optional[list[str]], typer.Argument(
    help="Image files, directories, quoted globs, http(s) URLs, or - (paths from stdin).", show_default=False)]


# A command parameter is either a setting (passed to the settings layers, where the environment and config files
# can set it too) or the command's own. Parameters named as their setting need no entry; these are renamed:
_RENAMED_SETTINGS = {"output_format": "format"}
# and these are the commands' own (not settings):
COMMAND_PARAMETERS = frozenset({
    "images", "prompt", "recursive", "output", "resume", "config", "verbose", "question", "together", "questions",
    "labels", "labels_file", "top_k", "truth_from_dirs", "system", "schema", "sidecar", "overwrite", "prefix",
    "suffix", "host", "port", "api_key", "alias", "max_queue", "batch_window", "cache_memory", "media_root",
    "allow_url_images", "allow_network", "max_body", "max_images", "max_pixels", "server",
})


def model_flags(parameters: dict[str, Any]) -> dict[str, Any]:
    """The settings among a command's parameters (pass `locals()` first thing), as given (None = not given).
    A parameter that is neither a setting nor listed as a command's own is a programming error, raised at once:
    it would otherwise be silently dropped on its way to the settings."""
    from llavanext_cli.io.settings import SETTING_NAMES

    flags = {}
    for name, value in parameters.items():
        setting = _RENAMED_SETTINGS.get(name, name)
        if setting in SETTING_NAMES:
            if value is not None:
                flags[setting] = value
        elif name not in COMMAND_PARAMETERS:
            raise RuntimeError(f"command parameter {name!r} is neither a setting nor in options.COMMAND_PARAMETERS")
    return flags


def given(**flags: Any) -> dict[str, Any]:
    """The flags the user actually gave (None means not given)."""
    return {key: value for key, value in flags.items() if value is not None}


# --- what --help says of every option: its default, and its environment variable ----------------------------------

# Command options that take their default from a setting (they are not settings themselves: a flag, env or config
# file sets the setting).
_DEFAULT_FROM_SETTING = {("caption", "prompt"): "caption_prompt", ("classify", "prompt"): "classify_prompt"}
# Parameters named like a setting that are a command's own there.
_NOT_THE_SETTING = {("inspect-config", "output_format"), ("score", "output_format"), ("init-model", "seed")}
# Defaults said in words where the value alone would not tell.
_DEFAULT_IN_WORDS = {
    "prompt_format": "the checkpoint's chat template, else the prompts/ registry",
    "format": "from -o's extension, else text",
    "workers": "0 (auto: 2 on a CPU, 1 on a GPU)",
    "seed": "none (a new draw every run)",
    "max_memory": "none (accelerate decides)",
    "output": "stdout", "config": "none", "images": "none", "labels": "none", "labels_file": "none",
    "questions": "none", "question": "none", "schema": "none (free text)", "prefix": "none", "suffix": "none",
    "system": "none", "by": "none", "server": "none (env LLAVA_SERVER): a model loaded here", "model_arg": "the model setting (-m, LLAVA_MODEL, a config file)",
}


def _shown(value: Any) -> str:
    if value is None:
        return "none"
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, (list, tuple)):
        return ", ".join(map(str, value)) or "none"
    return str(value)


def describe_defaults(group: Any) -> None:
    """Add to each option's help its default and, for a setting, its LLAVA_* variable (the values of
    configs/default.yaml, which a user or --config file may change); show no value placeholder for flags.
    Applied to the app's click commands once per invocation, so that no option's help has to repeat it."""
    from llavanext_cli.io.settings import SETTING_NAMES, env_var_name, project_defaults

    defaults = project_defaults()
    for command in (group, *getattr(group, "commands", {}).values()):
        for flag in (*command.params, _help_option(command)):
            if getattr(flag, "is_flag", False):
                flag.metavar = ""
    for name, command in getattr(group, "commands", {}).items():
        for param in command.params:
            if param.name in ("help", "version") or param.name is None:
                continue
            setting = _RENAMED_SETTINGS.get(param.name, param.name)
            source = _DEFAULT_FROM_SETTING.get((name, param.name))
            if setting in SETTING_NAMES and (name, param.name) not in _NOT_THE_SETTING:
                default = _DEFAULT_IN_WORDS.get(setting) or _shown(defaults.get(setting))
                about = f"default {default}; env {env_var_name(setting)}"
            elif source is not None:
                about = f"default the {source} setting, {defaults.get(source)!r}; env {env_var_name(source)}"
            else:
                default = _DEFAULT_IN_WORDS.get(param.name) or _shown(param.default)
                about = f"default {default}"
            param.help = f"{(param.help or '').rstrip()} ({about})".lstrip()
            param.show_default = False


def _help_option(command: Any) -> Any:
    """The command's -h/--help option (click makes it on demand, and keeps it once made)."""
    context = type(command).context_class(command, help_option_names=["-h", "--help"])
    return command.get_help_option(context)
