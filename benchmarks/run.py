"""One entry point for the performance figures in docs/benchmarks.md.

    python benchmarks/run.py [--images 68] [--repeats 3] [--batch-size 4] [--max-new-tokens 12]

In one process tree, interleaved run by run, on the same images and checkpoint (the tiny LLaVA-NeXT one, built
here from configs/tiny-llava-next.yaml, 336 px tiles, about 2,000 image tokens an image):
  1. the seeds' loop (benchmarks/seeds_loop.py) against `llava caption DIR` (whole processes);
  2. `llava --help` against `python -c "import torch, transformers"`;
  3. classify against the naive per-label way (benchmarks/classify_vs_naive.py).
Each whole-process figure is the median over the repeats: images/s, generated tokens/s, time to the first
result, peak RSS, and the ratios.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from common import HERE, make_images, tiny_model
PROMPT = "What is shown in this image?"


def measure(command: list[str]) -> dict:
    out = subprocess.run([sys.executable, str(HERE / "measure.py"), "--", *command], capture_output=True, text=True,
                         check=True)
    result = json.loads(out.stdout)
    if result["exit"] != 0:
        raise SystemExit(f"benchmark command failed: {' '.join(command)}")
    return result


def median(runs: list[dict], key: str) -> float:
    return statistics.median(run[key] for run in runs)


def main() -> None:
    parser = argparse.ArgumentParser(description="Performance figures for docs/benchmarks.md")
    parser.add_argument("--images", type=int, default=68)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--max-new-tokens", type=int, default=12)
    parser.add_argument("-m", "--model")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="llava-bench-") as workdir:
        work = Path(workdir)
        model = tiny_model(work, args.model)
        images = work / "images"
        images.mkdir()
        make_images(images, args.images)
        from transformers import AutoProcessor

        rendered = AutoProcessor.from_pretrained(model).apply_chat_template(
            [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": PROMPT}]}],
            add_generation_prompt=True, tokenize=False)

        seeds = [sys.executable, str(HERE / "seeds_loop.py"), model, str(images), rendered, str(args.max_new_tokens)]
        tool = [sys.executable, "-m", "llavanext_cli", "caption", str(images), "-m", model, "--prompt", PROMPT,
                "--max-new-tokens", str(args.max_new_tokens), "--batch-size", str(args.batch_size),
                "--format", "jsonl"]
        tool_single = tool[:tool.index("--batch-size")] + ["--batch-size", "1", "--format", "jsonl"]
        tool_one_worker = tool_single + ["--workers", "1"]
        help_cmd = [sys.executable, "-m", "llavanext_cli", "--help"]
        imports = [sys.executable, "-c", "import torch, transformers"]

        runs: dict[str, list[dict]] = {"seeds": [], "tool": [], "tool_b1": [], "tool_w1": [], "help": [],
                                       "imports": []}
        for _ in range(args.repeats):
            runs["seeds"].append(measure(seeds))
            runs["tool"].append(measure(tool))
            runs["tool_b1"].append(measure(tool_single))
            runs["tool_w1"].append(measure(tool_one_worker))
            runs["help"].append(measure(help_cmd))
            runs["imports"].append(measure(imports))

        print(f"{args.images} images, {args.max_new_tokens} new tokens, checkpoint {model}, median of {args.repeats}")
        print(f"{'':28s} {'wall s':>8s} {'img/s':>7s} {'tok/s':>7s} {'first s':>8s} {'peak RSS MiB':>13s}")
        for name, label in (("seeds", "seeds' loop"), ("tool_b1", "llava caption (defaults)"),
                            ("tool_w1", "llava caption --workers 1"),
                            ("tool", f"llava caption --batch-size {args.batch_size}")):
            wall = median(runs[name], "wall")
            print(f"{label:28s} {wall:8.2f} {args.images / wall:7.2f} {median(runs[name], 'tokens') / wall:7.1f} "
                  f"{median(runs[name], 'first'):8.2f} {median(runs[name], 'peak_rss_kib') / 1024:13.0f}")
        seeds_wall = median(runs["seeds"], "wall")
        print(f"ratio llava caption / seeds' loop: defaults {median(runs['tool_b1'], 'wall') / seeds_wall:.3f}, "
              f"--workers 1 {median(runs['tool_w1'], 'wall') / seeds_wall:.3f}, "
              f"batch {args.batch_size} {median(runs['tool'], 'wall') / seeds_wall:.3f}")
        ratios = [b["wall"] / s["wall"] for s, b in zip(runs["seeds"], runs["tool_b1"])]
        print("per-repeat ratios (defaults / the seeds' loop run just before): "
              + ", ".join(f"{r:.3f}" for r in ratios))
        help_wall, import_wall = median(runs["help"], "wall"), median(runs["imports"], "wall")
        print(f"llava --help {help_wall:.3f} s; import torch, transformers {import_wall:.3f} s; "
              f"ratio {help_wall / import_wall:.3f}")
    subprocess.run([sys.executable, str(HERE / "classify_vs_naive.py"), "--repeats", str(args.repeats)], check=True)


if __name__ == "__main__":
    main()
