"""Evaluating a checkpoint on your own images: `classify ROOT --truth-from-dirs` gives records that carry the
ground truth (the image's parent folder), `llava score` measures them; and the VQA path, `ask --questions` with
answer lists, then `score`. Through the real CLI on the tiny checkpoint and real images."""

from __future__ import annotations

import csv
import io
import json
import shutil
from pathlib import Path

import pytest

from conftest import EXAMPLES, TEST_IMAGES, run_cli

# ImageFolder layout: one folder per class. Sorted by path: cat/ before cup/ before rocket/.
LAYOUT = {
    "cat": [EXAMPLES / "chelsea.png", TEST_IMAGES / "horse.png"],
    "cup": [EXAMPLES / "coffee.png"],
    "rocket": [EXAMPLES / "rocket.jpg", TEST_IMAGES / "camera.png"],
}
FOLDERS = sorted(LAYOUT)


def make_root(root: Path, layout: dict[str, list[Path]]) -> Path:
    for folder, images in layout.items():
        (root / folder).mkdir(parents=True)
        for image in images:
            shutil.copy(image, root / folder / image.name)
    return root


def expected_images(root: Path) -> list[str]:
    return sorted(str(root / folder / image.name) for folder, images in LAYOUT.items() for image in images)


def jsonl(text: str) -> list[dict]:
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def score(*args) -> dict:
    result = run_cli("score", *args, "--format", "json")
    assert result.exit_code == 0, result.stderr
    return json.loads(result.stdout)


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    """The class folders, and what must not count: a hidden folder of images, a file that is not an image."""
    root = make_root(tmp_path_factory.mktemp("truth") / "pets", LAYOUT)
    (root / ".thumbnails").mkdir()
    shutil.copy(EXAMPLES / "rocket.jpg", root / ".thumbnails" / "rocket.jpg")
    (root / "cat" / "notes.txt").write_text("not an image\n")
    return root


@pytest.fixture(scope="module")
def run(root, tiny_next, tmp_path_factory) -> Path:
    """`llava classify ROOT --truth-from-dirs -o run.jsonl`, once for the module."""
    output = tmp_path_factory.mktemp("run") / "run.jsonl"
    result = run_cli("classify", root, "--truth-from-dirs", "-m", tiny_next, "-o", output)
    assert result.exit_code == 0, result.stderr
    assert "Warning" not in result.stderr
    return output


def test_records_carry_the_folder_as_truth_and_the_folders_are_the_labels(run, root, tiny_next):
    records = jsonl(run.read_text())
    assert [record["image"] for record in records] == expected_images(root)  # hidden folder and .txt skipped
    for record in records:
        assert record["truth"] == Path(record["image"]).parent.name
        assert list(record) == ["image", "label", "truth", "scores", "model"]  # truth right after the label
        assert list(record["scores"]) == FOLDERS
        assert abs(sum(record["scores"].values()) - 1) < 1e-9
        assert record["label"] == max(FOLDERS, key=lambda label: record["scores"][label])
    # The same scores as a plain classify with those labels given explicitly, in that order.
    plain = run_cli("classify", *expected_images(root), "-m", tiny_next, "--labels", ",".join(FOLDERS),
                    "--format", "jsonl")
    assert plain.exit_code == 0, plain.stderr
    for record, reference in zip(records, jsonl(plain.stdout), strict=True):
        assert "truth" not in reference and reference["image"] == record["image"]
        assert list(reference["scores"]) == FOLDERS
        assert all(abs(record["scores"][label] - reference["scores"][label]) < 1e-6 for label in FOLDERS)


def test_score_measures_the_run(run):
    records = jsonl(run.read_text())
    metrics = score(run)
    assert metrics["kind"] == "classification"
    assert metrics["count"] == len(records) and metrics["errors"] == 0
    right = sum(record["label"] == record["truth"] for record in records)
    assert metrics["accuracy"] == pytest.approx(right / len(records))
    assert metrics["confusion"]["labels"] == FOLDERS
    matrix = metrics["confusion"]["matrix"]
    for truth in FOLDERS:
        row = matrix[FOLDERS.index(truth)]
        assert row == [sum(r["truth"] == truth and r["label"] == label for r in records) for label in FOLDERS]
    grouped = score(run, "--by", "truth")
    assert list(grouped["groups"]) == FOLDERS
    for folder in FOLDERS:
        assert grouped["groups"][folder]["count"] == len(LAYOUT[folder])


def test_labels_that_miss_a_folder_warn_once_and_the_records_keep_their_truth(root, tiny_next):
    result = run_cli("classify", root, "--truth-from-dirs", "--labels", "rocket,cat", "-m", tiny_next,
                     "--format", "csv")
    assert result.exit_code == 0, result.stderr
    warnings = [line for line in result.stderr.splitlines() if line.startswith("Warning:")]
    assert len(warnings) == 1 and "cup" in warnings[0] and "never" in warnings[0]
    rows = list(csv.DictReader(io.StringIO(result.stdout)))
    assert list(rows[0]) == ["image", "label", "truth", "scores", "model"]
    assert [row["truth"] for row in rows] == [Path(image).parent.name for image in expected_images(root)]
    assert all(list(json.loads(row["scores"])) == ["rocket", "cat"] for row in rows)


def test_an_unreadable_image_is_an_error_record_with_its_truth(tmp_path, tiny_next):
    root = make_root(tmp_path / "data", {"cat": [EXAMPLES / "chelsea.png"], "rocket": [EXAMPLES / "rocket.jpg"]})
    (root / "cat" / "broken.jpg").write_bytes(b"not a jpeg")
    output = tmp_path / "run.jsonl"
    result = run_cli("classify", root, "--truth-from-dirs", "-m", tiny_next, "-o", output)
    assert result.exit_code == 1
    assert "broken.jpg" in result.stderr
    records = jsonl(output.read_text())
    assert len(records) == 3
    failure = records[0]
    assert failure["image"] == str(root / "cat" / "broken.jpg") and failure["truth"] == "cat"
    assert "error" in failure and "label" not in failure
    metrics = score(output)
    assert metrics["count"] == 2 and metrics["errors"] == 1
    grouped = score(output, "--by", "truth")["groups"]
    assert grouped["cat"]["errors"] == 1 and grouped["cat"]["count"] == 1
    assert grouped["rocket"]["errors"] == 0 and grouped["rocket"]["count"] == 1


def test_resume_completes_the_set_without_duplicates(run, root, tiny_next, tmp_path):
    done = run.read_text().splitlines(keepends=True)
    output = tmp_path / "resumed.jsonl"
    output.write_text("".join(done[:2]))
    result = run_cli("classify", root, "--truth-from-dirs", "-m", tiny_next, "-o", output, "--resume")
    assert result.exit_code == 0, result.stderr
    assert "2 of 5 already done" in result.stderr
    resumed = jsonl(output.read_text())
    assert [record["image"] for record in resumed] == expected_images(root)
    for record, reference in zip(resumed, jsonl("".join(done)), strict=True):
        assert record["truth"] == reference["truth"] and list(record["scores"]) == FOLDERS
        assert all(abs(record["scores"][label] - reference["scores"][label]) < 1e-6 for label in FOLDERS)


def test_one_class_folder_is_one_label_and_refused(tmp_path, tiny_next):
    """One folder makes one label, whose probability would always be 1: a usage error, as --labels "a" is."""
    root = make_root(tmp_path / "only", {"rocket": [EXAMPLES / "rocket.jpg"]})
    result = run_cli("classify", root, "--truth-from-dirs", "-m", tiny_next, "--format", "json")
    assert result.exit_code == 2 and "at least two labels" in result.stderr and result.stdout == ""


@pytest.mark.parametrize("layout", ["empty", "only non-images", "only hidden"])
def test_a_root_without_images_in_class_folders_is_a_usage_error(tmp_path, layout):
    root = tmp_path / "root"
    (root / "cat").mkdir(parents=True)
    if layout == "only non-images":
        (root / "cat" / "readme.txt").write_text("hello\n")
    if layout == "only hidden":
        (root / ".cache").mkdir()
        shutil.copy(EXAMPLES / "rocket.jpg", root / ".cache" / "rocket.jpg")
    result = run_cli("classify", root, "--truth-from-dirs", "-m", tmp_path / "no-model-needed")
    assert result.exit_code == 2
    errors = [line for line in result.stderr.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1 and str(root) in errors[0] and "class folder" in errors[0]
    assert "Traceback" not in result.stderr


def test_no_labels_and_no_truth_from_dirs_is_still_a_usage_error(tmp_path):
    result = run_cli("classify", EXAMPLES / "rocket.jpg", "-m", tmp_path / "no-model")
    assert result.exit_code == 2 and "no labels" in result.stderr and "--truth-from-dirs" in result.stderr


# --- which images a --truth-from-dirs argument takes (no model) ---------------------------------------------


@pytest.fixture
def messy(tmp_path) -> Path:
    """Class folders, an image beside them, an image below a class folder, a hidden one."""
    root = make_root(tmp_path / "data", {"cat": [EXAMPLES / "chelsea.png"], "dog": [EXAMPLES / "rocket.jpg"]})
    shutil.copy(EXAMPLES / "coffee.png", root / "stray.png")
    (root / "dog" / "puppies").mkdir()
    shutil.copy(EXAMPLES / "coffee.png", root / "dog" / "puppies" / "small.png")
    (root / "dog" / ".hidden").mkdir()
    shutil.copy(EXAMPLES / "coffee.png", root / "dog" / ".hidden" / "h.png")
    return root


def test_a_root_is_one_level_of_class_folders_and_what_is_left_out_is_said(messy):
    from llavanext_cli.io.inputs import InputWarning, expand_with_truth

    with pytest.warns(InputWarning) as said:
        found = expand_with_truth([str(messy)])
    assert found == [(str(messy / "cat" / "chelsea.png"), "cat"), (str(messy / "dog" / "rocket.jpg"), "dog")]
    messages = " ".join(str(warning.message) for warning in said)
    assert "stray.png" in messages and "puppies/small.png" in messages and "h.png" not in messages


def test_recursive_takes_every_depth_with_the_parent_folder_as_truth(messy):
    from llavanext_cli.io.inputs import InputWarning, expand_with_truth

    with pytest.warns(InputWarning, match="stray.png"):
        found = expand_with_truth([str(messy)], recursive=True)
    assert found == [(str(messy / "cat" / "chelsea.png"), "cat"),
                     (str(messy / "dog" / "puppies" / "small.png"), "puppies"),
                     (str(messy / "dog" / "rocket.jpg"), "dog")]


def test_class_folders_files_and_relative_paths_take_their_parent_folder(messy, monkeypatch):
    import warnings

    from llavanext_cli.io.inputs import expand_with_truth

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a folder holding only images is a class folder: nothing to warn about
        assert expand_with_truth([str(messy / "cat")]) == [(str(messy / "cat" / "chelsea.png"), "cat")]
    monkeypatch.chdir(messy / "dog")
    assert expand_with_truth(["rocket.jpg", "missing.jpg", "https://example.com/data/bird/1.jpg"]) == [
        ("rocket.jpg", "dog"), ("missing.jpg", "dog"), ("https://example.com/data/bird/1.jpg", "bird")]


# --- VQA: ask --questions with answer lists, then score -----------------------------------------------------


def test_vqa_end_to_end(tmp_path, tiny_next):
    from llavanext_cli.engine.evaluation import vqa_score

    questions = tmp_path / "vqa.jsonl"
    questions.write_text(
        json.dumps({"id": 1, "image": str(EXAMPLES / "chelsea.png"), "question": "What animal is this?",
                    "answers": ["cat", "cat", "a cat", "kitten"], "question_type": "what"}) + "\n"
        + json.dumps({"id": 2, "image": str(EXAMPLES / "rocket.jpg"), "question": "How many rockets?",
                      "answers": ["1", "one", "1", "2"], "question_type": "how many"}) + "\n")
    answers = tmp_path / "answers.jsonl"
    result = run_cli("ask", "--questions", questions, "-m", tiny_next, "--max-new-tokens", "4", "-o", answers)
    assert result.exit_code == 0, result.stderr
    records = jsonl(answers.read_text())
    assert [record["answers"] for record in records] == [["cat", "cat", "a cat", "kitten"], ["1", "one", "1", "2"]]
    metrics = score(answers)
    assert metrics["kind"] == "vqa" and metrics["count"] == 2 and metrics["errors"] == 0
    expected = [vqa_score(record["text"], record["answers"]) for record in records]
    assert metrics["vqa_accuracy"] == pytest.approx(sum(expected) / 2)
    # A right answer counts: "One." is "1" once normalised, as three of the four answers are; leave-one-out, each
    # "1" left out leaves 2 matches (2/3), the "2" left out leaves 3 (1): 0.75.
    with answers.open("a") as file:
        file.write(json.dumps({"image": "x.png", "text": "One.", "answers": ["1", "one", "1", "2"],
                               "question_type": "how many"}) + "\n")
    right = vqa_score("One.", ["1", "one", "1", "2"])
    assert right == pytest.approx(0.75)
    metrics = score(answers)
    assert metrics["count"] == 3 and metrics["vqa_accuracy"] == pytest.approx((sum(expected) + right) / 3)
    assert score(answers, "--by", "question_type")["groups"]["how many"]["count"] == 2
