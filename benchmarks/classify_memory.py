"""classify's peak memory against the number of labels, and ask's against the number of questions about one image
(issue #21): the prompt's key/value cache is held once and each label (question) continues from it, cut back after
each, so the peak should not grow with the labels (questions).

    python benchmarks/classify_memory.py [--labels 2 16 64] [--repeats 2]

A mid-size random checkpoint built here with `llava init-model` (8 text layers of 1024, 8 KV heads of 128: 64 KiB
of KV cache a token in float32, about 100 MiB for one image's ~1,500-token prompt), one image, one `llava classify`
process per label count; the figure is the process's peak resident memory (ru_maxrss), median of the repeats.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

from common import REPO

SPEC_CHANGES = {"text": {"hidden_size": 1024, "intermediate_size": 2048, "num_hidden_layers": 8,
                         "num_attention_heads": 8, "num_key_value_heads": 8, "head_dim": 128}}


def build(workdir: Path) -> Path:
    spec = yaml.safe_load((REPO / "configs" / "tiny-llava-next.yaml").read_text())
    spec["text"].update(SPEC_CHANGES["text"])
    path = workdir / "mid.yaml"
    path.write_text(yaml.safe_dump(spec))
    model = workdir / "mid"
    subprocess.run([sys.executable, "-m", "llavanext_cli", "init-model", str(path), str(model)], check=True,
                   capture_output=True)
    return model


def peak_of_one_run(model: Path, labels: int, questions: bool = False) -> tuple[int, float]:
    names = ",".join(f"label number {index}" for index in range(labels))
    work = (["ask", *[argument for index in range(labels) for argument in ("-q", f"Question {index}?")],
             "--max-new-tokens", "8"] if questions else ["classify", "--labels", names])
    code = ("import resource, subprocess, sys, time\n"
            "start = time.perf_counter()\n"
            "p = subprocess.run(sys.argv[1:], capture_output=True, text=True)\n"
            "assert p.returncode == 0, p.stderr\n"
            "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, time.perf_counter() - start)\n")
    result = subprocess.run([sys.executable, "-c", code, sys.executable, "-m", "llavanext_cli", work[0],
                             str(REPO / "examples" / "chelsea.png"), *work[1:], "-m", str(model), "--format", "jsonl"],
                            capture_output=True, text=True, check=True)
    peak, seconds = result.stdout.split()
    return int(peak) * 1024, float(seconds)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--labels", type=int, nargs="+", default=[2, 16, 64])
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="llava-bench-") as workdir:
        model = build(Path(workdir))
        config = json.loads((model / "config.json").read_text())["text_config"]
        per_token = 2 * config["num_hidden_layers"] * config["num_key_value_heads"] * config["head_dim"] * 4
        print(f"KV cache: {per_token // 1024} KiB a token (float32)")
        for questions in (False, True):
            for count in args.labels:
                runs = [peak_of_one_run(model, count, questions) for _ in range(args.repeats)]
                peak = statistics.median(run[0] for run in runs)
                seconds = statistics.median(run[1] for run in runs)
                what = "questions (ask -q, 8 tokens each)" if questions else "labels (classify)"
                print(f"{count:3d} {what}: peak {peak / 2**20:,.0f} MiB, {seconds:.1f} s a run")


if __name__ == "__main__":
    main()
