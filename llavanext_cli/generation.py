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

from llavanext_cli.session import Checkpoint


@dataclass(frozen=True)
class GenerationOptions:
    max_new_tokens: int = 256
    temperature: float = 0.0
    top_p: float = 1.0
    num_beams: int = 1
    seed: int | None = None

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


def prepare_inputs(checkpoint: Checkpoint, prompts: Sequence[str], images: Sequence[Sequence[Image.Image]]) -> Any:
    """The processor's tensors for a batch (CPU work: resizing, tiling, normalising, tokenizing); safe to run in
    a background thread while the model works on the previous batch."""
    flat_images = [image for group in images for image in group]
    skips = identity_image_steps(checkpoint.processor.image_processor) if flat_images else {}
    return checkpoint.processor(images=flat_images or None, text=list(prompts), padding=True, return_tensors="pt",
                                **skips)


def identity_image_steps(image_processor: Any) -> dict[str, bool]:
    """The image processor's steps that provably change nothing, to be skipped.

    LLaVA-NeXT's PIL image processor cuts an image into square tiles of the crop size (and scales the whole
    image to that square), then, tile by tile, resizes each to `size` and centre-crops it to `crop_size`. Where
    `size` and `crop_size` both are that same square, those two steps return their input unchanged, but each
    still converts the tile from numpy to a PIL image and back: about a third of the preprocessing time, held
    under Python's global lock. The tensors are bit for bit the same either way (tested against the processor's
    own output); any other processor or geometry keeps every step."""
    if type(image_processor).__name__ != "LlavaNextImageProcessorPil":
        return {}
    size, crop = getattr(image_processor, "size", None), getattr(image_processor, "crop_size", None)

    def square(value: Any, key_pairs: tuple[tuple[str, str], ...]) -> int | None:
        if value is None:
            return None
        get = value.get if isinstance(value, dict) else (lambda key: getattr(value, key, None))
        for first, second in key_pairs:
            a, b = get(first), get(second)
            if a and b:
                return int(a) if a == b else None
        return None

    edge = square(size, (("height", "width"), ("shortest_edge", "shortest_edge")))
    crop_edge = square(crop, (("height", "width"),))
    if edge is None or edge != crop_edge:
        return {}
    return {"do_resize": False, "do_center_crop": False}


def is_out_of_memory(error: BaseException) -> bool:
    import torch

    kinds = tuple(k for k in (getattr(torch, "OutOfMemoryError", None),
                              getattr(torch.cuda, "OutOfMemoryError", None)) if k is not None)
    return isinstance(error, kinds) or (isinstance(error, RuntimeError) and "out of memory" in str(error).lower())


def generate(
    checkpoint: Checkpoint,
    prompts: Sequence[str],
    images: Sequence[Sequence[Image.Image]],
    options: GenerationOptions,
    on_text: Callable[[str], None] | None = None,
    inputs: Any = None,
    cancelled: threading.Event | None = None,
) -> list[Generation]:
    """One answer per rendered prompt; `images[i]` are the images of prompt i, in the order of its <image> tags.
    With `on_text` (one prompt only), the answer's text is passed on piece by piece as it is generated.
    `inputs` may carry the batch already prepared by `prepare_inputs`. Once `cancelled` is set, generation stops
    after the current step (the run is being abandoned: what comes back is cut short and must be discarded)."""
    try:
        return _generate_batch(checkpoint, prompts, images, options, on_text, inputs, cancelled)
    except Exception as error:
        if not is_out_of_memory(error) or len(prompts) == 1:
            raise
    # Out of memory on the accelerator: free what we can and do the same items in two halves.
    import torch

    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    half = len(prompts) // 2
    return (generate(checkpoint, prompts[:half], images[:half], options, cancelled=cancelled)
            + generate(checkpoint, prompts[half:], images[half:], options, cancelled=cancelled))


def _generate_batch(checkpoint: Checkpoint, prompts: Sequence[str], images: Sequence[Sequence[Image.Image]],
                    options: GenerationOptions, on_text: Callable[[str], None] | None, inputs: Any,
                    cancelled: threading.Event | None) -> list[Generation]:
    import torch

    if options.seed is not None:
        torch.manual_seed(options.seed)
    start = time.perf_counter()
    if inputs is None:
        inputs = prepare_inputs(checkpoint, prompts, images)
    inputs = inputs.to(checkpoint.device)
    if "pixel_values" in inputs and inputs["pixel_values"].is_floating_point():
        inputs["pixel_values"] = inputs["pixel_values"].to(checkpoint.model.dtype)
    tokenizer = checkpoint.processor.tokenizer
    streamer = _CallbackStreamer(tokenizer, on_text) if on_text is not None and len(prompts) == 1 else None
    extra = {"stopping_criteria": _stop_when_set(cancelled)} if cancelled is not None else {}
    with torch.inference_mode():
        output = checkpoint.model.generate(**inputs, pad_token_id=tokenizer.pad_token_id, streamer=streamer,
                                           **extra, **options.generate_kwargs())
    seconds = (time.perf_counter() - start) / max(len(prompts), 1)
    prompt_length = inputs["input_ids"].shape[1]
    stop_ids = _stop_token_ids(checkpoint)
    results = []
    for row in output:
        new = row[prompt_length:]
        count = 0
        for token in new.tolist():  # rows that stopped early are padded after their end-of-sequence token
            count += 1
            if token in stop_ids:
                break
        text = tokenizer.decode(new, skip_special_tokens=True).strip()
        results.append(Generation(text=text, new_tokens=count, seconds=round(seconds, 4)))
    return results


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
