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
    from llavanext_cli.api import inspect
    from llavanext_cli.cli import out
    from llavanext_cli.cli.views import inspection_tables
    from llavanext_cli.io.formats import check_format
    from llavanext_cli.model.inspection import parse_image_size
    from llavanext_cli.model.loading import configure_library_logging

    check_format("inspect-config", output_format)
    if model_arg and model and model_arg != model:
        raise UsageError(f"two models given: {model_arg} and -m {model}")
    size = parse_image_size(image_size) if image_size else None
    configure_library_logging(verbose)
    report = inspect(model_arg or model, image_size=size, prompt=prompt, schema=schema, prompt_format=prompt_format,
                     offline=offline, gpu_memory=gpu_memory, config_file=config)
    if report.get("warning"):
        out.warn(report["warning"])
    if output_format == "json":
        out.line(json.dumps(report, indent=2, ensure_ascii=False))
    else:
        for view in inspection_tables(report):
            out.view(view)
