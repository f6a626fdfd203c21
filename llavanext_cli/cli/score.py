"""`llava score FILE...`: metrics of record files against the ground truth they carry (no model)."""

from __future__ import annotations

import json
import sys
from typing import Annotated, Optional

import typer

from llavanext_cli.errors import UsageError


def score(
    files: Annotated[Optional[list[str]], typer.Argument(
        metavar="FILE", help="Record files: JSON objects one a line (jsonl), or one JSON array; - reads standard "
        "input. Several files are scored as one set.", show_default=False)] = None,
    output_format: Annotated[str, typer.Option(
        "--format", help="text (tables) | json (one object) | csv (the per-label table; for VQA, one summary row).")
    ] = "text",
    by: Annotated[Optional[str], typer.Option(
        "--by", metavar="KEY", help="Also score each group of records sharing a value of this record key (e.g. "
        "question_type); records without it form the group null, shown as (none).", show_default=False)] = None,
) -> None:
    """Metrics of records against the ground truth they carry. No model is loaded: it answers in well under a
    second, as a step of a shell pipeline.

    Classification records (label + truth, as classify --truth-from-dirs
    writes them): accuracy, macro F1 (over the labels seen as a truth or a
    prediction), per-label precision / recall / F1 / support (precision 0
    for a label never predicted, as scikit-learn's zero_division=0) and the
    confusion matrix (rows = truth, columns = predicted). With scores, also
    top-k accuracy (k = 2, 3, 5 below the number of labels) and calibration
    (ECE over 10 equal-width bins of the top probability).

    VQA records (text + an answers list or an answer string): vqa_accuracy,
    the VQA challenge's measure after its official answer normalisation; a
    list scores the mean over its leave-one-out subsets of min(1, matches/3);
    a single answer (or a one-item list) scores 1 when equal after
    normalisation, counted in vqa_accuracy, and alone in exact_match.

    Input: JSON objects one a line (jsonl), or a file holding one JSON array
    (what --format json writes); blank lines skipped. Each input (an image
    and its prompt) counts once, by its last record, so a failure retried
    with --resume counts as its retry: count is the inputs scored, errors
    the inputs whose last record is an error, superseded the earlier
    records not counted. A line that is not a JSON object,
    a record without ground truth, classification and VQA records mixed, a
    missing file or nothing to score: exit 2, naming the file and line.

    Examples:

      llava score run.jsonl

      llava score run.jsonl --format json --by question_type

      cat day1.jsonl day2.jsonl | llava score -

      llava score run.json --format csv > per_label.csv
    """
    from llavanext_cli.cli import out
    from llavanext_cli.cli.views import evaluation_csv, evaluation_tables
    from llavanext_cli.engine.evaluation import STDIN_NAME, evaluate, read_records, repeated_inputs
    from llavanext_cli.io.formats import check_format

    check_format("score", output_format)
    if not files:
        raise UsageError("no record files", hint="pass jsonl files written by llava classify / ask, or - for stdin")
    records = read_records(files, sys.stdin)
    repeated = repeated_inputs(records)
    if repeated:
        out.warn(f"{len(repeated)} record{'s answer' if len(repeated) > 1 else ' answers'} an image and prompt "
                 f"answered before (first at {repeated[0]}): a file written to by two runs? Each input counts once, "
                 "by its last record (--resume appends only what is missing)")
    evaluation = evaluate(records, by=by, inputs=", ".join(STDIN_NAME if path == "-" else path for path in files))
    if by is not None and set(evaluation.groups) == {None}:
        out.warn(f"no record has the key {by!r}: every record is in the group (none)")
    if output_format == "json":
        out.line(json.dumps(evaluation.as_dict(), indent=2, ensure_ascii=False))
    elif output_format == "csv":
        out.stream(evaluation_csv(evaluation))
    else:
        for view in evaluation_tables(evaluation, out.width()):
            out.view(view)
