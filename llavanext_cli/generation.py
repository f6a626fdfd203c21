"""Generating answers for prompts with images: batched with left padding, greedy unless told otherwise, and on an
accelerator that runs out of memory, the batch halved and retried (never an item dropped)."""

from __future__ import annotations

import functools
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from PIL import Image

from llavanext_cli.cache_api import with_cache
from llavanext_cli.checkpoint import Checkpoint
from llavanext_cli.preprocessing import prepare_inputs


@dataclass(frozen=True)
class GenerationOptions:
    max_new_tokens: int = 256
    temperature: float = 0.0
    top_p: float = 1.0
    num_beams: int = 1
    seed: int | None = None

    @classmethod
    def from_settings(cls, settings: Any) -> GenerationOptions:
        return cls(max_new_tokens=settings.max_new_tokens, temperature=settings.temperature, top_p=settings.top_p,
                   num_beams=settings.num_beams, seed=settings.seed)

    def generate_kwargs(self) -> dict[str, Any]:
        kwargs: dict[str, Any] = {"max_new_tokens": self.max_new_tokens, "num_beams": self.num_beams}
        if self.temperature > 0:
            kwargs.update(do_sample=True, temperature=self.temperature, top_p=self.top_p)
        else:
            # Greedy: also clear any sampling defaults the checkpoint's generation_config carries.
            kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)
        return kwargs


@dataclass(frozen=True)
class Generation:
    text: str
    new_tokens: int
    seconds: float
    data: Any = None           # with a schema: the answer parsed (valid against it)
    error: str | None = None   # with a schema: why this row has no valid answer (cut short)


def is_out_of_memory(error: BaseException) -> bool:
    """An accelerator (or the CPU allocator) ran out of memory: accelerate's test, which knows every backend's
    message."""
    from accelerate.utils.memory import should_reduce_batch_size

    return isinstance(error, Exception) and should_reduce_batch_size(error)


def generate(
    checkpoint: Checkpoint,
    prompts: Sequence[str],
    images: Sequence[Sequence[Image.Image]],
    options: GenerationOptions,
    on_text: Callable[[str], None] | None = None,
    inputs: Any = None,
    cancelled: threading.Event | None = None,
    constraint: Any = None,
) -> list[Generation]:
    """One answer per rendered prompt; `images[i]` are the images of prompt i, in the order of its <image> tags.
    With `on_text` (one prompt only), the answer's text is passed on piece by piece as it is generated.
    `inputs` may carry the batch already prepared by `prepare_inputs`. Once `cancelled` is set, generation stops
    after the current step (the run is being abandoned: what comes back is cut short and must be discarded).
    With `constraint` (structured.Constraint), each answer is JSON valid against its schema, or an error."""
    try:
        return _generate_batch(checkpoint, prompts, images, options, on_text, inputs, cancelled, constraint)
    except Exception as error:
        if not is_out_of_memory(error) or len(prompts) == 1:
            raise
    # Out of memory: free what the device holds in its cache (CUDA, MPS, ...) and do the same items in two halves.
    from accelerate.utils.memory import clear_device_cache

    clear_device_cache()
    half = len(prompts) // 2
    return (generate(checkpoint, prompts[:half], images[:half], options, cancelled=cancelled, constraint=constraint)
            + generate(checkpoint, prompts[half:], images[half:], options, cancelled=cancelled, constraint=constraint))


def _generate_batch(checkpoint: Checkpoint, prompts: Sequence[str], images: Sequence[Sequence[Image.Image]],
                    options: GenerationOptions, on_text: Callable[[str], None] | None, inputs: Any,
                    cancelled: threading.Event | None, constraint: Any) -> list[Generation]:
    start = time.perf_counter()
    if inputs is None:
        inputs = prepare_inputs(checkpoint, prompts, images)
    results, _ = generate_from_inputs(checkpoint, inputs, options, on_text=on_text, cancelled=cancelled, start=start,
                                      constraint=constraint)
    return results


def generate_from_inputs(checkpoint: Checkpoint, inputs: Any, options: GenerationOptions,
                         on_text: Callable[[str], None] | None = None, cancelled: threading.Event | None = None,
                         past_key_values: Any = None, start: float | None = None,
                         extra_seconds: float = 0.0, constraint: Any = None) -> tuple[list[Generation], Any]:
    """`model.generate` over prepared tensors (input_ids, attention_mask and the image tensors of the images whose
    tokens are not in `past_key_values`), continuing from `past_key_values` when given: one Generation per row,
    and the output sequences (the prompt's ids followed by the new ones). `extra_seconds` is added to each row's
    time (its share of work done once for several rows, such as a shared prefix). With `constraint`, decoding
    follows its schema, one matcher per row."""
    import torch

    if options.seed is not None:
        torch.manual_seed(options.seed)
    start = time.perf_counter() if start is None else start
    inputs = on_model(checkpoint, inputs)
    tokenizer = checkpoint.processor.tokenizer
    rows = inputs["input_ids"].shape[0]
    streamer = _CallbackStreamer(tokenizer, on_text) if on_text is not None and rows == 1 else None
    extra = {"stopping_criteria": _stop_when_set(cancelled)} if cancelled is not None else {}
    if past_key_values is not None:
        extra.update(with_cache(checkpoint.model, past_key_values))
    stop_ids = _stop_token_ids(checkpoint)
    matchers = constraint.logits_processor(rows) if constraint is not None else None
    if matchers is not None:
        from transformers import LogitsProcessorList

        extra["logits_processor"] = LogitsProcessorList([matchers])
        # The grammar ends on the config's and the tokenizer's end-of-sequence ids (known before the weights load);
        # generate must end there too, or a row would go on unconstrained after its JSON.
        stop_ids = stop_ids | set(constraint.stop_ids)
        extra["eos_token_id"] = sorted(stop_ids)
    with torch.inference_mode():
        output = checkpoint.model.generate(**inputs, pad_token_id=tokenizer.pad_token_id, streamer=streamer,
                                           **extra, **options.generate_kwargs())
    seconds = (time.perf_counter() - start) / max(rows, 1) + extra_seconds
    prompt_length = inputs["input_ids"].shape[1]
    counts, texts = [], []
    for row in output:
        new = row[prompt_length:]
        count = 0
        for token in new.tolist():  # rows that stopped early are padded after their end-of-sequence token
            count += 1
            if token in stop_ids:
                break
        counts.append(count)
        texts.append(tokenizer.decode(new, skip_special_tokens=True).strip())
    outcomes = (constraint.outcomes(matchers, output[:, prompt_length:], texts) if matchers is not None
                else [None] * len(texts))
    results = [Generation(text=text, new_tokens=count, seconds=round(seconds, 4),
                          data=outcome.data if outcome else None, error=outcome.error if outcome else None)
               for text, count, outcome in zip(texts, counts, outcomes)]
    return results, output


def on_model(checkpoint: Checkpoint, tensors: dict[str, Any]) -> dict[str, Any]:
    """Processor tensors moved to the model's device, the image pixels in the model's dtype."""
    moved = {key: value.to(checkpoint.device) for key, value in tensors.items()}
    if "pixel_values" in moved and moved["pixel_values"].is_floating_point():
        moved["pixel_values"] = moved["pixel_values"].to(checkpoint.model.dtype)
    return moved


def _stop_token_ids(checkpoint: Checkpoint) -> set[int]:
    eos = checkpoint.model.generation_config.eos_token_id
    if eos is None:
        eos = checkpoint.processor.tokenizer.eos_token_id
    return set(eos) if isinstance(eos, (list, tuple)) else {eos}


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
