"""The jobs of a classify run from its arguments, as the CLI and the Python API take them: the labels (given, from
a file, or the class folders' names) and, with --truth-from-dirs, each image's truth (its parent folder)."""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import TextIO

from llavanext_cli.engine.scoring import LabelJob, labels_from_truths, parse_labels, truths_outside
from llavanext_cli.errors import InputWarning, UsageError
from llavanext_cli.io.inputs import expand_inputs, expand_with_truth, no_input_images
from llavanext_cli.io.records import Subject


def classify_jobs(images: Sequence[str] | None, *, labels: str | Sequence[str] | None = None,
                  labels_file: str | Path | None = None, truth_from_dirs: bool = False, recursive: bool = False,
                  stdin: TextIO | None = None) -> tuple[list[LabelJob], list[str]]:
    """The jobs and the labels. Labels come from `labels` ("a,b,c" or a list), or `labels_file` (one a line, `#`
    comments), or with `truth_from_dirs` and neither, from the class folders' names; a class folder that is not
    among given labels is warned about (InputWarning): its images can never be classified right."""
    if labels is not None and labels_file is not None:
        raise UsageError("give --labels or --labels-file, not both")
    label_list = None
    if labels_file is not None:
        from llavanext_cli.io.textfiles import read_text

        label_list = parse_labels(lines=read_text(labels_file, "labels file").splitlines())
    elif labels is not None or not truth_from_dirs:
        label_list = parse_labels(labels) if labels is None or isinstance(labels, str) else parse_labels(given=labels)
    if not images:
        raise no_input_images()
    if not truth_from_dirs:
        return [LabelJob(Subject.of(source)) for source in expand_inputs(images, recursive=recursive, stdin=stdin)], \
            label_list  # type: ignore[return-value]
    jobs = [LabelJob(Subject.of(source), truth)
            for source, truth in expand_with_truth(images, recursive=recursive, stdin=stdin)]
    truths = [job.truth for job in jobs]
    if label_list is None:
        return jobs, labels_from_truths(truths)  # type: ignore[arg-type]
    outside = truths_outside(truths, label_list)  # type: ignore[arg-type]
    if outside:
        many = len(outside) > 1
        warnings.warn(f"{len(outside)} class folder{'s are' if many else ' is'} not among the labels, so "
                      f"{'their' if many else 'its'} images can never be classified right: " + ", ".join(outside),
                      InputWarning, stacklevel=2)
    return jobs, label_list
