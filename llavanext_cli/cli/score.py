"""`llava score FILE...`: metrics of record files against the ground truth they carry (no model)."""

from __future__ import annotations

import csv
import io
import json
import sys
from typing import TYPE_CHECKING, Annotated, Any, Optional

import typer

from llavanext_cli.errors import UsageError

if TYPE_CHECKING:
    from llavanext_cli.engine.evaluation import Evaluation


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
    from llavanext_cli.cli.console import warn
    from llavanext_cli.engine.evaluation import STDIN_NAME, evaluate, read_records, repeated_inputs

    if output_format not in ("text", "json", "csv"):
        raise UsageError(f"--format must be text, json or csv for score, not {output_format!r}")
    if not files:
        raise UsageError("no record files", hint="pass jsonl files written by llava classify / ask, or - for stdin")
    inputs = ", ".join(STDIN_NAME if path == "-" else path for path in files)
    records = read_records(files, sys.stdin)
    repeated = repeated_inputs(records)
    if repeated:
        warn(f"{len(repeated)} record{'s answer' if len(repeated) > 1 else ' answers'} an image and prompt answered "
             f"before (first at {repeated[0]}): a file written to by two runs? Each input counts once, by its last "
             "record (--resume appends only what is missing)")
    evaluation = evaluate(records, by=by, inputs=inputs)
    if by is not None and set(evaluation.groups) == {None}:
        warn(f"no record has the key {by!r}: every record is in the group (none)")
    if output_format == "json":
        print(json.dumps(evaluation.as_dict(), indent=2, ensure_ascii=False))
    elif output_format == "csv":
        sys.stdout.write(evaluation_csv(evaluation))
    else:
        render_text(evaluation)


def evaluation_csv(evaluation: Evaluation) -> str:
    """Classification: label, precision, recall, f1, support a row (sorted by label). VQA: one summary row
    (count, errors, vqa_accuracy, exact_match). With --by, a first `group` column and the rows of every group
    (empty for the group null)."""
    if evaluation.kind == "classification":
        columns = ["label", "precision", "recall", "f1", "support"]

        def rows(metrics) -> list[list[Any]]:
            return [[label, stats.precision, stats.recall, stats.f1, stats.support]
                    for label, stats in metrics.per_label.items()]
    else:
        columns = ["count", "errors", "vqa_accuracy", "exact_match"]

        def rows(metrics) -> list[list[Any]]:
            return [[metrics.count, metrics.errors, metrics.vqa_accuracy, metrics.exact_match]]

    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    if evaluation.by is None:
        writer.writerow(columns)
        writer.writerows(rows(evaluation.overall))
    else:
        writer.writerow(["group", *columns])
        for name, metrics in evaluation.groups.items():
            writer.writerows([["" if name is None else name, *row] for row in rows(metrics)])
    return buffer.getvalue()


def _rate(value: Optional[float]) -> str:
    return "-" if value is None else f"{value:.2%}"


def render_text(evaluation: Evaluation) -> None:
    """Rich tables on stdout: the summary; for classification the per-label table (worst F1 first) and the
    confusion matrix as a shaded grid; with --by, the headline metrics per group (worst first)."""
    from rich.console import Console

    console = Console(highlight=False)
    overall = evaluation.overall
    console.print(_summary_table(evaluation.kind, overall))
    note = ("Each input (an image and its prompt) counts once, by its last record: a failure retried with --resume "
            "counts as its retry")
    if evaluation.superseded:
        note += f"; {evaluation.superseded} earlier record{'s' if evaluation.superseded > 1 else ''} of such inputs not counted"
    console.print(note + ".", style="dim", markup=False)
    if evaluation.kind == "classification" and overall.count:
        console.print(_per_label_table(overall))
        grid = _confusion_grid(overall, console.width)
        if grid is not None:
            console.print(grid)
        else:
            console.print(f"confusion matrix: {len(overall.labels)} labels, too wide to draw here "
                          "(--format json has it)", style="dim", markup=False)
    if evaluation.by is not None:
        console.print(_groups_table(evaluation))


def _summary_table(kind: str, metrics):
    from rich.table import Table

    table = Table(title="classification" if kind == "classification" else "VQA", show_header=False,
                  title_justify="left", title_style="bold")
    table.add_column(style="bold")
    table.add_column(justify="right")
    table.add_row("inputs scored", str(metrics.count))
    table.add_row("inputs failed", str(metrics.errors))
    if kind == "classification":
        table.add_row("accuracy", _rate(metrics.accuracy))
        table.add_row("macro F1", _rate(metrics.macro_f1))
        for k, value in (metrics.top_k_accuracy or {}).items():
            table.add_row(f"top-{k} accuracy", _rate(value))
        if metrics.ece is not None:
            table.add_row("ECE (10 bins)", _rate(metrics.ece))
            table.add_row("mean confidence", _rate(metrics.mean_confidence))
    else:
        table.add_row("VQA accuracy", _rate(metrics.vqa_accuracy))
        table.add_row("answer lists", str(metrics.answer_lists))
        table.add_row("single answers", str(metrics.single_answers))
        if metrics.exact_match is not None:
            table.add_row("exact match (single answers)", _rate(metrics.exact_match))
    return table


def _per_label_table(metrics):
    from rich.table import Table
    from rich.text import Text

    table = Table(title="per label, worst F1 first", title_justify="left", title_style="bold")
    table.add_column("label", overflow="fold")
    for name in ("precision", "recall", "F1", "support"):
        table.add_column(name, justify="right")
    for label, stats in sorted(metrics.per_label.items(), key=lambda item: (item[1].f1, item[0])):
        table.add_row(Text(label), _rate(stats.precision), _rate(stats.recall), _rate(stats.f1), str(stats.support))
    return table


def _shade(share: float, diagonal: bool) -> str:
    """A background from dark grey to green (right answers) or red (confusions) by the share of the row."""
    base = (40, 40, 40)
    full = (30, 150, 60) if diagonal else (200, 50, 40)
    red, green, blue = (round(b + (f - b) * share) for b, f in zip(base, full))
    return f"rgb({red},{green},{blue})"


def _confusion_grid(metrics, width: int):
    """The matrix as a grid of shaded cells, headed by the labels where they fit in `width`, else by their
    numbers (rows then read "3 label"); None when even that does not fit."""
    from rich.style import Style
    from rich.table import Table
    from rich.text import Text

    size = len(metrics.labels)
    digits = len(str(max((max(row) for row in metrics.matrix), default=0)))
    row_width = min(max(len(label) for label in metrics.labels), 30)
    number_width = len(str(size))
    # Cells carry their own one-space margins and sit side by side, so the shading reads as one grid.
    if row_width + 2 + sum(max(len(label), digits) + 2 for label in metrics.labels) <= width:
        headers, rows = list(metrics.labels), list(metrics.labels)
    elif number_width + 1 + row_width + 2 + size * (max(number_width, digits) + 2) <= width:
        headers = [str(number) for number in range(1, size + 1)]
        rows = [f"{number:>{number_width}} {label}" for number, label in enumerate(metrics.labels, 1)]
    else:
        return None
    table = Table(title="confusion matrix", title_justify="left", title_style="bold", box=None, padding=0,
                  caption="rows: truth, columns: predicted, shade: share of the row", caption_justify="left",
                  caption_style="dim")
    table.add_column("truth \\ predicted", no_wrap=True, overflow="ellipsis", min_width=min(len(rows[0]), 12),
                     max_width=number_width + 1 + 30 + 2)
    for header in headers:
        table.add_column(Text(f" {header} "), justify="right", no_wrap=True, min_width=max(len(header), digits) + 2)
    for row_index, (name, row) in enumerate(zip(rows, metrics.matrix)):
        total = sum(row)
        cells = []
        for column_index, count in enumerate(row):
            share = count / total if total else 0.0
            style = Style(bgcolor=_shade(share, row_index == column_index), color="white", dim=count == 0)
            cells.append(Text(f" {count} ", style=style))
        table.add_row(Text(f"{name}  "), *cells)
    return table


def _groups_table(evaluation: Evaluation):
    from rich.table import Table
    from rich.text import Text

    classification = evaluation.kind == "classification"
    table = Table(title=f"by {evaluation.by}, worst first", title_justify="left", title_style="bold")
    table.add_column(evaluation.by, overflow="fold")
    table.add_column("scored", justify="right")
    table.add_column("failed", justify="right")
    if classification:
        table.add_column("accuracy", justify="right")
        table.add_column("macro F1", justify="right")
    else:
        table.add_column("VQA accuracy", justify="right")
        table.add_column("exact match", justify="right")

    def worst_first(item) -> tuple:
        name, metrics = item
        return (metrics.headline is None, metrics.headline or 0.0, name is None, name or "")

    for name, metrics in sorted(evaluation.groups.items(), key=worst_first):
        second = metrics.macro_f1 if classification else metrics.exact_match
        table.add_row(Text("(none)", style="dim") if name is None else Text(name), str(metrics.count),
                      str(metrics.errors), _rate(metrics.headline), _rate(second))
    return table
