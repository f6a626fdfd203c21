"""`llava serve`: the figures for docs/benchmarks.md.

    python benchmarks/serve.py [--requests 32] [--repeats 5] [--max-new-tokens 16] [-m CHECKPOINT]

On the tiny LLaVA-NeXT checkpoint (built here) and images cut from the repository's (benchmarks/run.py's mix):
  1. one-image `llava caption IMG --server URL` as a whole process against a cold `llava caption IMG`, interleaved
     run by run (the records are checked to be the same);
  2. requests a second at concurrency 1, 4 and 16 (--requests chat completions, each a different image or
     question, sent by that many threads), with each request's latency (p50, p99); the answers are checked to be
     the ones the requests get one at a time;
  3. a conversation's time to first token (streaming): the first turn (image and question) against the follow-up
     turns, which continue from the cached prefix of the turn before.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from common import make_images, tiny_model

QUESTIONS = ["What is shown in this image?", "Describe the scene.", "What colours are there?", "Is it indoors?"]
FOLLOW_UPS = ["And what is in the background?", "Which colours stand out?", "Is anything moving?",
              "Where could this be?", "Summarise it in a word."]
LLAVA = [sys.executable, "-m", "llavanext_cli"]


class Server:
    def __init__(self, model: str, max_new_tokens: int):
        self.process = subprocess.Popen([*LLAVA, "serve", "-m", model, "--port", "0", "--max-queue", "256",
                                         "--max-new-tokens", str(max_new_tokens)],
                                        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        line = self.process.stderr.readline()
        match = re.search(r"on (http://[\d.]+:\d+)", line)
        if not match:
            raise SystemExit(f"llava serve did not start: {line}{self.process.stderr.read()}")
        self.url = match.group(1)
        self.model = model

    def post(self, body: dict) -> dict:
        request = urllib.request.Request(self.url + "/v1/chat/completions", data=json.dumps(body).encode(),
                                         headers={"content-type": "application/json"})
        with urllib.request.urlopen(request, timeout=600) as response:
            return json.loads(response.read())

    def first_token(self, body: dict) -> tuple[float, str]:
        """Seconds to the first content chunk of a streamed completion, and the whole answer."""
        request = urllib.request.Request(self.url + "/v1/chat/completions",
                                         data=json.dumps({**body, "stream": True}).encode(),
                                         headers={"content-type": "application/json"})
        start, first, text = time.perf_counter(), None, ""
        with urllib.request.urlopen(request, timeout=600) as response:
            for line in response:
                line = line.decode().strip()
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                for choice in json.loads(line[6:])["choices"]:
                    piece = choice["delta"].get("content")
                    if piece:
                        first = first if first is not None else time.perf_counter() - start
                        text += piece
        return first, text

    def stop(self) -> None:
        self.process.send_signal(signal.SIGTERM)
        if self.process.wait(timeout=120) != 0:
            raise SystemExit("llava serve did not exit 0 on SIGTERM")


def data_uri(path: Path) -> str:
    kind = "jpeg" if path.suffix == ".jpg" else "png"
    return f"data:image/{kind};base64," + base64.b64encode(path.read_bytes()).decode()


def user_turn(text: str, image: Path | None = None) -> dict:
    content = [{"type": "text", "text": text}]
    if image is not None:
        content.append({"type": "image_url", "image_url": {"url": data_uri(image)}})
    return {"role": "user", "content": content}


def whole_process(command: list[str]) -> tuple[float, str]:
    start = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "LLAVA_SERVER": ""})
    if done.returncode != 0:
        raise SystemExit(f"benchmark command failed: {' '.join(command)}\n{done.stderr}")
    return time.perf_counter() - start, done.stdout


def percentile(values: list[float], share: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(share * (len(ordered) - 1)))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--turns", type=int, default=5)
    parser.add_argument("--max-new-tokens", type=int, default=16)
    parser.add_argument("-m", "--model")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as workdir:
        model = tiny_model(workdir, args.model)
        images = Path(workdir) / "images"
        images.mkdir()
        make_images(images, 12)
        pictures = sorted(images.iterdir())
        server = Server(model, args.max_new_tokens)
        try:
            # 1. One image, as a whole process.
            image = str(pictures[0])
            tokens = ["--max-new-tokens", str(args.max_new_tokens), "--format", "jsonl"]
            cold, warm = [], []
            for _ in range(args.repeats):
                cold_time, cold_out = whole_process([*LLAVA, "caption", image, "-m", model, *tokens])
                warm_time, warm_out = whole_process([*LLAVA, "caption", image, "--server", server.url, *tokens])
                if json.loads(cold_out)["text"] != json.loads(warm_out)["text"]:
                    raise SystemExit(f"--server answered otherwise:\n{cold_out}\n{warm_out}")
                cold.append(cold_time)
                warm.append(warm_time)
            print(f"caption, one image, whole process: cold {statistics.median(cold):.2f} s, "
                  f"--server {statistics.median(warm):.2f} s (ratio {statistics.median(warm) / statistics.median(cold):.3f})"
                  f"  [cold {', '.join(f'{t:.2f}' for t in cold)}; --server {', '.join(f'{t:.2f}' for t in warm)}]")

            # 2. Requests a second at concurrency 1, 4, 16.
            bodies = [{"model": model, "max_tokens": args.max_new_tokens, "messages": [
                user_turn(QUESTIONS[(index // len(pictures)) % len(QUESTIONS)], pictures[index % len(pictures)])]}
                for index in range(args.requests)]
            alone: list[str] | None = None
            for concurrency in (1, 4, 16):
                latencies: list[float] = []

                def one(body: dict) -> str:
                    start = time.perf_counter()
                    answer = server.post(body)["choices"][0]["message"]["content"]
                    latencies.append(time.perf_counter() - start)
                    return answer

                start = time.perf_counter()
                with ThreadPoolExecutor(concurrency) as pool:
                    answers = list(pool.map(one, bodies))
                elapsed = time.perf_counter() - start
                alone = alone or answers
                if answers != alone:
                    raise SystemExit(f"at concurrency {concurrency} the answers differ from one at a time")
                print(f"concurrency {concurrency:2d}: {len(bodies) / elapsed:.2f} requests/s, "
                      f"latency p50 {percentile(latencies, 0.5):.2f} s, p99 {percentile(latencies, 0.99):.2f} s")

            # 3. A conversation: time to first token, first turn against the follow-ups.
            for repeat in range(args.repeats):
                messages = [user_turn(QUESTIONS[0], pictures[repeat % len(pictures)])]
                firsts = []
                for turn in range(args.turns):
                    first, text = server.first_token({"model": model, "max_tokens": args.max_new_tokens,
                                                      "messages": messages})
                    firsts.append(first)
                    messages += [{"role": "assistant", "content": text},
                                 user_turn(FOLLOW_UPS[turn % len(FOLLOW_UPS)])]
                print(f"conversation {repeat + 1}: first token, turn 1 {firsts[0] * 1000:.0f} ms; follow-ups "
                      + ", ".join(f"{value * 1000:.0f}" for value in firsts[1:]) + " ms")
        finally:
            server.stop()


if __name__ == "__main__":
    main()
