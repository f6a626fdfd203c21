"""The commands' own views of their results, as rich renderables that `out.view` puts on stdout: classify's bars,
score's tables (and its CSV), inspect-config's report. No printing here: out.py is the one place that does."""

from __future__ import annotations

import csv
import io
from typing import Any, Optional

from llavanext_cli.engine.evaluation import Evaluation


def classification_bars(record: dict, many: bool, top_k: int) -> Any:
    """An image's top-k labels as horizontal bars, most probable first."""
    from rich.table import Table
    from rich.text import Text

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
    return table


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


def evaluation_tables(evaluation: Evaluation, width: int) -> list[Any]:
    """The summary (and what "inputs scored" counts); for classification the per-label table (worst F1 first) and
    the confusion matrix as a shaded grid, where it fits in `width`; with --by, the headline metrics per group (worst
    first)."""
    from rich.text import Text

    overall = evaluation.overall
    views: list[Any] = [_summary_table(evaluation.kind, overall)]
    counted = ("Each input (an image and its prompt) counts once, by its last record: a failure retried with "
               "--resume counts as its retry")
    if evaluation.superseded:
        plural = "s" if evaluation.superseded > 1 else ""
        counted += f"; {evaluation.superseded} earlier record{plural} of such inputs not counted"
    views.append(Text(counted + ".", style="dim"))
    if evaluation.kind == "classification" and overall.count:
        views.append(_per_label_table(overall))
        grid = _confusion_grid(overall, width)
        views.append(grid if grid is not None else
                     Text(f"confusion matrix: {len(overall.labels)} labels, too wide to draw here (--format json has "
                          "it)", style="dim"))
    if evaluation.by is not None:
        views.append(_groups_table(evaluation))
    return views


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


def _human_bytes(count: int) -> str:
    size = float(count)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if size < 1024 or unit == "TiB":
            return f"{size:.1f} {unit}" if unit != "B" else f"{int(size)} B"
        size /= 1024
    return str(count)


def inspection_tables(report: dict[str, Any]) -> list[Any]:
    """inspect-config's text report: a summary, the vision and text configs, the weight memory."""
    from rich.table import Table
    from rich.text import Text

    views: list[Any] = []
    summary = Table(title=Text(str(report["model"])), show_header=False, title_justify="left")
    summary.add_column(style="bold")
    summary.add_column(overflow="fold")
    for key in ("architecture", "prompt_format", "prompt_format_source", "image_token_index",
                "vision_feature_layer", "vision_feature_select_strategy", "image_grid_pinpoints", "parameters",
                "image_size", "image_tokens", "tiles", "grid", "config_error", "processor_error"):
        if key in report and report[key] is not None:
            value = report[key]
            summary.add_row(key, Text(f"{value:,}" if key == "parameters" else str(value)))
    summary.add_row("prompt", Text(repr(report["prompt"]) if report["prompt"] is not None else "-"))
    views.append(summary)
    for part in ("vision", "text"):
        if report.get(part):
            table = Table(title=f"{part} model", title_justify="left")
            table.add_column("setting", style="bold")
            table.add_column("value")
            for key, value in report[part].items():
                table.add_row(key, Text(str(value)))
            views.append(table)
    if report.get("memory_bytes"):
        table = Table(title="weight memory", title_justify="left")
        table.add_column("dtype / quant", style="bold")
        table.add_column("bytes", justify="right")
        table.add_column("", justify="right")
        table.add_column(f"GPUs of {report.get('gpu_memory')}", justify="right")
        for key, value in report["memory_bytes"].items():
            table.add_row(key, f"{value:,}", _human_bytes(value), str(report.get("gpus_needed", {}).get(key, "")))
        views.append(table)
    return views
