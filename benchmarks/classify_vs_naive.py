"""Time `llava classify`'s scoring against the naive way (one full forward with the image per label).

Both run in this process on the same checkpoint, images and labels, interleaved, after a warm-up; the figure
is the median over repetitions. Usage:

    python benchmarks/classify_vs_naive.py [-m CHECKPOINT] [--labels 8] [--repeats 5]

Without -m it builds the tiny LLaVA-NeXT checkpoint (configs/tiny-llava-next.yaml) in a temporary directory.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

from common import REPO, open_quietly, tiny_model
IMAGES = [REPO / "examples" / name for name in ("chelsea.png", "rocket.jpg", "coffee.png")]
LABEL_POOL = ["a cat", "a dog", "a rocket", "a cup of coffee", "a page of text", "a motorcycle", "an astronaut",
              "a horse", "a camera", "a bird", "a car", "a tree", "a house", "a boat", "a flower", "a person"]


def naive_scores(checkpoint, image, prompt, labels):
    import torch

    processor, model = checkpoint.processor, checkpoint.model
    length = processor(images=image, text=prompt, return_tensors="pt").input_ids.shape[1]
    scores = []
    for label in labels:
        inputs = processor(images=image, text=f"{prompt} {label}", return_tensors="pt")
        with torch.inference_mode():
            log_probs = model(**inputs).logits[0].float().log_softmax(-1)
        ids = inputs.input_ids[0]
        scores.append(sum(log_probs[j - 1, ids[j]].item() for j in range(length, len(ids))))
    return scores


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-m", "--model")
    parser.add_argument("--labels", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as workdir:
        model = tiny_model(workdir, args.model)
        import torch

        from llavanext_cli.io.images import load_image
        from llavanext_cli.model.prompts import single_image_conversation
        from llavanext_cli.engine.scoring import score_labels

        checkpoint = open_quietly(model)
        labels = LABEL_POOL[:args.labels]
        question = "What is shown in this image? Answer with one of: " + ", ".join(labels) + "."
        prompt = checkpoint.prompt.format.render(single_image_conversation(question))
        images = [load_image(path) for path in IMAGES]

        def tool():
            for image in images:
                score_labels(checkpoint, [image], question, labels)

        def naive():
            for image in images:
                naive_scores(checkpoint, image, prompt, labels)

        tool(), naive()  # warm-up
        timings = {"tool": [], "naive": []}
        for _ in range(args.repeats):
            for name, run in (("tool", tool), ("naive", naive)):
                start = time.perf_counter()
                run()
                timings[name].append(time.perf_counter() - start)
        tool_s, naive_s = statistics.median(timings["tool"]), statistics.median(timings["naive"])
        print(f"checkpoint: {model}  images: {len(images)}  labels: {len(labels)}  threads: {torch.get_num_threads()}")
        print(f"tool  (prompt once, KV cache shared by the labels): {tool_s:.3f} s  ({tool_s / len(images):.3f} s/image)")
        print(f"naive (one full forward with the image per label):  {naive_s:.3f} s  ({naive_s / len(images):.3f} s/image)")
        print(f"ratio tool / naive: {tool_s / naive_s:.3f}  (speed-up {naive_s / tool_s:.1f}x)")


if __name__ == "__main__":
    main()
