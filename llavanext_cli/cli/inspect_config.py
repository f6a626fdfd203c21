"""`llava inspect-config [MODEL]`"""

from __future__ import annotations

import json
from typing import Annotated, Any, Optional

import typer

from llavanext_cli.cli import options as opt
from llavanext_cli.errors import UsageError


def inspect_config(
    model_arg: Annotated[Optional[str], typer.Argument(
        metavar="[MODEL]", help="The checkpoint to inspect: a hub id or a local directory.",
        show_default=False)] = None,
    prompt: Annotated[Optional[str], typer.Option(
        "--prompt", help="The question to render in the one-image prompt.", show_default=False)] = None,
    image_size: Annotated[Optional[str], typer.Option(
        "--image-size", help="WIDTHxHEIGHT: report the image tokens and tiles for an image of this size.",
        show_default=False)] = None,
    output_format: Annotated[str, typer.Option("--format", help="text | json.")] = "text",
    gpu_memory: Annotated[str, typer.Option(
        "--gpu-memory", help="Memory of one GPU, for how many GPUs the checkpoint needs per dtype / quant.")] = "80GiB",
    schema: opt.SchemaOpt = None,
    model: opt.ModelOpt = None,
    prompt_format: opt.PromptFormatOpt = None,
    config: opt.ConfigOpt = None,
    offline: opt.OfflineOpt = None,
    verbose: opt.VerboseOpt = False,
) -> None:
    """What a checkpoint is and how llava will run it: architecture, prompt format and the rendered prompt,
    vision and text configs, parameters and memory per dtype / quantization. Reads the config only (no weights).

    Examples:

      llava inspect-config llava-hf/llava-v1.6-mistral-7b-hf --offline --format json

      llava inspect-config ./tiny --image-size 1024x768

      llava inspect-config ./tiny --schema 'count int, kind: person|animal|object'   (the prompt --schema sends)
    """
    from llavanext_cli.cli.console import warn
    from llavanext_cli.model.inspection import DEFAULT_INSPECT_PROMPT, inspect_checkpoint, parse_image_size, parse_memory
    from llavanext_cli.cli.run import user_config_path
    from llavanext_cli.io.settings import load_settings

    if output_format not in ("text", "json"):
        raise UsageError(f"--format must be text or json for inspect-config, not {output_format!r}")
    if model_arg and model and model_arg != model:
        raise UsageError(f"two models given: {model_arg} and -m {model}")
    settings = load_settings(opt.given(model=model_arg or model, prompt_format=prompt_format, offline=offline), config,
                             user_config=user_config_path())
    size = parse_image_size(image_size) if image_size else None
    parse_memory(gpu_memory)

    from llavanext_cli.model.loading import configure_library_logging

    configure_library_logging(verbose)
    question = prompt or DEFAULT_INSPECT_PROMPT
    if schema is not None:
        from llavanext_cli.engine.structured import load_schema

        question = load_schema(schema).prompt(question)  # what caption / ask --schema send
    report = inspect_checkpoint(settings.model, prompt=question, image_size=size,
                                requested_format=settings.prompt_format, offline=settings.offline,
                                gpu_memory=gpu_memory)
    if report.get("warning"):
        warn(report["warning"])
    if output_format == "json":
        print(json.dumps(report, indent=2, ensure_ascii=False))
    else:
        render_report(report)


def _human_bytes(count: int) -> str:
    size = float(count)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if size < 1024 or unit == "TiB":
            return f"{size:.1f} {unit}" if unit != "B" else f"{int(size)} B"
        size /= 1024
    return str(count)


def render_report(report: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table
    from rich.text import Text

    console = Console(highlight=False, markup=False)
    summary = Table(title=report["model"], show_header=False, title_justify="left")
    summary.add_column(style="bold")
    summary.add_column(overflow="fold")
    for key in ("architecture", "prompt_format", "prompt_format_source", "image_token_index",
                "vision_feature_layer", "vision_feature_select_strategy", "image_grid_pinpoints", "parameters",
                "image_size", "image_tokens", "tiles", "grid", "config_error", "processor_error"):
        if key in report and report[key] is not None:
            value = report[key]
            summary.add_row(key, Text(f"{value:,}" if key == "parameters" else str(value)))
    summary.add_row("prompt", Text(repr(report["prompt"]) if report["prompt"] is not None else "-"))
    console.print(summary)
    for part in ("vision", "text"):
        if report.get(part):
            table = Table(title=f"{part} model", title_justify="left")
            table.add_column("setting", style="bold")
            table.add_column("value")
            for key, value in report[part].items():
                table.add_row(key, Text(str(value)))
            console.print(table)
    if report.get("memory_bytes"):
        table = Table(title="weight memory", title_justify="left")
        table.add_column("dtype / quant", style="bold")
        table.add_column("bytes", justify="right")
        table.add_column("", justify="right")
        table.add_column(f"GPUs of {report.get('gpu_memory')}", justify="right")
        for key, value in report["memory_bytes"].items():
            table.add_row(key, f"{value:,}", _human_bytes(value), str(report.get("gpus_needed", {}).get(key, "")))
        console.print(table)
