"""The prompt-format registry: the seeds' strings, multi-turn rendering, chat-template agreement, resolution."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from llavanext_cli.errors import UsageError
from llavanext_cli.model.prompts import (
    load_prompt_format,
    load_registry,
    match_model_id,
    resolve_prompt_format,
    single_image_conversation,
)

from conftest import REPO, run_cli

QUESTION = "What is shown in this image?"

# The strings the seed documents give for "What is shown in this image?" (llama3 with <|start_header_id|> once).
SEED_PROMPTS = {
    "mistral-instruct": "[INST] <image>\nWhat is shown in this image? [/INST]",
    "vicuna": "A chat between a curious human and an artificial intelligence assistant. The assistant gives helpful, "
              "detailed, and polite answers to the human's questions. USER: <image>\nWhat is shown in this image? "
              "ASSISTANT:",
    "chatml-34b": "<|im_start|>system\nAnswer the questions.<|im_end|><|im_start|>user\n<image>\nWhat is shown in "
                  "this image?<|im_end|><|im_start|>assistant\n",
    "llama3": "<|start_header_id|>system<|end_header_id|>\n\nYou are a helpful language and vision assistant. You are "
              "able to understand the visual content that the user provides, and assist the user with a variety of "
              "tasks using natural language.<|eot_id|><|start_header_id|>user<|end_header_id|>\n\n<image>\nWhat is "
              "shown in this image?<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n",
    "qwen-chatml": "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n<image>\nWhat is "
                   "shown in this image?<|im_end|>\n<|im_start|>assistant\n",
    "llava-1.5": "USER: <image>\nWhat is shown in this image? ASSISTANT:",
    "llava-interleave": "<|im_start|>user <image>\nWhat is shown in this image?<|im_end|><|im_start|>assistant",
}

SEED_CHECKPOINTS = {
    "llava-hf/llava-v1.6-mistral-7b-hf": "mistral-instruct",
    "llava-hf/llava-v1.6-vicuna-7b-hf": "vicuna",
    "llava-hf/llava-v1.6-vicuna-13b-hf": "vicuna",
    "llava-hf/llava-v1.6-34b-hf": "chatml-34b",
    "llava-hf/llama3-llava-next-8b-hf": "llama3",
    "llava-hf/llava-next-72b-hf": "qwen-chatml",
    "llava-hf/llava-next-110b-hf": "qwen-chatml",
    "llava-hf/llava-1.5-7b-hf": "llava-1.5",
    "llava-hf/llava-interleave-qwen-0.5b-hf": "llava-interleave",
}


def turn(role, *items):
    content = [{"type": "image"} if item is None else {"type": "text", "text": item} for item in items]
    return {"role": role, "content": content}


@pytest.fixture(scope="module")
def registry():
    return load_registry()


def test_registry_has_every_seed_format(registry):
    assert set(SEED_PROMPTS) <= set(registry)


@pytest.mark.parametrize("name", sorted(SEED_PROMPTS))
def test_single_turn_matches_the_seed_string(registry, name):
    assert registry[name].render(single_image_conversation(QUESTION)) == SEED_PROMPTS[name]


@pytest.mark.parametrize("model_id,name", sorted(SEED_CHECKPOINTS.items()))
def test_seed_checkpoints_resolve_by_model_id(registry, model_id, name):
    assert match_model_id(model_id, registry).name == name


def test_mistral_multi_turn_matches_the_seed(registry):
    conversation = [
        turn("user", None, "What's shown in this image?"),
        turn("assistant", "This image shows a red stop sign."),
        turn("user", "Describe the image in more details."),
    ]
    assert registry["mistral-instruct"].render(conversation) == (
        "[INST] <image>\nWhat's shown in this image? [/INST] This image shows a red stop sign. "
        "[INST] Describe the image in more details. [/INST]"
    )


def test_mistral_multi_image_multi_turn_matches_the_seed(registry):
    conversation = [
        turn("user", None, "What is shown in this image?"),
        turn("assistant", "There is a red stop sign in the image."),
        turn("user", None, "What about this image? How many cats do you see"),
    ]
    assert registry["mistral-instruct"].render(conversation) == (
        "[INST] <image>\nWhat is shown in this image? [/INST] There is a red stop sign in the image. "
        "[INST] <image>\nWhat about this image? How many cats do you see [/INST]"
    )


def test_llava_15_multi_turn_matches_the_seed(registry):
    conversation = [
        turn("user", None, "<prompt1>"), turn("assistant", "<answer1>"),
        turn("user", "<prompt2>"), turn("assistant", "<answer2>"),
        turn("user", "<prompt3>"),
    ]
    assert registry["llava-1.5"].render(conversation) == (
        "USER: <image>\n<prompt1> ASSISTANT: <answer1></s>USER: <prompt2> ASSISTANT: <answer2></s>"
        "USER: <prompt3> ASSISTANT:"
    )


def test_system_message_replaces_the_default(registry):
    conversation = [{"role": "system", "content": "Be terse."}, turn("user", None, "Hi")]
    assert registry["vicuna"].render(conversation) == "Be terse. USER: <image>\nHi ASSISTANT:"
    assert registry["mistral-instruct"].render(conversation) == "<<SYS>>\nBe terse.\n<</SYS>>\n\n[INST] <image>\nHi [/INST]"


CONVERSATIONS = [
    single_image_conversation(QUESTION),
    single_image_conversation("Compare these.", num_images=3),
    [turn("user", None, "Q1"), turn("assistant", "A1"), turn("user", None, "Q2 with a second image"),
     turn("assistant", "A2"), turn("user", "Q3, text only")],
    [{"role": "system", "content": [{"type": "text", "text": "Custom system."}]}, turn("user", "Hi"),
     turn("assistant", "Hello"), turn("user", None, None, "Two images {now} with \"quotes\" and ünïcode")],
]


@pytest.mark.parametrize("name", sorted(SEED_PROMPTS))
@pytest.mark.parametrize("index", range(len(CONVERSATIONS)))
@pytest.mark.parametrize("generation_prompt", [True, False])
def test_generated_chat_template_renders_like_the_registry(registry, name, index, generation_prompt):
    """A checkpoint carrying a registry format as its chat template renders every conversation identically,
    through transformers' own chat-template machinery."""
    from transformers.utils.chat_template_utils import render_jinja_template

    fmt = registry[name]
    conversation = CONVERSATIONS[index]
    rendered, _ = render_jinja_template(conversations=[conversation], chat_template=fmt.to_chat_template(),
                                        add_generation_prompt=generation_prompt)
    assert rendered[0] == fmt.render(conversation, add_generation_prompt=generation_prompt)


REAL_TEMPLATES = json.loads((Path(__file__).parent / "data" / "llava_hf_chat_templates.json").read_text())


@pytest.mark.parametrize("model_id,name,conversation", [
    ("llava-hf/llava-v1.6-mistral-7b-hf", "mistral-instruct", single_image_conversation(QUESTION)),
    ("llava-hf/llava-v1.6-mistral-7b-hf", "mistral-instruct", single_image_conversation(QUESTION, 2)),
    ("llava-hf/llava-v1.6-mistral-7b-hf", "mistral-instruct",
     [{"role": "system", "content": [{"type": "text", "text": "Be brief."}]}, turn("user", None, QUESTION)]),
    ("llava-hf/llava-1.5-7b-hf", "llava-1.5", single_image_conversation(QUESTION)),
    ("llava-hf/llava-1.5-7b-hf", "llava-1.5", single_image_conversation(QUESTION, 2)),
])
def test_registry_agrees_with_the_real_llava_hf_chat_template(registry, model_id, name, conversation):
    """Where the Hub checkpoint's own chat template encodes the same format, the registry renders the same text."""
    from transformers.utils.chat_template_utils import render_jinja_template

    rendered, _ = render_jinja_template(conversations=[conversation], chat_template=REAL_TEMPLATES[model_id],
                                        add_generation_prompt=True)
    assert rendered[0].rstrip() == registry[name].render(conversation).rstrip()


def test_resolution_order(registry):
    calls = []

    def template(messages, **kwargs):
        calls.append(messages)
        return "from the checkpoint"

    mistral = "llava-hf/llava-v1.6-mistral-7b-hf"
    assert resolve_prompt_format(mistral, requested="vicuna", chat_template=template).format.name == "vicuna"
    chosen = resolve_prompt_format(mistral, chat_template=template)
    assert chosen.format.render(single_image_conversation("x")) == "from the checkpoint"
    assert resolve_prompt_format(mistral).format.name == "mistral-instruct"
    by_type = resolve_prompt_format("./my-model", architecture="llava", text_model_type="llama")
    assert by_type.format.name == "llava-1.5" and by_type.warning
    assert resolve_prompt_format("./x", architecture="llava_next", text_model_type="llama").format.name == "vicuna"
    with pytest.raises(UsageError, match="unknown prompt format"):
        resolve_prompt_format(mistral, requested="nope")
    with pytest.raises(UsageError, match="cannot tell"):
        resolve_prompt_format("./x", architecture="llava_next", text_model_type="gemma")


def test_format_file_errors_name_the_file_and_field(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\nuser: 'no placeholder'\nassistant: '{content}'\ngeneration_prompt: ''\nimage: '<image>'\n")
    with pytest.raises(UsageError) as info:
        load_prompt_format(bad)
    assert str(bad) in info.value.message and "'user'" in info.value.message
    bad.write_text("name: x\nuser: '{content}'\nassistant: '{content}'\ngeneration_prompt: ''\nimage: 1\n")
    with pytest.raises(UsageError, match="'image'"):
        load_prompt_format(bad)
    bad.write_text("name: x\nuser: '{content}'\nasistant: '{content}'\n")
    with pytest.raises(UsageError, match="'asistant'"):
        load_prompt_format(bad)


def test_custom_format_file_via_the_cli(tmp_path, tiny_llava):
    custom = tmp_path / "custom.yaml"
    custom.write_text(yaml.safe_dump({"name": "custom", "user": "Q: {content}\n", "assistant": "A: {content}\n",
                                      "generation_prompt": "A:", "image": "<image>"}))
    result = run_cli("inspect-config", tiny_llava, "--prompt-format", custom, "--format", "json")
    assert result.exit_code == 0, result.stderr
    assert json.loads(result.stdout)["prompt"] == "Q: <image>What is shown in this image?\nA:"


def test_unknown_prompt_format_exits_2(tiny_llava):
    result = run_cli("inspect-config", tiny_llava, "--prompt-format", "nope")
    assert result.exit_code == 2
    assert result.stderr.startswith("Error: unknown prompt format 'nope'")
    assert "Hint:" in result.stderr and "mistral-instruct" in result.stderr


def test_shipped_registry_files_are_what_load_registry_reads():
    names = {load_prompt_format(p).name for p in (REPO / "prompts").glob("*.yaml")}
    assert names == set(load_registry())
