"""A checkpoint's own generation_config.json may say anything transformers accepts: the tool's documented defaults
win where the contract fixes them (greedy unless --temperature, --max-new-tokens, --num-beams, one answer per
prompt), every other key is honoured, and no combination ends in a traceback."""

from __future__ import annotations

import json
import shutil

import pytest

from conftest import EXAMPLES, run_cli

CAT, ROCKET = EXAMPLES / "chelsea.png", EXAMPLES / "rocket.jpg"
TOKENS = ("--max-new-tokens", "6")

# One worker runs the module: the baseline records are made once for all its tests.
pytestmark = pytest.mark.xdist_group("generation-config")


def with_generation_config(tiny_next, tmp_path, **keys):
    """A copy of the tiny checkpoint whose generation_config.json also says `keys`."""
    folder = tmp_path / "variant"
    shutil.copytree(tiny_next, folder)
    path = folder / "generation_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **keys}))
    return folder


def records(*args, stdin: str = "") -> list[dict]:
    result = run_cli(*args, stdin=stdin)
    assert result.exit_code == 0, result.stderr
    assert result.stderr == "", result.stderr
    return [{k: v for k, v in json.loads(line).items() if k not in ("seconds", "model")}
            for line in result.stdout.splitlines()]


PATHS = ("caption", "ask", "questions", "classify", "schema", "chat")


def every_path(checkpoint, tmp_path, paths=PATHS) -> dict[str, list[dict]]:
    """caption, ask with several questions (a shared prefix), a questions file, classify (the labels continue from
    the prompt's cache), --schema, and a piped chat (the conversation's cache): the records of each of `paths`."""
    questions = tmp_path / "q.jsonl"
    questions.write_text("".join(json.dumps({"image": str(image), "question": question}) + "\n"
                                 for image in (CAT, ROCKET) for question in ("What is it?", "Where?")))
    common = ("-m", checkpoint, "--format", "jsonl")
    runs = {
        "caption": lambda: records("caption", CAT, ROCKET, *common, *TOKENS, "--batch-size", "2"),
        "ask": lambda: records("ask", CAT, "-q", "What is it?", "-q", "What colour is it?", *common, *TOKENS),
        "questions": lambda: records("ask", "--questions", questions, *common, *TOKENS),
        "classify": lambda: records("classify", CAT, "--labels", "a cat,a dog,a rocket ship", *common),
        "schema": lambda: records("caption", CAT, "--schema", "kind: animal|object, count int 0..9", *common,
                                  "--max-new-tokens", "40"),
        "chat": lambda: records("chat", CAT, *common, *TOKENS, stdin="What is it?\nAnd its colour?\n/image "
                                f"{ROCKET}\nAnd this one?\n"),
    }
    return {path: runs[path]() for path in paths}


@pytest.fixture(scope="module")
def baseline(tiny_next, tmp_path_factory):
    return every_path(tiny_next, tmp_path_factory.mktemp("baseline"))


@pytest.mark.parametrize("keys,paths", [
    ({"cache_implementation": "static"}, PATHS),                      # as some checkpoints (and --compile) do
    ({"do_sample": True, "temperature": 0.7, "top_k": 5, "top_p": 0.8}, ("caption", "ask", "chat")),  # greedy
    ({"max_length": 5, "max_new_tokens": 2}, ("caption", "chat")),    # --max-new-tokens wins
    ({"num_beams": 3, "num_return_sequences": 2}, ("caption", "ask")),  # --num-beams wins; one answer a prompt
    ({"use_cache": False, "return_dict_in_generate": True, "output_scores": True}, ("caption", "ask", "schema")),
], ids=["static-cache", "sampling", "max-length", "beams", "no-cache-dict-output"])
def test_what_the_contract_fixes_wins_and_every_path_gives_the_same_records(tiny_next, tmp_path, baseline, keys,
                                                                            paths):
    variant = with_generation_config(tiny_next, tmp_path, **keys)
    assert every_path(variant, tmp_path, paths) == {path: baseline[path] for path in paths}


def test_several_end_of_sequence_ids_are_honoured(tiny_next, tmp_path, hf_reference):
    """An answer ends on any of the checkpoint's eos_token_id, as plain transformers' generate does."""
    [plain] = records("caption", CAT, "-m", tiny_next, "--format", "jsonl", "--max-new-tokens", "12")
    processor, _ = hf_reference(tiny_next)
    third = processor.tokenizer(plain["text"], add_special_tokens=False).input_ids[2]
    variant = with_generation_config(tiny_next, tmp_path, eos_token_id=[2, third])
    [ended] = records("caption", CAT, "-m", variant, "--format", "jsonl", "--max-new-tokens", "12")
    assert ended["new_tokens"] == 3 < plain["new_tokens"]
    expected = hf_reference.answer(variant, "[INST] <image>\nDescribe this image in detail. [/INST]", [CAT], 12)
    assert ended["text"] == expected


def test_other_keys_are_honoured_as_plain_transformers_honours_them(tiny_next, tmp_path, hf_reference):
    """repetition_penalty and no_repeat_ngram_size change greedy answers: the tool's equal plain transformers' with
    the same generation config."""
    variant = with_generation_config(tiny_next, tmp_path, repetition_penalty=1.8, no_repeat_ngram_size=2)
    for image in (CAT, ROCKET):
        [record] = records("caption", image, "-m", variant, "--format", "jsonl", "--max-new-tokens", "12")
        expected = hf_reference.answer(variant, "[INST] <image>\nDescribe this image in detail. [/INST]", [image],
                                       12)
        assert record["text"] == expected


def test_stop_strings_are_honoured(tiny_next, tmp_path):
    [plain] = records("caption", CAT, "-m", tiny_next, "--format", "jsonl", "--max-new-tokens", "12")
    cut_after = plain["text"][:max(2, len(plain["text"]) // 3)]
    variant = with_generation_config(tiny_next, tmp_path, stop_strings=[cut_after])
    [stopped] = records("caption", CAT, "-m", variant, "--format", "jsonl", "--max-new-tokens", "12")
    assert stopped["new_tokens"] < plain["new_tokens"] and plain["text"].startswith(stopped["text"])
    assert cut_after in stopped["text"]


def test_sampling_with_a_temperature_takes_the_checkpoints_top_k(tiny_next, tmp_path):
    """With --temperature the answer is sampled, and the checkpoint's own top_k applies: top_k 1 samples the greedy
    answer, whatever the seed."""
    variant = with_generation_config(tiny_next, tmp_path, top_k=1)
    [greedy] = records("caption", CAT, "-m", variant, "--format", "jsonl", *TOKENS)
    for seed in ("1", "2"):
        [sampled] = records("caption", CAT, "-m", variant, "--format", "jsonl", *TOKENS, "--temperature", "1.5",
                            "--seed", seed, "--workers", "1")
        assert sampled["text"] == greedy["text"]


def test_a_cache_the_machine_cannot_make_is_refused_before_loading(tiny_next, tmp_path):
    variant = with_generation_config(tiny_next, tmp_path, cache_implementation="quantized",
                                     cache_config={"backend": "no_such_quantizer_package"})
    (variant / "model.safetensors").write_bytes(b"\x00" * 16)  # never read: the plan refuses first
    result = run_cli("caption", CAT, "-m", variant)
    assert result.exit_code == 2 and "quantized KV cache" in result.stderr and "Traceback" not in result.stderr
