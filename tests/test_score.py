"""`llava score`: metrics against scikit-learn and hand-worked VQA cases, then the real CLI end to end."""

from __future__ import annotations

import csv
import io
import json
import random
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO, run_cli
from llavanext_cli.errors import UsageError
from llavanext_cli.engine.evaluation import (
    LabelPrediction,
    SourceRecord,
    calibration,
    classification_metrics,
    evaluate,
    normalize_answer,
    parse_records,
    vqa_score,
)


@pytest.fixture(scope="module")
def sklearn_metrics():
    import sklearn.metrics  # a test dependency (pyproject's test extra): missing, these tests fail, not skip

    return sklearn.metrics


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(record) + "\n" for record in records), encoding="utf-8")
    return path


def sources(records: list[dict]) -> list[SourceRecord]:
    return [SourceRecord(record, f"test:{number}") for number, record in enumerate(records, 1)]


# ---------------------------------------------------------------------------------------------------------------
# Classification metrics against scikit-learn
# ---------------------------------------------------------------------------------------------------------------

def random_classification(seed: int, with_scores: bool = True) -> list[dict]:
    """Random records where some labels are never predicted and some never true."""
    rng = random.Random(seed)
    labels = [f"l{i}" for i in range(rng.randint(3, 9))]
    truths_from = labels[:-1]  # the last label is never true
    predicted_from = labels[1:]  # the first is never predicted
    records = []
    for _ in range(rng.randint(20, 200)):
        truth = rng.choice(truths_from)
        if with_scores:
            weights = [rng.random() for _ in labels]
            weights[labels.index(truth)] += rng.random() * 2  # a better than random model
            weights[0] = 0.0 if rng.random() < 0.5 else weights[0] / 10
            total = sum(weights)
            scores = {label: weight / total for label, weight in zip(labels, weights)}
            label = max(predicted_from, key=lambda name: scores[name])
            records.append({"label": label, "truth": truth, "scores": scores})
        else:
            records.append({"label": rng.choice(predicted_from), "truth": truth})
    return records


@pytest.mark.parametrize("seed", range(8))
def test_classification_matches_scikit_learn(seed, sklearn_metrics):
    records = random_classification(seed)
    result = evaluate(sources(records)).as_dict()
    truths = [record["truth"] for record in records]
    predictions = [record["label"] for record in records]
    labels = sorted(set(truths) | set(predictions) | set(records[0]["scores"]))
    assert result["confusion"]["labels"] == labels
    assert result["count"] == len(records) and result["errors"] == 0
    assert result["accuracy"] == pytest.approx(sklearn_metrics.accuracy_score(truths, predictions), abs=1e-9)
    assert result["macro_f1"] == pytest.approx(
        sklearn_metrics.f1_score(truths, predictions, average="macro", zero_division=0), abs=1e-9)
    precision, recall, f1, support = sklearn_metrics.precision_recall_fscore_support(
        truths, predictions, labels=labels, zero_division=0)
    for position, label in enumerate(labels):
        stats = result["per_label"][label]
        assert stats["precision"] == pytest.approx(precision[position], abs=1e-9)
        assert stats["recall"] == pytest.approx(recall[position], abs=1e-9)
        assert stats["f1"] == pytest.approx(f1[position], abs=1e-9)
        assert stats["support"] == support[position]
    assert result["confusion"]["matrix"] == sklearn_metrics.confusion_matrix(truths, predictions,
                                                                             labels=labels).tolist()
    score_matrix = [[record["scores"][label] for label in labels] for record in records]
    expected_ks = [k for k in (2, 3, 5) if k < len(labels)]
    assert list(result["top_k_accuracy"]) == [str(k) for k in expected_ks]
    for k in expected_ks:
        assert result["top_k_accuracy"][str(k)] == pytest.approx(
            sklearn_metrics.top_k_accuracy_score(truths, score_matrix, k=k, labels=labels), abs=1e-9)


@pytest.mark.parametrize("seed", range(3))
def test_without_scores_no_top_k_nor_calibration(seed, sklearn_metrics):
    records = random_classification(seed, with_scores=False)
    result = evaluate(sources(records)).as_dict()
    truths = [record["truth"] for record in records]
    predictions = [record["label"] for record in records]
    assert result["accuracy"] == pytest.approx(sklearn_metrics.accuracy_score(truths, predictions), abs=1e-9)
    assert result["top_k_accuracy"] is None and result["ece"] is None and result["mean_confidence"] is None


def reference_ece(confidences: list[float], correct: list[bool], bins: int = 10) -> float:
    """The textbook definition (Guo et al. 2017), written independently: bins (m-1)/M < conf <= m/M."""
    total = 0.0
    for m in range(1, bins + 1):
        low, high = (m - 1) / bins, m / bins
        members = [i for i, conf in enumerate(confidences) if (low < conf <= high) or (m == 1 and conf == 0)]
        if members:
            accuracy = sum(correct[i] for i in members) / len(members)
            confidence = sum(confidences[i] for i in members) / len(members)
            total += len(members) / len(confidences) * abs(accuracy - confidence)
    return total


def test_ece_hand_worked():
    # Top probabilities 0.9 (right), 0.95 (wrong), 0.6 (right), 0.55 (wrong). Bins are (m-1)/10 < p <= m/10:
    # 0.9 is in (0.8, 0.9], 0.95 in (0.9, 1], 0.6 and 0.55 in (0.5, 0.6] (accuracy 1/2, confidence 0.575).
    items = [LabelPrediction("a", "a", {"a": 0.9, "b": 0.1}), LabelPrediction("a", "b", {"a": 0.05, "b": 0.95}),
             LabelPrediction("b", "b", {"a": 0.4, "b": 0.6}), LabelPrediction("a", "b", {"a": 0.45, "b": 0.55})]
    ece, mean_confidence = calibration(items)
    expected = 1 / 4 * abs(1 - 0.9) + 1 / 4 * abs(0 - 0.95) + 2 / 4 * abs(0.5 - (0.6 + 0.55) / 2)
    assert ece == pytest.approx(expected, abs=1e-12)
    assert ece == pytest.approx(0.1 / 4 + 0.95 / 4 + 0.075 / 2, abs=1e-12)
    assert mean_confidence == pytest.approx((0.9 + 0.95 + 0.6 + 0.55) / 4, abs=1e-12)


@pytest.mark.parametrize("seed", range(5))
def test_ece_matches_the_reference(seed):
    records = random_classification(seed)
    items = [LabelPrediction(r["truth"], r["label"], r["scores"]) for r in records]
    confidences = [max(r["scores"].values()) for r in records]
    expected = reference_ece(confidences, [r["label"] == r["truth"] for r in records])
    assert calibration(items)[0] == pytest.approx(expected, abs=1e-9)


def test_precision_of_a_label_never_predicted_is_zero():
    metrics = classification_metrics([LabelPrediction("a", "b", None), LabelPrediction("b", "b", None)], ["a", "b"])
    assert metrics.per_label["a"].precision == 0.0 and metrics.per_label["a"].recall == 0.0
    assert metrics.per_label["a"].f1 == 0.0 and metrics.per_label["b"].precision == 0.5


# ---------------------------------------------------------------------------------------------------------------
# The official VQA normalisation and measure, hand-worked
# ---------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("raw, normalized", [
    ("two", "2"), ("Two", "2"), ("ten", "10"), ("none", "0"),  # manualMap (vqaEval maps "none" too)
    ("a dog", "dog"), ("The Dog", "dog"), ("an apple", "apple"),  # articles dropped
    ("yes.", "yes"), ("Yes!", "yes"), ("5.", "5"), ("3.5", "3.5"),  # a point before a digit stays
    ("3,000", "3000"),  # a digit,digit comma anywhere: every mark deleted
    ("red, white", "red white"), ("red,white", "red white"),  # comma by a space deleted, else a space
    ("t-shirt", "t shirt"), ("dont", "don't"), ("don't", "don't"), ("isnt", "isn't"),  # "'" is not punctuation
    ("  Black\tand\nwhite ", "black and white"),
])
def test_official_normalisation(raw, normalized):
    assert normalize_answer(raw) == normalized


def test_vqa_measure_hand_worked():
    # Ten answers, the prediction matching m of them: each matching answer leaves m-1 matches among the others,
    # each other answer m, so accuracy = (m * min(1, (m-1)/3) + (10-m) * min(1, m/3)) / 10.
    three_votes = ["2", "2", "two"] + ["3"] * 7  # "two" normalises to "2": three votes for 2
    assert vqa_score("two", three_votes) == pytest.approx((3 * 2 / 3 + 7 * 1) / 10)  # 0.9
    assert vqa_score("2", ["2", "two"] + ["3"] * 8) == pytest.approx((2 * 1 / 3 + 8 * 2 / 3) / 10)  # 0.6
    assert vqa_score("2", ["two"] + ["3"] * 9) == pytest.approx((1 * 0 + 9 * 1 / 3) / 10)  # 0.3
    assert vqa_score("2", ["2"] * 4 + ["two"] * 3 + ["3"] * 3) == pytest.approx(1.0)  # 7 votes: full marks
    assert vqa_score("4", ["2"] * 4 + ["two"] * 3 + ["3"] * 3) == 0.0
    assert vqa_score("A Dog.", ["dog"] * 3 + ["cat"] * 7) == pytest.approx(0.9)


def test_vqa_single_answers_are_exact_match():
    records = [{"text": "Two.", "answer": "2"}, {"text": "the cat", "answer": "cat"}, {"text": "dog", "answer": "cat"},
               {"text": "yes", "answers": ["yes"]}]  # a one-item list: exact match too
    result = evaluate(sources(records)).as_dict()
    assert result["kind"] == "vqa"
    assert result["exact_match"] == pytest.approx(3 / 4) and result["vqa_accuracy"] == pytest.approx(3 / 4)
    assert result["single_answers"] == 4 and result["answer_lists"] == 0


def test_vqa_accuracy_averages_lists_and_single_answers():
    records = [{"text": "two", "answers": ["2", "2", "two"] + ["3"] * 7}, {"text": "no", "answer": "yes"},
               {"image": "x.jpg", "error": "cannot open"}]
    result = evaluate(sources(records)).as_dict()
    assert result["vqa_accuracy"] == pytest.approx((0.9 + 0.0) / 2)
    assert result["exact_match"] == 0.0 and result["count"] == 2 and result["errors"] == 1


def test_vqa_annotation_answer_dicts_are_taken():
    answers = [{"answer": "2", "answer_id": i} for i in range(3)] + [{"answer": "3", "answer_id": 3}]
    assert evaluate(sources([{"text": "2", "answers": answers}])).overall.vqa_accuracy == pytest.approx(
        (3 * 2 / 3 + 1) / 4)


# ---------------------------------------------------------------------------------------------------------------
# Reading records
# ---------------------------------------------------------------------------------------------------------------

def test_a_json_array_keeps_line_numbers():
    text = json.dumps([{"label": "a", "truth": "a"}, {"label": "b", "truth": "a"}], indent=2)
    records = parse_records("run.json", text)
    assert [source.record["label"] for source in records] == ["a", "b"]
    assert [source.where for source in records] == ["run.json:2", "run.json:6"]
    with pytest.raises(UsageError, match=r"^run\.json:6: not a JSON object$"):
        parse_records("run.json", '[\n  {"label": "a", "truth": "a"}\n  ,\n\n\n  7\n]')
    assert parse_records("empty.json", " [ ]\n") == []


def test_a_line_separator_inside_a_string_is_not_a_new_record():
    records = parse_records("x.jsonl", json.dumps({"text": "a\u2028b", "answer": "ab"}, ensure_ascii=False) + "\n")
    assert len(records) == 1


# ---------------------------------------------------------------------------------------------------------------
# The real CLI
# ---------------------------------------------------------------------------------------------------------------

CLASSIFIED = [
    {"image": "cats/1.jpg", "label": "cat", "truth": "cat", "scores": {"cat": 0.7, "dog": 0.2, "bird": 0.1},
     "source": "phone"},
    {"image": "cats/2.jpg", "label": "dog", "truth": "cat", "scores": {"cat": 0.3, "dog": 0.6, "bird": 0.1},
     "source": "phone"},
    {"image": "dogs/1.jpg", "label": "dog", "truth": "dog", "scores": {"cat": 0.1, "dog": 0.8, "bird": 0.1},
     "source": "camera"},
    {"image": "dogs/2.jpg", "label": "dog", "truth": "dog", "scores": {"cat": 0.2, "dog": 0.5, "bird": 0.3}},
    {"image": "dogs/3.jpg", "error": "cannot identify image file"},
]


@pytest.fixture
def classified(tmp_path) -> Path:
    return write_jsonl(tmp_path / "run.jsonl", CLASSIFIED)


def test_json_output(classified):
    result = run_cli("score", classified, "--format", "json")
    assert result.exit_code == 0, result.stderr
    report = json.loads(result.stdout)
    assert {"count", "errors", "accuracy", "macro_f1", "per_label", "confusion", "top_k_accuracy", "ece"} <= set(report)
    assert report["count"] == 4 and report["errors"] == 1 and report["accuracy"] == 0.75
    assert report["confusion"] == {"labels": ["bird", "cat", "dog"], "matrix": [[0, 0, 0], [0, 1, 1], [0, 0, 2]]}
    assert report["per_label"]["cat"] == {"precision": 1.0, "recall": 0.5, "f1": pytest.approx(2 / 3),
                                          "support": 2}
    assert report["per_label"]["bird"]["precision"] == 0.0  # never predicted: 0, as zero_division=0
    assert report["macro_f1"] == pytest.approx((2 / 3 + 4 / 5) / 2)  # over cat and dog, bird never seen
    assert report["top_k_accuracy"] == {"2": 1.0}
    assert "by" not in report and "groups" not in report


def test_by_groups_every_metric(classified):
    result = run_cli("score", classified, "--format", "json", "--by", "source")
    assert result.exit_code == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["by"] == "source" and report["accuracy"] == 0.75
    assert list(report["groups"]) == ["camera", "phone", "null"]  # sorted, records without the key last
    assert report["groups"]["phone"]["accuracy"] == 0.5 and report["groups"]["phone"]["count"] == 2
    assert report["groups"]["camera"]["accuracy"] == 1.0
    assert report["groups"]["null"]["count"] == 1 and report["groups"]["null"]["errors"] == 1
    assert report["groups"]["phone"]["confusion"]["labels"] == ["bird", "cat", "dog"]  # the same grid everywhere
    text = run_cli("score", classified, "--by", "source")
    assert text.exit_code == 0 and "(none)" in text.stdout and "phone" in text.stdout


def test_by_groups_vqa_in_text_and_csv(tmp_path):
    path = write_jsonl(tmp_path / "vqa.jsonl", [
        {"text": "2", "answers": ["2"] * 10, "question_type": "how many"},
        {"text": "red", "answers": ["blue"] * 10, "question_type": "what color"},
        {"text": "yes", "answer": "yes"},
    ])
    report = json.loads(run_cli("score", path, "--format", "json", "--by", "question_type").stdout)
    assert report["vqa_accuracy"] == pytest.approx(2 / 3)
    assert {name: group["vqa_accuracy"] for name, group in report["groups"].items()} == {
        "how many": 1.0, "what color": 0.0, "null": 1.0}
    rows = list(csv.reader(io.StringIO(run_cli("score", path, "--format", "csv", "--by", "question_type").stdout)))
    assert rows[0] == ["group", "count", "errors", "vqa_accuracy", "exact_match"]
    assert rows[1:] == [["how many", "1", "0", "1.0", ""], ["what color", "1", "0", "0.0", ""], ["", "1", "0", "1.0",
                                                                                                  "1.0"]]
    text = run_cli("score", path, "--by", "question_type")
    assert text.exit_code == 0
    assert text.stdout.index("what color") < text.stdout.index("how many")  # worst first


def test_csv_is_the_per_label_table(classified):
    result = run_cli("score", classified, "--format", "csv")
    assert result.exit_code == 0, result.stderr
    rows = list(csv.DictReader(io.StringIO(result.stdout)))
    assert [row["label"] for row in rows] == ["bird", "cat", "dog"]
    assert list(rows[0]) == ["label", "precision", "recall", "f1", "support"]
    assert rows[2]["support"] == "2" and float(rows[2]["precision"]) == pytest.approx(2 / 3)


def test_vqa_csv_is_one_summary_row(tmp_path):
    path = write_jsonl(tmp_path / "vqa.jsonl", [{"text": "Two", "answer": "2"}, {"text": "x", "answer": "y"}])
    rows = list(csv.DictReader(io.StringIO(run_cli("score", path, "--format", "csv").stdout)))
    assert rows == [{"count": "2", "errors": "0", "vqa_accuracy": "0.5", "exact_match": "0.5"}]


def test_stdin_and_several_files_are_one_set(tmp_path, classified):
    lines = classified.read_text()
    result = run_cli("score", "-", "--format", "json", stdin=lines)
    assert result.exit_code == 0, result.stderr
    assert json.loads(result.stdout)["count"] == 4
    second = write_jsonl(tmp_path / "more.jsonl", [{"label": "bird", "truth": "bird"}])
    both = json.loads(run_cli("score", classified, "-", "--format", "json", stdin=second.read_text()).stdout)
    assert both["count"] == 5 and both["accuracy"] == 0.8 and both["errors"] == 1


def test_a_json_array_file_is_read(tmp_path):
    path = tmp_path / "run.json"
    path.write_text(json.dumps(CLASSIFIED, indent=2))
    result = run_cli("score", path, "--format", "json")
    assert result.exit_code == 0, result.stderr
    assert json.loads(result.stdout)["accuracy"] == 0.75


def test_text_output_shows_the_accuracy(classified):
    result = run_cli("score", classified)
    assert result.exit_code == 0, result.stderr
    assert "accuracy" in result.stdout and "75.00%" in result.stdout
    assert "confusion matrix" in result.stdout and "per label" in result.stdout
    assert result.stderr == ""


def test_blank_lines_are_skipped(tmp_path):
    path = tmp_path / "run.jsonl"
    path.write_text('\n{"label": "a", "truth": "a"}\n\n   \n{"label": "a", "truth": "b"}\n\n')
    assert json.loads(run_cli("score", path, "--format", "json").stdout)["count"] == 2


def assert_usage_error(result, *fragments: str) -> None:
    assert result.exit_code == 2, (result.stdout, result.stderr)
    assert result.stdout == ""
    errors = [line for line in result.stderr.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1 and "Traceback" not in result.stderr, result.stderr
    for fragment in fragments:
        assert fragment in errors[0], errors[0]


@pytest.mark.parametrize("lines, where, message", [
    (['{"label": "a", "truth": "a"}', "{not json"], ":2:", "not valid JSON"),
    (['{"label": "a", "truth": "a"}', "", '["a", "b"]'], ":3:", "not a JSON object"),
    (['{"label": "a", "truth": "a"}', '{"label": "b", "image": "x.jpg"}'], ":2:", "no ground truth"),
    (['{"label": "a", "truth": "a"}', '{"text": "yes", "answer": "yes"}'], ":2:", "score them separately"),
    (['{"truth": "a"}'], ":1:", "label"),
    (['{"answers": ["a", "b"]}'], ":1:", "text"),
    (['{"text": "a", "answers": []}'], ":1:", "answers"),
])
def test_bad_records_are_usage_errors(tmp_path, lines, where, message):
    path = tmp_path / "answers.jsonl"
    path.write_text("\n".join(lines) + "\n")
    assert_usage_error(run_cli("score", path, "--format", "json"), f"answers.jsonl{where}", message)


def test_a_file_run_into_twice_is_warned_about(tmp_path):
    once = [{"image": f"{i}.jpg", "label": "a", "truth": "a"} for i in range(3)]
    resumed = write_jsonl(tmp_path / "resumed.jsonl", [{"image": "0.jpg", "error": "x"}, *once])
    assert run_cli("score", resumed).stderr == ""  # a failure, then its success after --resume: fine
    twice = write_jsonl(tmp_path / "twice.jsonl", once + once)
    result = run_cli("score", twice, "--format", "json")
    assert result.exit_code == 0 and json.loads(result.stdout)["count"] == 3  # each input once, by its last record
    assert json.loads(result.stdout)["superseded"] == 3
    assert result.stderr.startswith("Warning: 3 records answer an image and prompt answered before (first at ")
    assert "twice.jsonl:4" in result.stderr and "counts once, by its last record" in result.stderr


def test_an_input_counts_once_by_its_last_record(tmp_path):
    """A failure, then a failure again after --resume: one error; a failure then its success: one success; what the
    text summary counts is said there."""
    lines = [{"image": "0.jpg", "error": "x"}, {"image": "1.jpg", "error": "x"},
             {"image": "0.jpg", "error": "y"}, {"image": "1.jpg", "label": "a", "truth": "a"},
             {"image": "2.jpg", "label": "b", "truth": "a"}]
    path = write_jsonl(tmp_path / "resumed.jsonl", lines)
    result = run_cli("score", path, "--format", "json")
    assert result.exit_code == 0 and result.stderr == ""
    summary = json.loads(result.stdout)
    assert (summary["count"], summary["errors"], summary["superseded"], summary["accuracy"]) == (2, 1, 2, 0.5)
    text = run_cli("score", path).stdout
    assert "inputs scored" in text and "counts once, by its last record" in text and "2 earlier records" in text


def test_a_csv_of_records_is_refused_with_what_score_reads(tmp_path):
    path = tmp_path / "run.csv"
    path.write_text("image,label,truth\na.jpg,cat,cat\n")
    result = run_cli("score", path)
    assert_usage_error(result, "run.csv:1:", "not valid JSON")
    assert "reads the records of --format jsonl or json" in result.stderr


def test_nothing_to_score(tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n\n")
    assert_usage_error(run_cli("score", empty), "empty.jsonl", "nothing to score")
    failures = write_jsonl(tmp_path / "failed.jsonl", [{"image": "a.jpg", "error": "x"}])
    assert_usage_error(run_cli("score", failures), "failed.jsonl", "nothing to score", "1 error record")
    assert_usage_error(run_cli("score", "-", stdin=""), "<stdin>", "nothing to score")


def test_missing_file_and_bad_flags(tmp_path, classified):
    assert_usage_error(run_cli("score", tmp_path / "missing.jsonl"), "record file not found", "missing.jsonl")
    assert_usage_error(run_cli("score", classified, "--format", "jsonl"), "--format")
    assert_usage_error(run_cli("score"), "no record files")


def test_help_has_examples():
    result = run_cli("score", "--help")
    assert result.exit_code == 0 and "Examples:" in result.stdout and "llava score run.jsonl" in result.stdout


def test_scoring_imports_no_model_library(classified):
    code = (
        "import sys\n"
        "from llavanext_cli.cli.main import main\n"
        f"try:\n    main(['score', {str(classified)!r}, '--format', 'json'])\n"
        "except SystemExit as exc:\n    assert exc.code in (0, None), exc.code\n"
        "heavy = [m for m in ('torch', 'transformers', 'numpy') if m in sys.modules]\n"
        "assert not heavy, heavy\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=str(REPO))
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["count"] == 4


def test_group_names_are_the_values_as_text(tmp_path):
    path = write_jsonl(tmp_path / "run.jsonl", [
        {"label": "a", "truth": "a", "fold": 1}, {"label": "b", "truth": "a", "fold": 1},
        {"label": "a", "truth": "a", "fold": None}, {"label": "a", "truth": "a"},
    ])
    report = json.loads(run_cli("score", path, "--format", "json", "--by", "fold").stdout)
    assert {name: group["count"] for name, group in report["groups"].items()} == {"1": 2, "null": 2}
    missing = run_cli("score", path, "--format", "json", "--by", "no_such_key")
    assert missing.exit_code == 0 and "Warning:" in missing.stderr and "no_such_key" in missing.stderr
    assert list(json.loads(missing.stdout)["groups"]) == ["null"]


def test_scores_must_be_probabilities(tmp_path):
    path = tmp_path / "run.jsonl"
    path.write_text('{"label": "a", "truth": "a", "scores": {"a": true}}\n')
    assert_usage_error(run_cli("score", path), "run.jsonl:1:", "scores")
