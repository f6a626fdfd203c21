"""What a person sees on a terminal: a progress bar for several images, a streamed answer for one; and in a pipe,
nothing on stderr but errors and warnings."""

from __future__ import annotations

import json
import os
import sys

import pexpect

from conftest import EXAMPLES, REPO, run_cli


def spawn(*args, timeout=120):
    child = pexpect.spawn(sys.executable, ["-m", "llavanext_cli", *map(str, args)], cwd=str(REPO), encoding="utf-8",
                          timeout=timeout, dimensions=(40, 160),
                          env={**os.environ, "TERM": "xterm-256color", "COLUMNS": "160", "LINES": "40"})
    child.expect(pexpect.EOF)
    child.close()
    return child.exitstatus, child.before


def test_progress_bar_on_a_terminal(tiny_next):
    images = [EXAMPLES / "chelsea.png", EXAMPLES / "rocket.jpg", EXAMPLES / "coffee.png"]
    status, screen = spawn("caption", *images, "-m", tiny_next, "--max-new-tokens", "20", "--batch-size", "1")
    assert status == 0
    assert "images" in screen and "/3" in screen  # the bar's description and its count
    for image in images:
        assert str(image) in screen


def test_single_answer_streams_and_matches_the_record(tiny_next):
    status, screen = spawn("caption", EXAMPLES / "chelsea.png", "-m", tiny_next, "--max-new-tokens", "8")
    assert status == 0
    piped = run_cli("caption", EXAMPLES / "chelsea.png", "-m", tiny_next, "--max-new-tokens", "8", "--format", "jsonl")
    text = json.loads(piped.stdout)["text"]
    assert text in screen.replace("\r\n", "\n")


def test_a_json_answer_is_shown_whole_or_not_at_all(tiny_next):
    """--schema: no streaming, so an answer cut short leaves no half JSON on the terminal, only the error."""
    cut_status, cut = spawn("caption", EXAMPLES / "chelsea.png", "-m", tiny_next, "--schema", "count int 0..9, ok bool",
                            "--max-new-tokens", "4")
    assert cut_status == 1 and "answer cut at 4 tokens" in cut and '{"' not in cut
    status, screen = spawn("caption", EXAMPLES / "chelsea.png", "-m", tiny_next, "--schema", "count int 0..9, ok bool",
                           "--max-new-tokens", "40")
    assert status == 0
    piped = run_cli("caption", EXAMPLES / "chelsea.png", "-m", tiny_next, "--schema", "count int 0..9, ok bool",
                    "--max-new-tokens", "40", "--format", "jsonl")
    assert json.loads(piped.stdout)["text"] + "\r\n" in screen


def test_nothing_on_stderr_in_a_pipe(tiny_next):
    result = run_cli("caption", EXAMPLES / "chelsea.png", EXAMPLES / "rocket.jpg", "-m", tiny_next,
                     "--max-new-tokens", "3")
    assert result.exit_code == 0 and result.stderr == ""
    assert len(result.stdout.splitlines()) == 2
