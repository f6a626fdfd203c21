"""One image, many prompts: the figures for docs/benchmarks.md.

    python benchmarks/shared_prefix.py [--images 12] [--questions 6] [--turns 14] [--repeats 3] [-m CHECKPOINT]

Whole processes, interleaved run by run, on the tiny LLaVA-NeXT checkpoint (built here) and images cut from the
repository's (benchmarks/run.py's mix of sizes):
  1. `llava ask DIR -q Q1 ... -q Q6` against the plain loop (benchmarks/plain_questions.py: one prompt at a time,
     the seeds' way), on one image and on --images images; the marginal cost of the images beyond the first is
     compared, so that start-up and loading (the same in both) do not count;
  2. `llava chat A` piped (image A on turn 1, image B on turn 2, then text turns) against the plain
     re-rendering of the whole history every turn (benchmarks/plain_chat.py), with 2 turns and with --turns
     turns: the marginal cost of the turns beyond the second, and each turn's latency.
Both check that the answers are the same.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import HERE, make_images, tiny_model

QUESTIONS = ["What is it?", "How many people are there?", "Is it indoors?", "What colour is it?",
             "Describe the scene.", "What time of day is it?", "Is there any text?", "What is in the background?"]
TURNS = ["What is this?", "And this one?", "Which is bigger?", "What colours are there?", "Tell me more.",
         "Is anything moving?", "Where could this be?", "What is missing?", "Summarise both.", "Any text?",
         "What is the mood?", "Compare the backgrounds.", "One word for each?", "Thanks, anything else?",
         "What did I ask first?", "Last question: why?"]


def timed_lines(command: list[str], stdin: str = "") -> tuple[float, list[float], list[dict]]:
    """Run a whole process: its wall time, the arrival time of each stdout line, the lines as JSON."""
    start = time.perf_counter()
    process = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True)
    process.stdin.write(stdin)
    process.stdin.close()
    arrivals, lines = [], []
    for line in process.stdout:
        arrivals.append(time.perf_counter() - start)
        lines.append(json.loads(line))
    if process.wait() != 0:
        raise SystemExit(f"benchmark command failed: {' '.join(command)}\n{process.stderr.read()}")
    return time.perf_counter() - start, arrivals, lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=12)
    parser.add_argument("--questions", type=int, default=6)
    parser.add_argument("--turns", type=int, default=14)
    parser.add_argument("--max-new-tokens", type=int, default=6)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("-m", "--model")
    args = parser.parse_args()
    questions = QUESTIONS[:args.questions]
    tokens = str(args.max_new_tokens)

    with tempfile.TemporaryDirectory(prefix="llava-bench-") as workdir:
        work = Path(workdir)
        model = tiny_model(work, args.model)
        many, one = work / "many", work / "one"
        many.mkdir()
        one.mkdir()
        make_images(many, args.images)
        first = sorted(many.iterdir())[0]
        (one / first.name).write_bytes(first.read_bytes())

        def tool(folder: Path) -> list[str]:
            return [sys.executable, "-m", "llavanext_cli", "ask", str(folder), *[a for q in questions for a in ("-q", q)],
                    "-m", model, "--max-new-tokens", tokens, "--format", "jsonl"]

        def plain(folder: Path) -> list[str]:
            return [sys.executable, str(HERE / "plain_questions.py"), model, str(folder), tokens, *questions]

        runs: dict[str, list[float]] = {"tool_one": [], "tool_many": [], "plain_one": [], "plain_many": []}
        same = True
        for _ in range(args.repeats):
            for name, command in (("plain_one", plain(one)), ("tool_one", tool(one)), ("plain_many", plain(many)),
                                  ("tool_many", tool(many))):
                wall, _, lines = timed_lines(command)
                runs[name].append(wall)
                if name.endswith("many"):
                    texts = [line["text"] for line in lines]
                    same = same and (runs.setdefault("texts", texts) == texts)  # type: ignore[arg-type]
        med = {name: statistics.median(values) for name, values in runs.items() if name != "texts"}
        extra = args.images - 1
        marginal_tool, marginal_plain = med["tool_many"] - med["tool_one"], med["plain_many"] - med["plain_one"]
        print(f"ask: {args.questions} questions an image, {args.max_new_tokens} new tokens, median of {args.repeats}")
        print(f"  1 image:  plain {med['plain_one']:.2f} s, llava ask {med['tool_one']:.2f} s")
        print(f"  {args.images} images: plain {med['plain_many']:.2f} s, llava ask {med['tool_many']:.2f} s "
              f"(whole runs: {med['tool_many'] / med['plain_many']:.3f})")
        print(f"  marginal cost of {extra} more images x {args.questions} questions: plain {marginal_plain:.2f} s, "
              f"llava ask {marginal_tool:.2f} s, ratio {marginal_tool / marginal_plain:.3f}; same answers: {same}")

        # chat
        second = sorted(many.iterdir())[1]
        turns = TURNS[:args.turns]

        def script(count: int) -> str:
            return "".join(line + "\n" for line in [turns[0], f"/image {second}", *turns[1:count]])

        def chat_tool(count: int) -> tuple[list[str], str]:
            return ([sys.executable, "-m", "llavanext_cli", "chat", str(first), "-m", model, "--max-new-tokens",
                     tokens, "--format", "jsonl"], script(count))

        def chat_plain(count: int) -> tuple[list[str], str]:
            return [sys.executable, str(HERE / "plain_chat.py"), model, tokens, str(first)], script(count)

        chat: dict[str, list[float]] = {"tool_short": [], "tool_long": [], "plain_short": [], "plain_long": []}
        latency: dict[str, list[list[float]]] = {"tool": [], "plain": []}
        same_chat = True
        for _ in range(args.repeats):
            for name, (command, stdin) in (("plain_short", chat_plain(2)), ("tool_short", chat_tool(2)),
                                           ("plain_long", chat_plain(len(turns))),
                                           ("tool_long", chat_tool(len(turns)))):
                wall, arrivals, lines = timed_lines(command, stdin)
                chat[name].append(wall)
                if name == "tool_long":
                    latency["tool"].append([b - a for a, b in zip(arrivals, arrivals[1:])])
                    tool_texts = [line["text"] for line in lines]
                if name == "plain_long":
                    latency["plain"].append([line["seconds"] for line in lines[1:]])
                    plain_texts = [line["text"] for line in lines]
            same_chat = same_chat and tool_texts == plain_texts
        med = {name: statistics.median(values) for name, values in chat.items()}
        extra_turns = len(turns) - 2
        marginal_tool, marginal_plain = med["tool_long"] - med["tool_short"], med["plain_long"] - med["plain_short"]
        print(f"chat: two images, {args.max_new_tokens} new tokens a turn, median of {args.repeats}")
        print(f"  2 turns: plain {med['plain_short']:.2f} s, llava chat {med['tool_short']:.2f} s; "
              f"{len(turns)} turns: plain {med['plain_long']:.2f} s, llava chat {med['tool_long']:.2f} s")
        print(f"  marginal cost of {extra_turns} more turns: plain {marginal_plain:.2f} s, llava chat "
              f"{marginal_tool:.2f} s, ratio {marginal_tool / marginal_plain:.3f}; same answers: {same_chat}")
        for name in ("plain", "tool"):
            per_turn = [statistics.median(values) for values in zip(*latency[name])]
            print(f"  turn latency, turns 2..{len(turns)} ({name}): " + " ".join(f"{value:.3f}" for value in per_turn))


if __name__ == "__main__":
    main()
