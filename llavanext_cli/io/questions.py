"""The jobs of caption and ask, and where they come from: a PromptJob is one question about one image (or about several
at once); `ask --questions` reads them from a JSON-lines file, the API from dicts. Plain data: reading questions
needs neither the model nor the image library."""

from __future__ import annotations

import io
import json
import os
import warnings
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, TextIO

from llavanext_cli.errors import InputWarning, UsageError
from llavanext_cli.io.records import MADE_KEYS, Failure, Subject, input_key
from llavanext_cli.io.textfiles import read_text


@dataclass(frozen=True)
class PromptJob:
    """One question about one image, or (`subject.together`) about several images at once; `extra` holds the
    other keys of a --questions line, copied into the record."""

    subject: Subject
    prompt: str
    extra: dict[str, Any] = field(default_factory=dict)

    def key(self) -> str:
        return input_key(self.subject.images, self.subject.together, self.prompt)

    def failure(self, message: str) -> Failure:
        return Failure(self.subject, message, self.extra)


def read_question_jobs(stream: TextIO, name: str, folder: str = "") -> list[PromptJob]:
    """`ask --questions`: one JSON object a line with "image" or "images" and "question" (see `question_jobs`). A
    line that is not a JSON object is a usage error naming the line."""
    def items() -> Iterator[tuple[str, Any]]:
        for number, line in enumerate(stream, start=1):
            if not line.strip():
                continue
            where = f"{name}:{number}"
            try:
                yield where, json.loads(line)
            except ValueError as exc:
                raise UsageError(f"{where}: not a JSON object ({exc.msg})") from exc

    return question_jobs(items(), name, folder)


def question_jobs(items: Iterable[tuple[str, Any]], name: str, folder: str = "") -> list[PromptJob]:
    """Jobs from (where, item) pairs, an item being `{"image" or "images", "question", ...}`: other keys are kept and
    copied into the record, except those named like the record's own (a warning says which). A malformed item is a
    usage error naming where it is. A relative image path is relative to `folder` (the file's, as the user spelled
    it; "" for stdin or items given in Python: the current directory), and is named so in its record, as a
    directory's files are (`data/vqa.jsonl`'s `img/1.jpg` is `data/img/1.jpg`)."""

    def located(image: str) -> str:
        from llavanext_cli.io.images import is_url

        return image if not folder or is_url(image) or os.path.isabs(image) else os.path.join(folder, image)

    jobs = []
    not_copied: set[str] = set()
    for where, item in items:
        if not isinstance(item, dict):
            raise UsageError(f"{where}: expected a JSON object")
        question = item.get("question")
        if not isinstance(question, str) or not question.strip():
            raise UsageError(f"{where}: needs a non-empty \"question\" string")
        if ("image" in item) == ("images" in item):
            raise UsageError(f"{where}: needs exactly one of \"image\" or \"images\"")
        if "image" in item:
            if not isinstance(item["image"], str) or not item["image"]:
                raise UsageError(f"{where}: \"image\" must be a path or URL string")
            subject = Subject.of(located(item["image"]))
        else:
            value = item["images"]
            if not isinstance(value, list) or not value or not all(isinstance(v, str) and v for v in value):
                raise UsageError(f"{where}: \"images\" must be a non-empty list of paths or URLs")
            subject = Subject(tuple(map(located, value)), together=True)
        extra = {k: v for k, v in item.items() if k not in ("image", "images", "question")}
        not_copied.update(key for key in extra if key in MADE_KEYS)
        jobs.append(PromptJob(subject, question, extra))
    if not jobs:
        raise UsageError(f"{name}: no questions")
    if not_copied:
        keys = ", ".join(f'"{key}"' for key in sorted(not_copied))
        warnings.warn(f"{name}: {keys} {'is a key' if len(not_copied) == 1 else 'are keys'} of the records this "
                      "command writes, not copied from the questions file (rename to keep)", InputWarning,
                      stacklevel=2)
    return jobs


def open_questions(path: str, stdin: TextIO) -> list[PromptJob]:
    if path == "-":
        return read_question_jobs(stdin, "<stdin>")
    return read_question_jobs(io.StringIO(read_text(path, "questions file")), path, os.path.dirname(path))


def check_questions(questions: str | Sequence[str] | None) -> list[str]:
    """The questions of an ask call (one or several), as the CLI checks its -q."""
    if isinstance(questions, str):
        questions = [questions]
    if not questions:
        raise UsageError("no question", hint="pass -q QUESTION, or --questions FILE.jsonl")
    if any(not isinstance(text, str) or not text.strip() for text in questions):
        raise UsageError("empty question in -q", hint="each -q takes a question: -q \"What is it?\"")
    return list(questions)
