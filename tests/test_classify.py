"""classify: scores equal to the contract's definition computed the naive way, each image encoded once."""

from __future__ import annotations

import json
import math

import pytest

from conftest import EXAMPLES, TEST_IMAGES, run_cli

# shared prefixes, punctuation, quotes and non-ASCII (commas separate labels on the command line)
LABELS = ["a cat", "a cat toy", "rocket", "«naïve» \"quoted\" ok?", "dog", "b"]
IMAGES = [EXAMPLES / "chelsea.png", TEST_IMAGES / "page.png"]  # a photo, and a page of awkward geometry
QUESTION = "What is this? Answer with one of: {labels}."


_NAIVE: dict = {}  # the naive forwards, shared by the sum and mean normalisations


def naive_log_scores(hf_reference, checkpoint, image_path, rendered_prompt, labels, normalize):
    """The contract, written plainly: one full forward with the image per label, teacher forcing."""
    import torch

    from llavanext_cli.io.images import load_image

    key = (str(checkpoint), str(image_path), rendered_prompt, tuple(labels))
    if key not in _NAIVE:
        processor, model = hf_reference(checkpoint)
        image = load_image(image_path)
        prompt_length = processor(images=image, text=rendered_prompt, return_tensors="pt").input_ids.shape[1]
        per_label = []
        for label in labels:
            text = rendered_prompt + ("" if rendered_prompt[-1].isspace() else " ") + label
            inputs = processor(images=image, text=text, return_tensors="pt")
            with torch.inference_mode():
                log_probs = model(**inputs).logits[0].double().log_softmax(-1)
            ids = inputs.input_ids[0]
            per_label.append([log_probs[j - 1, ids[j]].item() for j in range(prompt_length, len(ids))])
        _NAIVE[key] = per_label
    return [sum(tokens) / (len(tokens) if normalize == "mean" else 1) for tokens in _NAIVE[key]]


def log_softmax(values):
    top = max(values)
    total = math.log(sum(math.exp(v - top) for v in values)) + top
    return [v - total for v in values]


def classify(checkpoint, images, labels, *extra):
    result = run_cli("classify", *images, "-m", checkpoint, "--labels", ",".join(labels),
                     "--format", "json", *extra)
    assert result.exit_code == 0, result.stderr
    return json.loads(result.stdout)


@pytest.mark.xdist_group("naive-classify")  # one worker computes the naive forwards once for both normalisations
@pytest.mark.parametrize("normalize", ["sum", "mean"])
@pytest.mark.parametrize("fixture,template", [
    ("tiny_next", "[INST] <image>\n{q} [/INST]"),
    ("tiny_llava", "USER: <image>\n{q} ASSISTANT:"),
])
def test_scores_equal_the_naive_reference(request, hf_reference, fixture, template, normalize):
    checkpoint = request.getfixturevalue(fixture)
    labels = LABELS
    records = classify(checkpoint, IMAGES, labels, "--prompt", QUESTION, "--normalize", normalize,
                       "--batch-size", "2")
    question = QUESTION.replace("{labels}", ", ".join(labels))
    for image, record in zip(IMAGES, records):
        assert record["image"] == str(image) and list(record["scores"]) == labels
        assert abs(sum(record["scores"].values()) - 1) < 1e-9
        expected = log_softmax(naive_log_scores(hf_reference, checkpoint, image, template.format(q=question), labels,
                                                normalize))
        got = [math.log(record["scores"][label]) for label in labels]
        assert max(abs(a - b) for a, b in zip(got, expected)) < 1e-4
        assert record["label"] == max(labels, key=lambda label: record["scores"][label])


def test_label_order_does_not_change_any_score(tiny_next):
    labels = ["a cat", "a cat toy", "dog", "rocket"]
    prompt = ("--prompt", "Which one is it?")
    forward = classify(tiny_next, IMAGES[:1], labels, *prompt)[0]["scores"]
    backward = classify(tiny_next, IMAGES[:1], labels[::-1], *prompt)[0]["scores"]
    assert list(backward) == labels[::-1]
    assert all(abs(forward[label] - backward[label]) < 1e-9 for label in labels)


def test_each_image_is_encoded_once(tiny_next):
    """However many labels, the vision tower runs once per batch of images."""
    from llavanext_cli.io.images import load_image
    from llavanext_cli.model.loading import configure_library_logging
    from llavanext_cli.engine.scoring import score_labels
    from llavanext_cli.model.checkpoint import open_checkpoint
    from llavanext_cli.io.settings import load_settings

    configure_library_logging(False)
    checkpoint = open_checkpoint(load_settings({"model": str(tiny_next)}, env={}))
    calls = []
    checkpoint.model.model.vision_tower.register_forward_hook(lambda *args: calls.append(1))
    images = [load_image(path) for path in IMAGES[:2]]
    results = score_labels(checkpoint, images, "Which?", [f"label {i}" for i in range(8)])
    assert len(results) == 2 and len(calls) == 1


def test_a_single_label_is_refused_its_probability_would_always_be_one(tiny_next):
    result = run_cli("classify", IMAGES[0], "-m", tiny_next, "--labels", "only")
    assert result.exit_code == 2 and "at least two labels" in result.stderr and result.stdout == ""


def test_labels_file_and_placeholder(tiny_next, tmp_path):
    labels_file = tmp_path / "labels.txt"
    labels_file.write_text("# animals\ncat\n\n dog \n# done\n")
    result = run_cli("classify", IMAGES[0], "-m", tiny_next, "--labels-file", labels_file, "--format", "jsonl")
    assert result.exit_code == 0, result.stderr
    assert list(json.loads(result.stdout)["scores"]) == ["cat", "dog"]


@pytest.mark.parametrize("args,message", [
    (("--labels", ""), "no labels"),
    (("--labels", "a,,b"), "empty label"),
    (("--labels", "a, b,a"), "duplicate label 'a'"),
    ((), "no labels"),
    (("--labels", "a", "--labels-file", "x.txt"), "not both"),
    (("--labels", "a,b", "--normalize", "max"), "'normalize'"),
])
def test_bad_labels_exit_2(tiny_next, args, message):
    result = run_cli("classify", IMAGES[0], "-m", tiny_next, *args)
    assert result.exit_code == 2 and message in result.stderr


def test_text_display_on_a_terminal_shows_sorted_bars(tiny_next):
    import os
    import sys

    import pexpect

    from conftest import REPO

    child = pexpect.spawn(sys.executable, ["-m", "llavanext_cli", "classify", str(IMAGES[0]), "-m", str(tiny_next),
                                           "--labels", "a cat,dog,b,rocket", "--top-k", "3"], cwd=str(REPO),
                          encoding="utf-8", timeout=120, env={**os.environ, "TERM": "dumb"}, dimensions=(40, 160))
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0
    lines = [line for line in child.before.replace("\r", "").splitlines() if "%" in line]
    assert len(lines) == 3
    percents = [float(line.rsplit(None, 1)[-1].rstrip("%")) for line in lines]
    assert percents == sorted(percents, reverse=True) and "█" in child.before


def test_bad_image_is_an_error_record(tiny_next, tmp_path):
    result = run_cli("classify", IMAGES[0], tmp_path / "nope.png", "-m", tiny_next, "--labels", "a,b",
                     "--format", "jsonl")
    assert result.exit_code == 1
    good, bad = (json.loads(line) for line in result.stdout.splitlines())
    assert "label" in good and bad == {"image": str(tmp_path / "nope.png"), "error": "no such file"}


def test_text_in_a_pipe_is_one_line_per_image(tiny_next):
    result = run_cli("classify", *IMAGES[:2], "-m", tiny_next, "--labels", "a cat,dog")
    assert result.exit_code == 0, result.stderr
    lines = result.stdout.splitlines()
    assert len(lines) == 2 and all(line.split("\t")[1] in ("a cat", "dog") for line in lines)
