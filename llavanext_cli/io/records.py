"""The records a run produces, one per input (the contract's "Records"): their kinds, their JSON, their CSV columns,
and the key that --resume matches a finished record to its input by.

- `Answer`: caption / ask, `{"image" | "images", "prompt", "text", "model", "new_tokens", "seconds"}`;
- `Classification`: classify, `{"image", "label", "scores", "model"}`; with --truth-from-dirs
  `{"image", "label", "truth", "scores", "model"}`;
- `Failure`: an input that failed, `{"image" | "images", "error"}` (and what its input carried: a --questions
  line's keys, classify's `"truth"`, so that `llava score --by truth` counts the errors of each class).

Keys a `--questions` line carries beyond its image and question are copied into its record (`extra`), after the
record's own keys and never in place of one. Every output format renders `to_json()`.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Union

JsonRecord = dict[str, Any]

# The contract's keys, in the order the CSV columns take them.
RECORD_KEYS = ("image", "images", "prompt", "text", "label", "truth", "scores", "model", "new_tokens", "seconds",
               "error")
# A --schema answer's parsed object: in JSON under "data"; in CSV, one column per top-level property instead.
DATA_KEY = "data"
# Those the tool makes, which a --questions line's own keys never replace nor add to a record (an ask record with a
# "label" would read as a classify record to --resume and `llava score`, one with "error" as a failure; the reader
# is told). "truth" is not one: it is ground truth the input carries, like "answers", and is copied as it was.
MADE_KEYS = frozenset(RECORD_KEYS) - {"truth"} | {DATA_KEY}


@dataclass(frozen=True)
class Subject:
    """What a record is about: one image, or (`together`, ask --together) several images in one prompt; each
    named as the user knows it (the path as given, a directory's file as directory + name, or the URL)."""

    images: tuple[str, ...]
    together: bool = False

    @classmethod
    def of(cls, image: str) -> Subject:
        return cls((image,))

    def to_json(self) -> JsonRecord:
        return {"images": list(self.images)} if self.together else {"image": self.images[0]}

    def describe(self) -> str:
        return ", ".join(self.images)


def _with_extra(own: JsonRecord, extra: Mapping[str, Any]) -> JsonRecord:
    return {**own, **{key: value for key, value in extra.items() if key not in own and key not in MADE_KEYS}}


NO_DATA: Any = object()  # an Answer to a prompt without --schema


@dataclass(frozen=True)
class Answer:
    """caption / ask: the generated continuation (special tokens skipped, stripped), its length and time; with
    --schema, `data` is the answer parsed (valid against the schema) and `text` its JSON text."""

    subject: Subject
    prompt: str
    text: str
    model: str
    new_tokens: int
    seconds: float
    extra: Mapping[str, Any] = field(default_factory=dict)
    data: Any = NO_DATA
    prompt_tokens: int = field(default=0, compare=False)  # the tokens its prompt ran through the model (-v's figures)

    ok = True

    def to_json(self) -> JsonRecord:
        data = {} if self.data is NO_DATA else {"data": self.data}
        return _with_extra({**self.subject.to_json(), "prompt": self.prompt, "text": self.text, **data,
                            "model": self.model, "new_tokens": self.new_tokens, "seconds": self.seconds},
                           self.extra)


@dataclass(frozen=True)
class Classification:
    """classify: the most probable label and every label's probability, in the order the labels were given; with
    --truth-from-dirs the ground truth (the image's parent folder), right after the label."""

    subject: Subject
    label: str
    scores: dict[str, float]
    model: str
    extra: Mapping[str, Any] = field(default_factory=dict)
    truth: str | None = None

    ok = True

    def to_json(self) -> JsonRecord:
        truth = {} if self.truth is None else {"truth": self.truth}
        return _with_extra({**self.subject.to_json(), "label": self.label, **truth, "scores": self.scores,
                            "model": self.model}, self.extra)


@dataclass(frozen=True)
class Failure:
    """An input that could not be used; the run goes on with the others."""

    subject: Subject
    error: str
    extra: Mapping[str, Any] = field(default_factory=dict)

    ok = False

    def to_json(self) -> JsonRecord:
        return _with_extra({**self.subject.to_json(), "error": self.error}, self.extra)


Record = Union[Answer, Classification, Failure]


# --- which records answer the same input (--resume, an imagefolder's lines, llava score) -------------------------


def input_key(images: Sequence[str], together: bool, prompt: str | None) -> str:
    """The one definition of "the same input": its image or images (a URL as it is, a path made absolute, so that
    `./a.jpg` and `a.jpg` are one input; `ask --together` images as a list) and the prompt asked (None for classify,
    which asks one prompt of every image). --resume matches finished records to inputs by it, an imagefolder its
    lines, and `llava score` counts each input once by it."""
    def absolute(image: str) -> str:
        return image if image.lower().startswith(("http://", "https://")) else os.path.abspath(image)

    named = [absolute(image) for image in images]
    return json.dumps([named, together, prompt], ensure_ascii=False)


def record_input_key(record: Mapping[str, Any]) -> str | None:
    """The input a record (read back as JSON) answers; None for one that names no image."""
    if isinstance(record.get("images"), list):
        return input_key([str(image) for image in record["images"]], True, _prompt_of(record))
    if isinstance(record.get("image"), str):
        return input_key([record["image"]], False, _prompt_of(record))
    return None


def _prompt_of(record: Mapping[str, Any]) -> str | None:
    prompt = record.get("prompt")
    return prompt if isinstance(prompt, str) else None


def resume_key(record: Mapping[str, Any]) -> str | None:
    """The input a record read back from a jsonl file answered, when it is a success (an error record's input is
    done again): caption / ask records answer an image and a prompt, classify records an image."""
    if "error" in record or not ("text" in record or "label" in record):
        return None
    return record_input_key(record)


# --- how records read in text and CSV -----------------------------------------------------------------------


def text_line(record: JsonRecord, many: bool, with_prompt: bool = False) -> str:
    """The human format: the answer alone for one input; `input<TAB>answer` a line for several, and
    `input<TAB>prompt<TAB>answer` where the inputs are asked different questions (greppable; newlines inside an
    answer are shown as spaces, use --format jsonl for the exact text)."""
    body = str(record["label"] if "label" in record else record.get("text", ""))
    if not many:
        return body
    subject = record["image"] if "image" in record else " ".join(map(str, record.get("images", [])))
    prompt = " ".join(str(record.get("prompt", "")).split()) + "\t" if with_prompt else ""
    return f"{subject}\t{prompt}" + " ".join(body.split("\n"))


def csv_rows(records: Sequence[JsonRecord]) -> list[JsonRecord]:
    """Records as CSV rows: a --schema answer's object spread into one column per top-level property (named
    "data.NAME" where NAME is a column of its own in any row, a contract key or a key copied from a --questions
    line, so that a column means one thing in every row); lists, objects and booleans (scores, images, copied
    keys, nested data) as JSON text."""
    taken = set(RECORD_KEYS) | {key for record in records for key in record if key != DATA_KEY}
    return [csv_row(record, taken) for record in records]


def csv_row(record: JsonRecord, taken: set[str]) -> JsonRecord:
    """One record as a CSV row (see csv_rows); `taken`: the column names a data property must not take."""
    row: JsonRecord = {}
    for key, value in record.items():
        if key == DATA_KEY and isinstance(value, dict):
            for name, item in value.items():
                row[name if name not in taken else f"{DATA_KEY}.{name}"] = item
        else:
            row[key] = value
    return {key: json.dumps(value, ensure_ascii=False) if isinstance(value, (dict, list, bool)) else value
            for key, value in row.items()}


def csv_columns(rows: Iterable[JsonRecord]) -> list[str]:
    """The contract's columns first (those any row has), then the other keys in the order the rows give them: a
    key a row has beyond the ones seen goes right after its predecessor in that row (so a --schema answer's
    properties keep the schema's order even where the first rows lack an optional one, before the keys copied
    from a --questions line)."""
    rows = list(rows)
    present = {key for row in rows for key in row}
    names = [key for key in RECORD_KEYS if key in present]
    for row in rows:
        previous = None
        for key in row:
            if key not in names:
                names.insert(names.index(previous) + 1 if previous is not None else len(names), key)
            previous = key if key not in RECORD_KEYS else None
    return names
