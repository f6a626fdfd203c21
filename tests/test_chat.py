"""chat: piped turns equal transformers over the same messages; /image, /reset, /save and /load; context overflow;
and a real terminal session."""

from __future__ import annotations

import io
import json
import os
import shutil
import sys
import time

import pexpect
import yaml

from conftest import EXAMPLES, REPO, run_cli

CAT, ROCKET = EXAMPLES / "chelsea.png", EXAMPLES / "rocket.jpg"


def chat(checkpoint, lines, *args):
    result = run_cli("chat", *args, "-m", checkpoint, "--max-new-tokens", "6", "--format", "jsonl",
                     stdin="".join(line + "\n" for line in lines))
    return result, [json.loads(line) for line in result.stdout.splitlines()]


def reference_reply(hf_reference, checkpoint, messages, render=None):
    """apply_chat_template (or the registry format, for a checkpoint without one) over the same messages, greedy."""
    processor, _ = hf_reference(checkpoint)
    prompt = render(messages) if render else processor.apply_chat_template(messages, add_generation_prompt=True,
                                                                           tokenize=False)
    images = [item["path"] for m in messages for item in m["content"] if item["type"] == "image"]
    return hf_reference.answer(checkpoint, prompt, images, 6)


def user(text, *images):
    return {"role": "user", "content": [*({"type": "image", "path": str(p)} for p in images),
                                        {"type": "text", "text": text}]}


def assistant(text):
    return {"role": "assistant", "content": [{"type": "text", "text": text}]}


def test_piped_turns_and_image_mid_conversation_match_transformers(tiny_next, hf_reference):
    result, replies = chat(tiny_next, ["What is this?", "/image " + str(ROCKET), "And this one?", "Compare them."], CAT)
    assert result.exit_code == 0, result.stderr
    assert [r["turn"] for r in replies] == [1, 2, 3]
    history = [user("What is this?", CAT)]
    for index, question in enumerate([None, "And this one?", "Compare them."]):
        if question:
            history.append(user(question, ROCKET) if index == 1 else user(question))
        expected = reference_reply(hf_reference, tiny_next, history)
        assert replies[index]["text"] == expected
        history.append(assistant(expected))


def test_registry_format_without_chat_template(tiny_llava, hf_reference):
    from llavanext_cli.model.prompts import load_registry

    result, replies = chat(tiny_llava, ["Hi there", "Tell me more"], CAT)
    assert result.exit_code == 0, result.stderr
    fmt = load_registry()["llava-1.5"]
    history = [user("Hi there", CAT)]
    first = reference_reply(hf_reference, tiny_llava, history, fmt.render)
    history += [assistant(first), user("Tell me more")]
    assert [r["text"] for r in replies] == [first, reference_reply(hf_reference, tiny_llava, history, fmt.render)]


def test_text_format_is_one_line_per_answer(tiny_next):
    result = run_cli("chat", CAT, "-m", tiny_next, "--max-new-tokens", "6", stdin="One\n\nTwo\n")
    assert result.exit_code == 0 and len(result.stdout.splitlines()) == 2


def test_reset_starts_over(tiny_next):
    _, fresh = chat(tiny_next, ["Hello"])
    _, replies = chat(tiny_next, ["What is this?", "/reset", "Hello"], CAT)
    assert replies[-1]["text"] == fresh[0]["text"]


def test_save_load_continue_equals_an_unbroken_session(tiny_next, tmp_path):
    transcript = tmp_path / "talk.json"
    _, unbroken = chat(tiny_next, ["What is this?", "/image " + str(ROCKET), "And this?", "Which is bigger?"], CAT)
    result, first = chat(tiny_next, ["What is this?", "/image " + str(ROCKET), "And this?", f"/save {transcript}"],
                         CAT)
    assert result.exit_code == 0, result.stderr
    saved = json.loads(transcript.read_text())
    assert saved["model"] == str(tiny_next)
    assert {"dtype", "quant", "seed", "prompt_format", "max_new_tokens", "temperature"} <= set(saved["settings"])
    image_item = saved["messages"][0]["content"][0]
    assert image_item["type"] == "image" and image_item["path"] == str(CAT) and len(image_item["sha256"]) == 64
    result, after = chat(tiny_next, [f"/load {transcript}", "Which is bigger?"])
    assert result.exit_code == 0, result.stderr
    assert after == [{"turn": 3, "text": unbroken[2]["text"]}]


def test_load_warns_about_missing_and_changed_images(tiny_next, tmp_path):
    moved, changed = tmp_path / "cat.png", tmp_path / "rocket.jpg"
    shutil.copy(CAT, moved)
    shutil.copy(ROCKET, changed)
    transcript = tmp_path / "talk.json"
    chat(tiny_next, ["One", f"/image {changed}", "Two", f"/save {transcript}"], moved)
    moved.unlink()
    shutil.copy(EXAMPLES / "coffee.png", changed)
    result, replies = chat(tiny_next, [f"/load {transcript}", "Three"])
    assert "cat.png cannot be read" in result.stderr and "rocket.jpg has changed" in result.stderr
    assert len(replies) == 1


def test_bad_commands_are_reported_and_the_session_goes_on(tiny_next, tmp_path):
    result, replies = chat(tiny_next, ["/image " + str(tmp_path / "nope.png"), "/frobnicate", "/load nope.json",
                                       "Still there?"])
    assert result.exit_code == 1
    assert "nope.png" in result.stderr and "unknown command" in result.stderr and "not found" in result.stderr
    assert len(replies) == 1


def test_context_overflow_drops_the_oldest_turns_and_says_so(tmp_path, hf_reference):
    spec = yaml.safe_load((REPO / "configs" / "tiny-llava.yaml").read_text())
    spec["text"]["max_position_embeddings"] = 1400  # about two 576-token images
    path = tmp_path / "short.yaml"
    path.write_text(yaml.safe_dump(spec))
    assert run_cli("init-model", path, tmp_path / "short").exit_code == 0
    lines = ["First?", f"/image {ROCKET}", "Second?", f"/image {CAT}", "Third?"]
    result, replies = chat(tmp_path / "short", lines, CAT)
    assert result.exit_code == 0, result.stderr
    assert len(replies) == 3 and "dropped the oldest 1 exchange" in result.stderr
    # Every image is 576 tokens of the same id here: after the drop, the rocket's tokens stand where the cat's stood
    # in the conversation's cache. The answer must still be the one to the history as kept.
    kept = [user("Second?", ROCKET), assistant(replies[1]["text"]), user("Third?", CAT)]
    assert replies[2]["text"] == reference_reply(hf_reference, tmp_path / "short", kept, render=llava_15_turns)


def llava_15_turns(messages):
    """The seeds' multi-turn llava-1.5 prompt: "USER: <image>\\n<prompt1> ASSISTANT: <answer1></s>USER: ..."."""
    parts = []
    for message in messages:
        images = "".join("<image>\n" for item in message["content"] if item["type"] == "image")
        text = "".join(item["text"] for item in message["content"] if item["type"] == "text")
        parts.append(f"USER: {images}{text} " if message["role"] == "user" else f"ASSISTANT: {text}</s>")
    return "".join(parts) + "ASSISTANT:"


def test_terminal_session(tiny_next):
    child = pexpect.spawn(sys.executable, ["-m", "llavanext_cli", "chat", str(CAT), "-m", str(tiny_next),
                                           "--max-new-tokens", "6"], cwd=str(REPO), encoding="utf-8", timeout=120,
                          env={**os.environ, "TERM": "xterm-256color", "COLUMNS": "160", "LINES": "40"},
                          dimensions=(40, 160))
    child.logfile_read = screen = io.StringIO()
    # readline may flush input typed before it takes the terminal: wait for it to settle after each prompt
    settle = 0.5
    child.expect(r"prompt\s+format")  # the banner wraps at the terminal's width, wherever the model's path puts it
    child.expect("you>")
    time.sleep(settle)
    child.sendline("/help")
    child.expect("/image PATH")
    child.expect("you>")
    time.sleep(settle)
    child.sendline("What is this?")
    child.expect("llava>")
    child.expect("you>")
    answer = child.before.strip()
    assert answer
    time.sleep(settle)
    child.sendline(f"/image {ROCKET}")
    child.expect("you>")
    said = child.before
    time.sleep(settle)
    child.sendline("And this?")
    child.expect("llava>")
    child.expect("you>")
    time.sleep(settle)
    child.sendeof()
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0
    assert said.count("Attached to your next message") == 1 and said.count(str(ROCKET)) == 2  # typed, then said once
    assert "Warning" not in screen.getvalue()  # a successful session says nothing but the conversation
    piped = run_cli("chat", CAT, "-m", tiny_next, "--max-new-tokens", "6", stdin="What is this?\n")
    assert piped.stdout.strip() in answer.replace("\r", "")


def test_ctrl_c_stops_an_answer_and_keeps_the_session(tiny_next):
    child = pexpect.spawn(sys.executable, ["-m", "llavanext_cli", "chat", "-m", str(tiny_next),
                                           "--max-new-tokens", "12000"], cwd=str(REPO), encoding="utf-8", timeout=120,
                          env={**os.environ, "TERM": "xterm-256color", "COLUMNS": "160", "LINES": "40"},
                          dimensions=(40, 160))
    child.expect("you>")
    time.sleep(0.5)
    child.sendline("Write a very long story.")
    child.expect(r"llava>(\x1b\[[0-9;]*m)*\s*[^\s\x1b]")  # the answer is streaming
    child.sendintr()
    child.expect("answer stopped")
    child.expect("you>")
    time.sleep(0.5)
    child.sendline("/exit")
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0


def test_piped_lines_stay_aligned_and_format_comes_from_settings(tiny_next, monkeypatch):
    monkeypatch.setenv("LLAVA_FORMAT", "jsonl")
    too_long = "word " * 20000  # does not fit the context: an error line in place of the answer
    result = run_cli("chat", "-m", tiny_next, "--max-new-tokens", "4", stdin=f"Hi\n{too_long}\nAgain\n/reset\nNew\n")
    replies = [json.loads(line) for line in result.stdout.splitlines()]
    assert result.exit_code == 1
    assert [r["turn"] for r in replies] == [1, 2, 3, 1]
    assert "error" in replies[1] and all("text" in replies[i] for i in (0, 2, 3))
