"""Generating answers for prompts with images: batched with left padding, as the execution plan says (greedy unless
told otherwise), and out of memory the batch halved and retried, down to one prompt: one that does not fit even
alone is an error for that prompt, never an item dropped nor a traceback."""

from __future__ import annotations

import contextlib
import functools
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from PIL import Image

from llavanext_cli.model.cache_api import with_cache
from llavanext_cli.model.checkpoint import Checkpoint
from llavanext_cli.engine.plan import ExecutionPlan
from llavanext_cli.model.preprocessing import prepare_inputs


@dataclass(frozen=True)
class Generation:
    text: str
    new_tokens: int
    seconds: float
    data: Any = None           # with a schema: the answer parsed (valid against it)
    error: str | None = None   # why this row has no answer (cut short before its JSON closed, out of memory)
    prompt_tokens: int = 0     # tokens run through the model for this row's prompt (its share of a shared prefix)


OUT_OF_MEMORY = ("out of memory, even alone in its batch; try a lower --max-new-tokens, --quant 4bit, "
                 "--dtype bfloat16, or --device auto to spread the model over more memory")
# What the allocators say when they run out (CUDA, HIP, XPU; Apple's MPS; the CPU; Habana), wherever they say it.
_OUT_OF_MEMORY_MESSAGES = (" out of memory", "MPS backend out of memory", "can't allocate memory",
                           "not enough memory", "PT_DEVMEM Allocation failed", "CUDNN_STATUS_NOT_SUPPORTED")


def is_out_of_memory(error: BaseException) -> bool:
    """An accelerator (or the CPU allocator) ran out of memory: torch's OutOfMemoryError, Python's MemoryError, or
    a RuntimeError in the words of any backend's allocator (MPS's included)."""
    if isinstance(error, MemoryError):
        return True
    out_of_memory_class = _torch_out_of_memory_class()
    if out_of_memory_class is not None and isinstance(error, out_of_memory_class):
        return True
    return isinstance(error, RuntimeError) and any(words in str(error) for words in _OUT_OF_MEMORY_MESSAGES)


@functools.cache
def _torch_out_of_memory_class() -> type | None:
    import torch

    return getattr(torch, "OutOfMemoryError", None)


def release_memory() -> None:
    """After an out-of-memory error: what the failed step left is collected, then the device's cache emptied (CUDA,
    MPS, ...), so that a retry with less finds the memory free."""
    import gc

    from accelerate.utils.memory import clear_device_cache

    gc.collect()
    clear_device_cache()


def generate(
    checkpoint: Checkpoint,
    prompts: Sequence[str],
    images: Sequence[Sequence[Image.Image]],
    plan: ExecutionPlan,
    on_text: Callable[[str], None] | None = None,
    inputs: Any = None,
    cancelled: threading.Event | None = None,
    constraint: Any = None,
    seed: int | None = None,
) -> list[Generation]:
    """One answer per rendered prompt; `images[i]` are the images of prompt i, in the order of its <image> tags.
    With `on_text` (one prompt only), the answer's text is passed on piece by piece as it is generated.
    `inputs` may carry the batch already prepared by `prepare_inputs`. Once `cancelled` is set, generation stops
    after the current step (the run is being abandoned: what comes back is cut short and must be discarded).
    With `constraint` (structured.Constraint), each answer is JSON valid against its schema, or an error. `seed`:
    the random stream the batch draws from (sampling with --seed). Out of memory, the batch is halved and retried
    down to one prompt; a prompt that does not fit alone is an error row (OUT_OF_MEMORY), never a traceback."""
    try:
        return _generate_batch(checkpoint, prompts, images, plan, on_text, inputs, cancelled, constraint, seed)
    except Exception as error:
        if not is_out_of_memory(error):
            raise
    release_memory()
    if len(prompts) == 1:
        return [Generation(text="", new_tokens=0, seconds=0.0, error=OUT_OF_MEMORY)]
    half = len(prompts) // 2
    return (generate(checkpoint, prompts[:half], images[:half], plan, cancelled=cancelled, constraint=constraint,
                     seed=seed)
            + generate(checkpoint, prompts[half:], images[half:], plan, cancelled=cancelled, constraint=constraint,
                       seed=seed))


def _generate_batch(checkpoint: Checkpoint, prompts: Sequence[str], images: Sequence[Sequence[Image.Image]],
                    plan: ExecutionPlan, on_text: Callable[[str], None] | None, inputs: Any,
                    cancelled: threading.Event | None, constraint: Any, seed: int | None) -> list[Generation]:
    start = time.perf_counter()
    if inputs is None:  # a halved batch is prepared again, half at a time
        inputs = prepare_inputs(checkpoint.processor, prompts, images)
    results, _ = generate_from_inputs(checkpoint, inputs, plan, on_text=on_text, cancelled=cancelled, start=start,
                                      constraint=constraint, seed=seed)
    return results


def generate_from_inputs(checkpoint: Checkpoint, inputs: Any, plan: ExecutionPlan,
                         on_text: Callable[[str], None] | None = None, cancelled: threading.Event | None = None,
                         cache: Any = None, start: float | None = None, extra_seconds: float = 0.0,
                         constraint: Any = None, seed: int | None = None,
                         prompt_tokens: int | None = None) -> tuple[list[Generation], Any]:
    """`model.generate` over prepared tensors (input_ids, attention_mask and the image tensors of the images whose
    tokens are not in `cache`), continuing from `cache` when given: one Generation per row, and the output sequences
    (the prompt's ids followed by the new ones). `extra_seconds` is added to each row's time (its share of work done
    once for several rows, such as a shared prefix); `prompt_tokens`, each row's prompt tokens run here (default: the
    rows' attended input tokens). With `constraint`, decoding follows its schema, one matcher per row."""
    import torch

    from llavanext_cli.model.loading import eager_forward

    start = time.perf_counter() if start is None else start
    inputs = on_model(checkpoint, inputs)
    tokenizer = checkpoint.processor.tokenizer
    rows = inputs["input_ids"].shape[0]
    streamer = _CallbackStreamer(tokenizer, on_text) if on_text is not None and rows == 1 else None
    kwargs = plan.generate_kwargs(reuses_cache=cache is not None)
    if cancelled is not None:
        kwargs["stopping_criteria"] = _stop_when_set(cancelled)
    if cache is not None:
        kwargs.update(with_cache(checkpoint.model, cache))
    stop_ids = set(plan.stop_ids)
    matchers = constraint.logits_processor(rows) if constraint is not None else None
    if matchers is not None:
        from transformers import LogitsProcessorList

        kwargs["logits_processor"] = LogitsProcessorList([matchers])
        # The grammar ends on the config's and the tokenizer's end-of-sequence ids (known before the weights load);
        # generate must end there too, or a row would go on unconstrained after its JSON.
        stop_ids |= set(constraint.stop_ids)
        kwargs["eos_token_id"] = sorted(stop_ids)
    if seed is not None:
        torch.manual_seed(seed)
    reusing = eager_forward(checkpoint.model) if cache is not None else contextlib.nullcontext()
    with torch.inference_mode(), reusing:
        output = checkpoint.model.generate(**inputs, streamer=streamer, **kwargs)
    seconds = (time.perf_counter() - start) / max(rows, 1) + extra_seconds
    prompt_length = inputs["input_ids"].shape[1]
    attended = inputs["attention_mask"].sum(-1).tolist() if prompt_tokens is None else [prompt_tokens] * rows
    counts, texts = [], []
    for row in output:
        new = row[prompt_length:]
        count = 0
        for token in new.tolist():  # rows that stopped early are padded after their end-of-sequence token
            count += 1
            if token in stop_ids:
                break
        counts.append(count)
        texts.append(plan.trimmed(tokenizer.decode(new, skip_special_tokens=True).strip()))
    outcomes = (constraint.outcomes(matchers, output[:, prompt_length:], texts) if matchers is not None
                else [None] * len(texts))
    results = [Generation(text=text, new_tokens=count, seconds=round(seconds, 4),
                          data=outcome.data if outcome else None, error=outcome.error if outcome else None,
                          prompt_tokens=int(tokens))
               for text, count, outcome, tokens in zip(texts, counts, outcomes, attended)]
    return results, output


def on_model(checkpoint: Checkpoint, tensors: dict[str, Any]) -> dict[str, Any]:
    """Processor tensors moved to the model's device, the image pixels in the model's dtype."""
    moved = {key: value.to(checkpoint.device) for key, value in tensors.items()}
    if "pixel_values" in moved and moved["pixel_values"].is_floating_point():
        moved["pixel_values"] = moved["pixel_values"].to(checkpoint.model.dtype)
    return moved


def _stop_when_set(event: threading.Event) -> Any:
    """Transformers stopping criteria that end generation for every row once `event` is set."""
    from transformers import StoppingCriteriaList

    return StoppingCriteriaList([_stop_when_set_class()(event)])


@functools.cache
def _stop_when_set_class() -> type:
    """The StoppingCriteria class, defined once (transformers is imported lazily, so not at module level)."""
    import torch
    from transformers import StoppingCriteria

    class StopWhenSet(StoppingCriteria):
        def __init__(self, event: threading.Event) -> None:
            self.event = event

        def __call__(self, input_ids: Any, scores: Any, **kwargs: Any) -> Any:
            return torch.full((input_ids.shape[0],), self.event.is_set(), dtype=torch.bool, device=input_ids.device)

    return StopWhenSet


def _CallbackStreamer(tokenizer: Any, on_text: Callable[[str], None]) -> Any:
    """A transformers TextStreamer that hands decoded text to a callback instead of printing it."""
    from transformers import TextStreamer

    class CallbackStreamer(TextStreamer):
        def on_finalized_text(self, text: str, stream_end: bool = False) -> None:
            if text:
                on_text(text)

    return CallbackStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
