"""`llava init-model SPEC.yaml OUT_DIR`"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from llavanext_cli.cli import options as opt


def init_model(
    spec: Annotated[Path, typer.Argument(help="The checkpoint's YAML description (see configs/tiny-*.yaml).",
                                         show_default=False)],
    out_dir: Annotated[Path, typer.Argument(help="Where to write the checkpoint.", show_default=False)],
    seed: Annotated[Optional[int], typer.Option("--seed", help="Overrides the spec's seed.", show_default=False)] = None,
    force: Annotated[bool, typer.Option("--force", help="Write into a non-empty OUT_DIR.")] = False,
    verbose: opt.VerboseOpt = False,
) -> None:
    """Build a randomly initialised checkpoint (safetensors, processor, chat template) from a YAML spec.
    It loads with plain AutoProcessor / AutoModelForImageTextToText, and with every llava command.

    Examples:

      llava init-model configs/tiny-llava-next.yaml ./tiny

      llava caption examples/chelsea.png -m ./tiny --max-new-tokens 12
    """
    from llavanext_cli.cli import out
    from llavanext_cli.errors import SetupError, UsageError
    from llavanext_cli.model.init_model import build_checkpoint
    from llavanext_cli.model.loading import configure_library_logging

    if seed is not None and seed < 0:
        raise UsageError(f"--seed must be a non-negative integer, not {seed}")
    if not spec.is_file():  # like a settings or prompt-format file that cannot be read: exit 3
        raise SetupError(f"spec file not found: {spec}", hint="see configs/tiny-llava-next.yaml for an example spec")
    configure_library_logging(verbose)
    built = build_checkpoint(spec, out_dir, seed=seed, force=force)
    out.note(
        f"Built a {built.architecture} checkpoint with {built.parameters:,} parameters in {built.path} "
        f"(chat template: {built.chat_template or 'none'}).\nTry: llava caption IMAGE -m {built.path}",
    )
    print(built.path)
