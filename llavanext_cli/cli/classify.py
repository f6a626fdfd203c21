"""`llava classify IMAGES... --labels "a,b,c"`"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from llavanext_cli.cli import options as opt
from llavanext_cli.cli import out
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
    server: opt.ServerOpt = None,
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
    from llavanext_cli.api.jobs import classify_jobs
    from llavanext_cli.cli.batch import command_model, run_batch
    from llavanext_cli.cli.views import classification_bars
    from llavanext_cli.engine.scoring import classification_prompt
    from llavanext_cli.io.dataset_outputs import DataSetFlags
    from llavanext_cli.io.settings import resolve_settings

    jobs, label_list = classify_jobs(images, labels=labels, labels_file=labels_file, truth_from_dirs=truth_from_dirs,
                                     recursive=recursive, stdin=sys.stdin)
    model = command_model(resolve_settings(flags, config), server)
    question = classification_prompt(prompt if prompt is not None else model.settings.classify_prompt, label_list)

    def records_of(opened, todo, on_text):
        return opened.classify_jobs(todo, label_list, question)

    return run_batch(model, jobs, records_of, output=output, resume=resume, verbose=verbose,
                     draw=lambda record: out.view(classification_bars(record, len(jobs) > 1, top_k)),
                     data_set=DataSetFlags(overwrite=overwrite))
