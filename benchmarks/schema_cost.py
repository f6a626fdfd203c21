"""What --schema costs: the per-token time of constrained decoding against unconstrained decoding of the same number
of tokens, the time spent inside the logits processor, and the grammar's compile time (first, and cached).

    python benchmarks/schema_cost.py [-m CHECKPOINT] [--tokens 48] [--repeats 5] [--batch 1]

One process, the tiny LLaVA-NeXT checkpoint (built here), one image and prompt, both ways through the tool's own
generate path. Each generation makes exactly --tokens tokens (the schema asks for a long string; the random model
does not stop by itself that soon), and the per-token time is (T(tokens) - T(1)) / (tokens - 1), so that the
prompt's prefill cancels out. Median of repeats, interleaved.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

from common import REPO, open_quietly, tiny_model
SCHEMA = ('{"type": "object", "properties": {"caption": {"type": "string", "minLength": 400, "maxLength": 500}, '
          '"count": {"type": "integer", "minimum": 0, "maximum": 100}}, "required": ["caption", "count"]}')


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-m", "--model")
    parser.add_argument("--tokens", type=int, default=48)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--batch", type=int, default=1)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="llava-bench-") as workdir:
        measure(tiny_model(workdir, args.model), args)


def measure(model: str, args: argparse.Namespace) -> None:
    from llavanext_cli.engine import structured
    from llavanext_cli.engine.generation import generate_from_inputs
    from llavanext_cli.engine.plan import GenerationOptions, plan_execution
    from llavanext_cli.io.images import load_image
    from llavanext_cli.model.preprocessing import prepare_inputs
    from llavanext_cli.model.prompts import single_image_conversation

    checkpoint = open_quietly(model)
    answer_schema = structured.load_schema(SCHEMA)
    start = time.perf_counter()
    constraint = answer_schema.compile(checkpoint)
    first_compile = time.perf_counter() - start
    start = time.perf_counter()
    answer_schema.compile(checkpoint)
    cached_compile = time.perf_counter() - start
    other = structured.load_schema("count int 0..9, kind: person|animal|object, outdoor bool, tags list")
    start = time.perf_counter()
    other.compile(checkpoint)
    other_compile = time.perf_counter() - start
    checkpoint.load()

    image = load_image(REPO / "examples" / "chelsea.png")
    prompt = checkpoint.prompt.format.render(single_image_conversation(answer_schema.prompt("Describe it.")))
    inputs = prepare_inputs(checkpoint.processor, [prompt] * args.batch, [[image]] * args.batch)

    inside: list[float] = []
    real_class = structured._processor_class()

    class Timed(real_class):  # type: ignore[misc,valid-type]
        def __call__(self, input_ids, scores):
            begin = time.perf_counter()
            result = super().__call__(input_ids, scores)
            inside.append(time.perf_counter() - begin)
            return result

    structured._processor_class = lambda: Timed

    def run(tokens: int, constrained: bool) -> float:
        """One generate() through the tool's own path, with or without the schema's processor (the random model
        does not stop by itself within these tokens: checked)."""
        options = plan_execution(checkpoint, GenerationOptions(max_new_tokens=tokens))
        begin = time.perf_counter()
        results, _ = generate_from_inputs(checkpoint, dict(inputs), options,
                                          constraint=constraint if constrained else None)
        elapsed = time.perf_counter() - begin
        assert all(r.new_tokens == tokens for r in results), [r.new_tokens for r in results]
        return elapsed

    run(2, True), run(2, False)  # warm-up
    per_token = {True: [], False: []}
    for _ in range(args.repeats):
        for constrained in (False, True):
            long, short = run(args.tokens, constrained), run(1, constrained)
            per_token[constrained].append((long - short) / (args.tokens - 1))
    plain, constrained = statistics.median(per_token[False]), statistics.median(per_token[True])
    steps = [value for value in inside]
    print(f"schema compile: first {first_compile * 1000:.0f} ms (with llguidance's tokenizer, once per tokenizer), "
          f"cached {cached_compile * 1e6:.0f} us, another schema {other_compile * 1000:.1f} ms")
    print(f"per token, batch {args.batch}, {args.tokens} tokens, median of {args.repeats}: unconstrained "
          f"{plain * 1000:.2f} ms, constrained {constrained * 1000:.2f} ms, ratio {constrained / plain:.3f}; inside "
          f"the logits processor {statistics.median(steps) * 1000:.3f} ms a step "
          f"({statistics.median(steps) / plain:.1%} of an unconstrained token)")


if __name__ == "__main__":
    main()
