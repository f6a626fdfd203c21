"""The caption path end to end: greedy output equals plain transformers on the same inputs."""

from __future__ import annotations

import json

import pytest

from conftest import EXAMPLES, run_cli


@pytest.mark.parametrize("fixture,rendered", [
    ("tiny_next", "[INST] <image>\nWhat is shown in this image? [/INST]"),
    ("tiny_llava", "USER: <image>\nWhat is shown in this image? ASSISTANT:"),
])
def test_caption_equals_plain_transformers(request, hf_reference, fixture, rendered):
    checkpoint = request.getfixturevalue(fixture)
    image = EXAMPLES / "rocket.jpg"
    result = run_cli("caption", image, "-m", checkpoint, "--prompt", "What is shown in this image?",
                     "--max-new-tokens", "10", "--format", "json")
    assert result.exit_code == 0, result.stderr
    [record] = json.loads(result.stdout)
    assert record["text"] == hf_reference.answer(checkpoint, rendered, [image], 10)
    assert record["image"] == str(image) and record["model"] == str(checkpoint)
    assert record["prompt"] == "What is shown in this image?" and 1 <= record["new_tokens"] <= 10


def test_failed_input_is_one_record_and_exit_1(tiny_next, tmp_path):
    missing = tmp_path / "missing.png"
    result = run_cli("caption", EXAMPLES / "chelsea.png", missing, "-m", tiny_next, "--max-new-tokens", "3",
                     "--format", "jsonl")
    assert result.exit_code == 1
    first, second = (json.loads(line) for line in result.stdout.splitlines())
    assert "text" in first and second == {"image": str(missing), "error": "no such file"}


def test_no_inputs_exits_2(tiny_next, tmp_path):
    result = run_cli("caption", tmp_path, "-m", tiny_next)
    assert result.exit_code == 2 and "no input images" in result.stderr
