"""The one --format vocabulary: what each format is, which commands write which, and how a format is chosen when
--format is not given (-o FILE's extension)."""

from __future__ import annotations

from pathlib import Path

from llavanext_cli.errors import UsageError

FORMATS = {
    "text": "for people: an answer (or a label) a line; IMAGE<TAB>ANSWER when there are several",
    "json": "one JSON array of records, written whole when the run ends",
    "jsonl": "one JSON record a line, appended and flushed as each is final (--resume reads them back)",
    "csv": "the records as a table, written whole when the run ends",
    "imagefolder": "-o DIR/metadata.jsonl: a Hugging Face data set's lines, {file_name, text or label} a success",
}
# The formats a batch command writes records in (imagefolder is a training-set output, see dataset_outputs).
RECORD_FORMATS = ("text", "json", "jsonl", "csv")
# Those appended to a file line by line: locked while a run writes, read back by --resume.
APPENDED_FORMATS = ("jsonl", "imagefolder")
COMMAND_FORMATS = {
    "caption": (*RECORD_FORMATS, "imagefolder"),
    "ask": (*RECORD_FORMATS, "imagefolder"),
    "classify": (*RECORD_FORMATS, "imagefolder"),
    "chat": ("text", "jsonl"),
    "score": ("text", "json", "csv"),
    "inspect-config": ("text", "json"),
}
FORMAT_OF_EXTENSION = {".jsonl": "jsonl", ".json": "json", ".csv": "csv", ".txt": "text", ".log": "text", "": "text"}


def check_format(command: str, fmt: str) -> str:
    """`fmt` when `command` writes it; a usage error (naming what it writes) otherwise."""
    allowed = COMMAND_FORMATS[command]
    if fmt not in allowed:
        named = ", ".join(allowed[:-1]) + f" or {allowed[-1]}"
        raise UsageError(f"--format must be {named} for {command}, not {fmt!r}")
    return fmt


def format_for(requested: str | None, output: Path | None) -> str:
    """--format, else the output file's extension (.jsonl, .json, .csv; .txt, .log or none: text). Any other
    extension names no format: a usage error, rather than a spreadsheet that is really text."""
    if requested:
        return requested
    if output is None:
        return "text"
    extension = output.suffix.lower()
    if extension not in FORMAT_OF_EXTENSION:
        raise UsageError(f"-o {output}: {output.suffix} is not an output format llava writes",
                         hint="name one with --format text|json|jsonl|csv, or use a .jsonl, .json, .csv or .txt file")
    return FORMAT_OF_EXTENSION[extension]
