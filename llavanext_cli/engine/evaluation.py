"""Metrics of record files against the ground truth they carry, for `llava score`: classification (accuracy,
macro F1, per-label precision / recall / F1, confusion matrix, top-k accuracy, calibration) and VQA accuracy
with the official VQA evaluation's answer normalisation.

Standard library only: scoring a file never loads a model, nor torch, nor numpy, and answers in a blink.
"""

from __future__ import annotations

import json
import re
from bisect import bisect_left
from collections.abc import Iterable
from dataclasses import dataclass, field
from functools import lru_cache
from typing import IO, Any, Optional

from llavanext_cli.errors import UsageError
from llavanext_cli.io.records import record_input_key
from llavanext_cli.io.textfiles import read_text

STDIN_NAME = "<stdin>"
CLASSIFICATION = "classification"
VQA = "vqa"
TOP_K = (2, 3, 5)  # reported where k < the number of labels (top-k of k >= labels is always 1)
CALIBRATION_BINS = 10


# ---------------------------------------------------------------------------------------------------------------
# Reading records
# ---------------------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class SourceRecord:
    """One record and where it came from (`FILE:LINE`), for error messages that point at the line to fix."""

    record: dict[str, Any]
    where: str


_JSON_SPACE = re.compile(r"[ \t\n\r]*")
_RECORD_FILES = "llava score reads the records of --format jsonl or json (e.g. -o run.jsonl), not csv or text"


def parse_records(name: str, text: str) -> list[SourceRecord]:
    """The records of one input: JSON objects one a line (blank lines skipped), or, when the text starts with `[`,
    one JSON array of objects (what `--format json` writes). Anything else is a UsageError naming `name:LINE`."""
    text = text.removeprefix("\ufeff")
    if text.lstrip(" \t\n\r").startswith("["):
        return _parse_array(name, text)
    records = []
    # split("\n"), not splitlines(): json.dumps(ensure_ascii=False) leaves U+2028 and friends raw inside strings.
    for number, line in enumerate(text.split("\n"), 1):
        if not line.strip():
            continue
        try:
            value = json.loads(line)
        except json.JSONDecodeError as exc:
            raise UsageError(f"{name}:{number}: not valid JSON ({exc.msg}, column {exc.colno})",
                             hint=_RECORD_FILES) from exc
        if not isinstance(value, dict):
            raise UsageError(f"{name}:{number}: not a JSON object")
        records.append(SourceRecord(value, f"{name}:{number}"))
    return records


def _parse_array(name: str, text: str) -> list[SourceRecord]:
    """Element by element, so that each record keeps the line it starts on."""
    decoder = json.JSONDecoder()
    counted_to, line = 0, 1

    def line_at(position: int) -> int:
        nonlocal counted_to, line
        line += text.count("\n", counted_to, position)
        counted_to = position
        return line

    records: list[SourceRecord] = []
    position = _JSON_SPACE.match(text, 0).end() + 1  # past the "["
    position = _JSON_SPACE.match(text, position).end()
    if text.startswith("]", position):
        position += 1
    else:
        while True:
            position = _JSON_SPACE.match(text, position).end()
            try:
                value, end = decoder.raw_decode(text, position)
            except json.JSONDecodeError as exc:
                raise UsageError(f"{name}:{exc.lineno}: not valid JSON ({exc.msg}, column {exc.colno})",
                                 hint=_RECORD_FILES) from exc
            where = f"{name}:{line_at(position)}"
            if not isinstance(value, dict):
                raise UsageError(f"{where}: not a JSON object")
            records.append(SourceRecord(value, where))
            position = _JSON_SPACE.match(text, end).end()
            if text.startswith(",", position):
                position += 1
            elif text.startswith("]", position):
                position += 1
                break
            else:
                raise UsageError(f"{name}:{line_at(position)}: not valid JSON (expecting ',' or ']' in the array)")
    rest = _JSON_SPACE.match(text, position).end()
    if rest < len(text):
        raise UsageError(f"{name}:{line_at(rest)}: not valid JSON (text after the array)")
    return records


def read_records(paths: Iterable[str], stdin: IO[str]) -> list[SourceRecord]:
    """The records of every input in order, as one set; `-` is standard input (`stdin`).
    A missing or unreadable file is a UsageError (exit 2): it is a path the user typed."""
    records: list[SourceRecord] = []
    for path in paths:
        if path == "-":
            name = STDIN_NAME
            try:
                text = stdin.read()
            except UnicodeDecodeError as exc:
                raise UsageError(f"{name}: not UTF-8 text") from exc
        else:
            name = path
            text = read_text(path, "record file")
        records.extend(parse_records(name, text))
    return records


# ---------------------------------------------------------------------------------------------------------------
# The official VQA answer normalisation (vqaEval.py of the VQA challenge, GT-Vision-Lab/VQA), quirks kept
# ---------------------------------------------------------------------------------------------------------------

_CONTRACTIONS = {
    "aint": "ain't", "arent": "aren't", "cant": "can't", "couldve": "could've", "couldnt": "couldn't",
    "couldn'tve": "couldn't've", "couldnt've": "couldn't've", "didnt": "didn't", "doesnt": "doesn't",
    "dont": "don't", "hadnt": "hadn't", "hadnt've": "hadn't've", "hadn'tve": "hadn't've", "hasnt": "hasn't",
    "havent": "haven't", "hed": "he'd", "hed've": "he'd've", "he'dve": "he'd've", "hes": "he's", "howd": "how'd",
    "howll": "how'll", "hows": "how's", "Id've": "I'd've", "I'dve": "I'd've", "Im": "I'm", "Ive": "I've",
    "isnt": "isn't", "itd": "it'd", "itd've": "it'd've", "it'dve": "it'd've", "itll": "it'll", "let's": "let's",
    "maam": "ma'am", "mightnt": "mightn't", "mightnt've": "mightn't've", "mightn'tve": "mightn't've",
    "mightve": "might've", "mustnt": "mustn't", "mustve": "must've", "neednt": "needn't", "notve": "not've",
    "oclock": "o'clock", "oughtnt": "oughtn't", "ow's'at": "'ow's'at", "'ows'at": "'ow's'at", "'ow'sat": "'ow's'at",
    "shant": "shan't", "shed've": "she'd've", "she'dve": "she'd've", "she's": "she's", "shouldve": "should've",
    "shouldnt": "shouldn't", "shouldnt've": "shouldn't've", "shouldn'tve": "shouldn't've",
    "somebody'd": "somebodyd", "somebodyd've": "somebody'd've", "somebody'dve": "somebody'd've",
    "somebodyll": "somebody'll", "somebodys": "somebody's", "someoned": "someone'd", "someoned've": "someone'd've",
    "someone'dve": "someone'd've", "someonell": "someone'll", "someones": "someone's", "somethingd": "something'd",
    "somethingd've": "something'd've", "something'dve": "something'd've", "somethingll": "something'll",
    "thats": "that's", "thered": "there'd", "thered've": "there'd've", "there'dve": "there'd've",
    "therere": "there're", "theres": "there's", "theyd": "they'd", "theyd've": "they'd've", "they'dve": "they'd've",
    "theyll": "they'll", "theyre": "they're", "theyve": "they've", "twas": "'twas", "wasnt": "wasn't",
    "wed've": "we'd've", "we'dve": "we'd've", "weve": "we've", "werent": "weren't", "whatll": "what'll",
    "whatre": "what're", "whats": "what's", "whatve": "what've", "whens": "when's", "whered": "where'd",
    "wheres": "where's", "whereve": "where've", "whod": "who'd", "whod've": "who'd've", "who'dve": "who'd've",
    "wholl": "who'll", "whos": "who's", "whove": "who've", "whyll": "why'll", "whyre": "why're", "whys": "why's",
    "wont": "won't", "wouldve": "would've", "wouldnt": "wouldn't", "wouldnt've": "wouldn't've",
    "wouldn'tve": "wouldn't've", "yall": "y'all", "yall'll": "y'all'll", "y'allll": "y'all'll",
    "yall'd've": "y'all'd've", "y'alld've": "y'all'd've", "y'all'dve": "y'all'd've", "youd": "you'd",
    "youd've": "you'd've", "you'dve": "you'd've", "youll": "you'll", "youre": "you're", "youve": "you've",
}
_NUMBER_WORDS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
                 "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
_ARTICLES = frozenset(("a", "an", "the"))
# Verbatim from vqaEval.py. "(?!<=\d)" is a lookahead for the text "<=" + digit (a typo for the lookbehind
# "(?<!\d)"), so it never fires: every "." not followed by a digit goes, "5." included; "3.5" keeps its point.
_PERIOD_STRIP = re.compile(r"(?!<=\d)(\.)(?!\d)")
_COMMA_STRIP = re.compile(r"(\d)(,)(\d)")
_PUNCTUATION = (";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",",
                "?", "!")  # not "'" nor ":" (the final version of the script dropped them)
# vqaEval.py calls periodStrip.sub("", text, re.UNICODE): the flag lands in sub's `count`, so at most 32 points go.
_PERIOD_STRIP_COUNT = int(re.UNICODE)


def _process_punctuation(text: str) -> str:
    """vqaEval.processPunctuation. A mark touching a space in the original text is deleted, otherwise it becomes
    a space ("a-b" -> "a b"); but when the text holds a digit,digit comma anywhere, every mark is deleted
    ("3,000" -> "3000")."""
    digit_comma = _COMMA_STRIP.search(text) is not None
    out = text
    for mark in _PUNCTUATION:
        if digit_comma or mark + " " in text or " " + mark in text:
            out = out.replace(mark, "")
        else:
            out = out.replace(mark, " ")
    return _PERIOD_STRIP.sub("", out, count=_PERIOD_STRIP_COUNT)


def _process_digit_article(text: str) -> str:
    """vqaEval.processDigitArticle: lower case, words split on whitespace, number words zero..ten (and "none")
    to digits, articles dropped, then contractions restored ("dont" -> "don't"). The map's capitalised keys
    ("Im", "Ive") can never match, the text being lower-cased first; kept as the official script has them."""
    words = [_NUMBER_WORDS.get(word, word) for word in text.lower().split()]
    words = [word for word in words if word not in _ARTICLES]
    return " ".join(_CONTRACTIONS.get(word, word) for word in words)


@lru_cache(maxsize=65536)
def normalize_answer(text: str) -> str:
    """An answer as the official VQA evaluation compares it: newlines and tabs to spaces, stripped, punctuation,
    then lower case, digits, articles and contractions.

    One deliberate difference: vqaEval.py runs all of this on the prediction only and relies on the annotation
    files' answers being normalised already (it runs processPunctuation alone on them, and only when the ten
    answers disagree); here the ground-truth answers go through the same steps, as records carry raw answers."""
    text = text.replace("\n", " ").replace("\t", " ").strip()
    return _process_digit_article(_process_punctuation(text))


def vqa_score(prediction: str, answers: list[str]) -> float:
    """The VQA accuracy of one prediction against a list of human answers: for each answer, min(1, matches among
    the *other* answers / 3), averaged over the answers (vqaEval.py's leave-one-out, by position)."""
    predicted = normalize_answer(prediction)
    normalized = [normalize_answer(answer) for answer in answers]
    matching = sum(1 for answer in normalized if answer == predicted)
    total = 0.0
    for answer in normalized:
        others = matching - 1 if answer == predicted else matching
        total += min(1.0, others / 3)
    return total / len(normalized)


def exact_match(prediction: str, answer: str) -> float:
    """1.0 when the prediction equals the single reference answer after normalisation, else 0.0."""
    return 1.0 if normalize_answer(prediction) == normalize_answer(answer) else 0.0


# ---------------------------------------------------------------------------------------------------------------
# Records to scored items
# ---------------------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class LabelPrediction:
    truth: str
    label: str
    scores: Optional[dict[str, float]]


@dataclass(frozen=True)
class VqaPrediction:
    text: str
    answers: Optional[list[str]]  # two or more human answers: the VQA measure
    answer: Optional[str]  # one reference answer: exact match


def _as_text(value: Any, key: str, where: str) -> str:
    """Labels and answers are strings; a number is taken as its JSON text (a class id 3 is the label "3")."""
    if isinstance(value, str):
        return value
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return json.dumps(value)
    raise UsageError(f"{where}: {key!r} must be a string, not {json.dumps(value)[:40]}")


def _record_kind(source: SourceRecord) -> Optional[str]:
    """classification, vqa, or None for an error record (counted, not scored)."""
    record = source.record
    if "error" in record:
        return None
    if "truth" in record:
        return CLASSIFICATION
    if "answers" in record or "answer" in record:
        return VQA
    raise UsageError(f"{source.where}: no ground truth: a record needs \"truth\" (classification) or "
                     f"\"answers\" / \"answer\" (VQA), or an \"error\"")


def _label_prediction(source: SourceRecord) -> LabelPrediction:
    record, where = source.record, source.where
    if record.get("label") is None:
        raise UsageError(f"{where}: a record with \"truth\" needs a \"label\" (the prediction)")
    scores = record.get("scores")
    if scores is not None:
        # type(), not isinstance(): true and false are not probabilities
        if not isinstance(scores, dict) or any(type(value) not in (int, float) for value in scores.values()):
            raise UsageError(f"{where}: \"scores\" must be an object of label: probability")
        scores = scores or None
    return LabelPrediction(_as_text(record["truth"], "truth", where), _as_text(record["label"], "label", where),
                           scores)


def _vqa_prediction(source: SourceRecord) -> VqaPrediction:
    record, where = source.record, source.where
    if not isinstance(record.get("text"), str):
        raise UsageError(f"{where}: a record with answers needs a \"text\" string (the prediction)")
    if "answers" in record:
        answers = record["answers"]
        if not isinstance(answers, list) or not answers:
            raise UsageError(f"{where}: \"answers\" must be a non-empty list")
        # The VQA annotation files' form {"answer": ..., "answer_id": ...} is taken as well as plain strings.
        texts = [_as_text(item.get("answer") if isinstance(item, dict) else item, "answers", where)
                 for item in answers]
        if len(texts) == 1:  # no leave-one-out with one answer (it would always score 0): exact match
            return VqaPrediction(record["text"], None, texts[0])
        return VqaPrediction(record["text"], texts, None)
    return VqaPrediction(record["text"], None, _as_text(record["answer"], "answer", where))


# ---------------------------------------------------------------------------------------------------------------
# Metrics
# ---------------------------------------------------------------------------------------------------------------

@dataclass
class LabelStats:
    precision: float
    recall: float
    f1: float
    support: int


@dataclass
class ClassificationMetrics:
    """Metrics of classification records. Rates are None when there is no record to rate (a group of errors)."""

    count: int
    errors: int
    accuracy: Optional[float] = None
    macro_f1: Optional[float] = None
    top_k_accuracy: Optional[dict[str, float]] = None  # {"2": ...}; None without scores
    ece: Optional[float] = None
    mean_confidence: Optional[float] = None
    per_label: dict[str, LabelStats] = field(default_factory=dict)
    labels: list[str] = field(default_factory=list)
    matrix: list[list[int]] = field(default_factory=list)  # rows = truth, columns = predicted

    @property
    def headline(self) -> Optional[float]:
        return self.accuracy

    def as_dict(self) -> dict[str, Any]:
        return {"count": self.count, "errors": self.errors, "accuracy": self.accuracy, "macro_f1": self.macro_f1,
                "top_k_accuracy": self.top_k_accuracy, "ece": self.ece, "mean_confidence": self.mean_confidence,
                "per_label": {label: vars(stats).copy() for label, stats in self.per_label.items()},
                "confusion": {"labels": self.labels, "matrix": self.matrix}}


@dataclass
class VqaMetrics:
    """Metrics of VQA records: vqa_accuracy over all of them (a single-answer record scores its exact match),
    exact_match over the single-answer records alone (None when there are none)."""

    count: int
    errors: int
    vqa_accuracy: Optional[float] = None
    exact_match: Optional[float] = None
    answer_lists: int = 0
    single_answers: int = 0

    @property
    def headline(self) -> Optional[float]:
        return self.vqa_accuracy

    def as_dict(self) -> dict[str, Any]:
        return {"count": self.count, "errors": self.errors, "vqa_accuracy": self.vqa_accuracy,
                "exact_match": self.exact_match, "answer_lists": self.answer_lists,
                "single_answers": self.single_answers}


def classification_metrics(items: list[LabelPrediction], labels: list[str], errors: int = 0) -> ClassificationMetrics:
    """Accuracy, per-label precision / recall / F1 / support and the confusion matrix over `labels` (sorted);
    with scores, top-k accuracy and calibration.

    As scikit-learn with zero_division=0: a label never predicted has precision 0, a label never true recall 0,
    and F1 is 0 when both are. macro_f1 averages F1 over the labels that occur as a truth or a prediction
    (scikit-learn's default label set), not over labels only named in scores."""
    metrics = ClassificationMetrics(count=len(items), errors=errors, labels=list(labels))
    size = len(labels)
    metrics.matrix = [[0] * size for _ in range(size)]
    if not items:
        return metrics
    index = {label: position for position, label in enumerate(labels)}
    for item in items:
        metrics.matrix[index[item.truth]][index[item.label]] += 1
    predicted_counts = [sum(row[column] for row in metrics.matrix) for column in range(size)]
    used_f1 = []
    for position, label in enumerate(labels):
        hits = metrics.matrix[position][position]
        support = sum(metrics.matrix[position])
        predicted = predicted_counts[position]
        f1 = 2 * hits / (support + predicted) if support + predicted else 0.0
        metrics.per_label[label] = LabelStats(precision=hits / predicted if predicted else 0.0,
                                              recall=hits / support if support else 0.0, f1=f1, support=support)
        if support or predicted:
            used_f1.append(f1)
    metrics.accuracy = sum(metrics.matrix[i][i] for i in range(size)) / len(items)
    metrics.macro_f1 = sum(used_f1) / len(used_f1)
    scored = [item for item in items if item.scores is not None]
    if scored:
        metrics.top_k_accuracy = top_k_accuracy(scored, [k for k in TOP_K if k < size])
        metrics.ece, metrics.mean_confidence = calibration(scored)
    return metrics


def top_k_accuracy(items: list[LabelPrediction], ks: Iterable[int]) -> dict[str, float]:
    """{str(k): share of records whose truth is among the k highest scores}. Ties count in the truth's favour
    (fewer than k labels score strictly higher); a truth missing from a record's scores is a miss."""
    ks = list(ks)
    hits = dict.fromkeys(ks, 0)
    for item in items:
        truth_score = item.scores.get(item.truth)
        if truth_score is None:
            continue
        higher = sum(1 for value in item.scores.values() if value > truth_score)
        for k in ks:
            hits[k] += higher < k
    return {str(k): hits[k] / len(items) for k in ks}


def calibration(items: list[LabelPrediction], bins: int = CALIBRATION_BINS) -> tuple[float, float]:
    """(expected calibration error, mean confidence). Confidence is a record's top probability, correct means
    label == truth; records fall in `bins` equal-width bins (0, 1/bins], ..., ((bins-1)/bins, 1] by confidence,
    and ECE = sum over bins of (records in bin / records) * |accuracy in bin - mean confidence in bin|."""
    edges = [i / bins for i in range(1, bins + 1)]
    confidence_sum = [0.0] * bins
    correct_sum = [0] * bins
    total_confidence = 0.0
    for item in items:
        confidence = max(item.scores.values())
        which = min(bisect_left(edges, confidence), bins - 1)  # first bin whose upper edge >= confidence
        confidence_sum[which] += confidence
        correct_sum[which] += item.label == item.truth
        total_confidence += confidence
    ece = sum(abs(correct_sum[b] - confidence_sum[b]) for b in range(bins)) / len(items)
    return ece, total_confidence / len(items)


def vqa_metrics(items: list[VqaPrediction], errors: int = 0) -> VqaMetrics:
    """VQA accuracy over all records (answer lists: the official measure; single answers: exact match)."""
    metrics = VqaMetrics(count=len(items), errors=errors)
    if not items:
        return metrics
    total = exact = 0.0
    for item in items:
        if item.answers is not None:
            total += vqa_score(item.text, item.answers)
            metrics.answer_lists += 1
        else:
            match = exact_match(item.text, item.answer)
            total += match
            exact += match
            metrics.single_answers += 1
    metrics.vqa_accuracy = total / len(items)
    metrics.exact_match = exact / metrics.single_answers if metrics.single_answers else None
    return metrics


# ---------------------------------------------------------------------------------------------------------------
# A whole evaluation
# ---------------------------------------------------------------------------------------------------------------

Metrics = Any  # ClassificationMetrics | VqaMetrics


@dataclass
class Evaluation:
    """The metrics of a record set; with `by`, the same metrics per value of that record key. A group's name is
    the value as text (a string as is, anything else its JSON text); None for a record without the key."""

    kind: str
    overall: Metrics
    by: Optional[str] = None
    groups: dict[Optional[str], Metrics] = field(default_factory=dict)
    superseded: int = 0  # records of an input that a later record of the same input replaces

    def as_dict(self) -> dict[str, Any]:
        """The `--format json` object: kind, the overall metrics, and with `by` the groups keyed by name (the
        group of records without the key is "null")."""
        result = {"kind": self.kind, **self.overall.as_dict(), "superseded": self.superseded}
        if self.by is not None:
            result["by"] = self.by
            result["groups"] = {("null" if name is None else name): metrics.as_dict()
                                for name, metrics in self.groups.items()}
        return result


def group_name(record: dict[str, Any], key: str) -> Optional[str]:
    """The `--by` group of a record: None when the key is missing or null (the string "null" too, as both are
    the JSON key "null")."""
    value = record.get(key)
    if value is None:
        return None
    name = value if isinstance(value, str) else json.dumps(value, ensure_ascii=False, sort_keys=True)
    return None if name == "null" else name


def latest_per_input(records: list[SourceRecord]) -> list[SourceRecord]:
    """Each input once, by its last record: a failure followed by its success after --resume is a success, a failure
    that failed again is one error, a file run into twice counts each input once. Records that name no image are
    each their own input. In the order of each input's last record."""
    last: dict[str, int] = {}
    for position, source in enumerate(records):
        identity = record_input_key(source.record)
        if identity is not None:
            last[identity] = position
    return [source for position, source in enumerate(records)
            if (identity := record_input_key(source.record)) is None or last[identity] == position]


def repeated_inputs(records: list[SourceRecord]) -> list[str]:
    """Where a record answers an input that an earlier success answered already: a file run into twice (a resumed run
    follows its failures with their successes, which is not this)."""
    answered: set[str] = set()
    repeated = []
    for source in records:
        identity = record_input_key(source.record)
        if identity is None:
            continue
        if identity in answered:
            repeated.append(source.where)
        if "error" not in source.record:
            answered.add(identity)
    return repeated


def evaluate(records: list[SourceRecord], by: Optional[str] = None, inputs: str = "input") -> Evaluation:
    """Score a record set: each input once, by its last record (`latest_per_input`); `count` is the inputs scored,
    `errors` the inputs whose last record is an error (counted, not scored), `superseded` the earlier records of
    inputs answered again. Classification and VQA records cannot be mixed; a record with no ground truth, or
    nothing to score at all, is a UsageError (`inputs` names the input(s) in that message)."""
    latest = latest_per_input(records)
    superseded = len(records) - len(latest)
    records = latest
    kind: Optional[str] = None
    first_where = ""
    items: list[tuple[Any, Optional[str]]] = []  # (prediction, or None for an error record; group name)
    for source in records:
        record_kind = _record_kind(source)
        if record_kind is not None:
            if kind is None:
                kind, first_where = record_kind, source.where
            elif record_kind != kind:
                raise UsageError(f"{source.where}: a {record_kind} record among {kind} records (the first at "
                                 f"{first_where}); score them separately")
        item = None
        if record_kind == CLASSIFICATION:
            item = _label_prediction(source)
        elif record_kind == VQA:
            item = _vqa_prediction(source)
        items.append((item, group_name(source.record, by) if by is not None else None))
    if kind is None:
        detail = f"{len(items)} error record{'s' if len(items) != 1 else ''}, none with ground truth" if items \
            else "no records"
        raise UsageError(f"{inputs}: nothing to score ({detail})")

    if kind == CLASSIFICATION:
        predictions = [item for item, _ in items if item is not None]
        labels = sorted({item.truth for item in predictions} | {item.label for item in predictions}
                        | {label for item in predictions if item.scores for label in item.scores})

        def measure(chosen: list[tuple[Any, Optional[str]]]) -> Metrics:
            return classification_metrics([item for item, _ in chosen if item is not None], labels,
                                          sum(1 for item, _ in chosen if item is None))
    else:
        def measure(chosen: list[tuple[Any, Optional[str]]]) -> Metrics:
            return vqa_metrics([item for item, _ in chosen if item is not None],
                               sum(1 for item, _ in chosen if item is None))

    evaluation = Evaluation(kind, measure(items), by, superseded=superseded)
    if by is not None:
        buckets: dict[Optional[str], list[tuple[Any, Optional[str]]]] = {}
        for entry in items:
            buckets.setdefault(entry[1], []).append(entry)
        for name in sorted(name for name in buckets if name is not None) + ([None] if None in buckets else []):
            evaluation.groups[name] = measure(buckets[name])
    return evaluation
