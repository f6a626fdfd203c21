"""`llava classify IMAGES... --labels "a,b,c"`"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from llavanext_cli.cli import options as opt
from llavanext_cli.errors import UsageError


def classify(
    images: opt.ImagesArg = None,
    labels: Annotated[Optional[str], typer.Option("--labels", help='Comma-separated labels: "cat,dog,bird".',
                                                  show_default=False)] = None,
    labels_file: Annotated[Optional[Path], typer.Option("--labels-file", help="One label a line (# comments).",
                                                        show_default=False)] = None,
    prompt: Annotated[Optional[str], typer.Option(
        "--prompt", help="The question; {labels} becomes the labels joined by \", \".",
        show_default=False)] = None,
    normalize: Annotated[Optional[str], typer.Option(
        "--normalize", help="sum | mean: a label's score is the sum or the mean of its tokens' log-probabilities.",
        show_default=False)] = None,
    top_k: Annotated[int, typer.Option("--top-k", help="Labels shown per image in the text display.", min=1)] = 5,
    truth_from_dirs: Annotated[bool, typer.Option(
        "--truth-from-dirs", help="Each image's ground truth is its parent folder's name, kept as \"truth\" in its "
        "record (error records too, for llava score --by truth). A directory is an ImageFolder root, ROOT/CLASS/IMAGE: "
        "its class subfolders' images (--recursive: any depth below them, the truth still the parent folder); a "
        "directory with no class folders is one itself. Without --labels, the labels are the sorted folder names.")
    ] = False,
    recursive: opt.RecursiveOpt = False,
    model: opt.ModelOpt = None,
    prompt_format: opt.PromptFormatOpt = None,
    dtype: opt.DtypeOpt = None,
    quant: opt.QuantOpt = None,
    quant_type: opt.QuantTypeOpt = None,
    attn: opt.AttnOpt = None,
    device: opt.DeviceOpt = None,
    batch_size: opt.BatchSizeOpt = None,
    output_format: opt.FormatOpt = None,
    output: opt.OutputOpt = None,
    resume: opt.ResumeOpt = False,
    overwrite: opt.OverwriteOpt = False,
    max_memory: opt.MaxMemoryOpt = None,
    memory_check: opt.MemoryCheckOpt = None,
    config: opt.ConfigOpt = None,
    offline: opt.OfflineOpt = None,
    verbose: opt.VerboseOpt = False,
) -> int:
    """Zero-shot classification: each label scored as the model's answer, probabilities that sum to 1.
    Each image runs through the model once, however many labels there are.

    With --truth-from-dirs, images in class folders (ROOT/cat/1.jpg,
    ROOT/dog/7.jpg) carry their folder's name as the truth, and the
    folder names are the labels: llava score then measures the run.

    Examples:

      llava classify photo.jpg --labels "cat,dog,bird"

      llava classify photos/ --labels-file labels.txt -o labels.jsonl

      llava classify photo.jpg --labels "indoor,outdoor" --prompt "Is this photo {labels}?"

      llava classify pets/ --truth-from-dirs -o run.jsonl; llava score run.jsonl

      llava classify photos/ --labels "indoor,outdoor" --format imagefolder -o photos/metadata.jsonl
    """
    flags = opt.model_flags(locals())
    from llavanext_cli.cli.execute import execute
    from llavanext_cli.cli.run import settings_for
    from llavanext_cli.io.images import ImageFetching
    from llavanext_cli.io.inputs import expand_inputs, expand_with_truth
    from llavanext_cli.io.records import Subject
    from llavanext_cli.engine.scoring import (
        LabelJob, classification_prompt, classify_inputs, labels_from_truths, parse_labels, truths_outside)

    if labels is not None and labels_file is not None:
        raise UsageError("give --labels or --labels-file, not both")
    label_list = None
    if labels_file is not None:
        from llavanext_cli.io.textfiles import read_text

        label_list = parse_labels(lines=read_text(labels_file, "labels file").splitlines())
    elif labels is not None or not truth_from_dirs:
        label_list = parse_labels(labels)
    if not images:
        from llavanext_cli.io.inputs import no_input_images

        raise no_input_images()
    settings = settings_for(flags, config)
    if truth_from_dirs:
        jobs = [LabelJob(Subject.of(source), truth)
                for source, truth in expand_with_truth(images, recursive=recursive, stdin=sys.stdin)]
        truths = [job.truth for job in jobs]
        if label_list is None:
            label_list = labels_from_truths(truths)
        else:
            outside = truths_outside(truths, label_list)
            if outside:
                from llavanext_cli.cli.console import warn

                warn(f"{len(outside)} class folder{'s are' if len(outside) > 1 else ' is'} not among the labels, "
                     f"so {'their' if len(outside) > 1 else 'its'} images can never be classified right: "
                     + ", ".join(outside))
    else:
        jobs = [LabelJob(Subject.of(source)) for source in expand_inputs(images, recursive=recursive, stdin=sys.stdin)]
    question = classification_prompt(prompt if prompt is not None else settings.classify_prompt, label_list)
    fetching = ImageFetching.from_settings(settings)

    def records_for(run, todo, on_text):
        return classify_inputs(run.checkpoint, todo, question, label_list, settings.normalize, settings.batch_size,
                               fetching)

    from llavanext_cli.io.dataset_outputs import DataSetFlags

    return execute(settings, jobs, records_for, output, resume, verbose,
                   draw=lambda record: show_scores(record, len(jobs) > 1, top_k),
                   data_set=DataSetFlags(overwrite=overwrite))


def show_scores(record: dict, many: bool, top_k: int) -> None:
    """The text display: the top-k labels of an image as horizontal bars, most probable first."""
    from rich.console import Console
    from rich.table import Table
    from rich.text import Text

    console = Console(highlight=False)
    ranked = sorted(record["scores"].items(), key=lambda item: -item[1])[:top_k]
    title = Text(str(record["image"])) if many else None
    if "truth" in record:  # --truth-from-dirs
        title = (title + "  " if title is not None else Text()) + Text(f"truth: {record['truth']}", style="not bold")
    table = Table(show_header=False, box=None, padding=(0, 1), title=title, title_justify="left", title_style="bold")
    table.add_column(no_wrap=True)
    table.add_column(width=30, no_wrap=True)
    table.add_column(justify="right")
    for label, probability in ranked:
        filled = round(probability * 30)
        bar = Text("█" * filled, style="green") + Text("·" * (30 - filled), style="dim")
        table.add_row(Text(label, style="bold" if label == record["label"] else ""), bar, f"{probability:6.1%}")
    console.print(table)
