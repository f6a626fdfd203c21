"""Turning prompts and images into the model's tensors: the processor's work (resizing, tiling, normalising,
tokenizing), the steps of it that can be skipped because they change nothing, and what can be known about an
image's cost before it is decoded (its image-token count, the largest size the processor uses)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from PIL import Image


def prepare_inputs(processor: Any, prompts: Sequence[str], images: Sequence[Sequence[Image.Image]]) -> Any:
    """The processor's tensors for a batch of rendered prompts; `images[i]` are prompt i's images in the order of
    its image tags. CPU work, to run in a background thread while the model works on another batch, with a
    processor of that thread's own (`Checkpoint.preparing_processor`)."""
    flat_images = [image for group in images for image in group]
    skips = identity_image_steps(processor.image_processor) if flat_images else {}
    return processor(images=flat_images or None, text=list(prompts), padding=True, return_tensors="pt", **skips)


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


def image_token_count(processor: Any, size: tuple[int, int] | None) -> int:
    """How many image tokens the processor inserts for an image of this (width, height); -1 when unknown (no size,
    or a processor that cannot say without the pixels: then inputs are not grouped by cost)."""
    if size is None or not hasattr(processor, "_get_num_multimodal_tokens"):
        return -1
    width, height = size
    return int(processor._get_num_multimodal_tokens(image_sizes=[(height, width)])["num_image_tokens"][0])


def largest_model_edge(image_processor: Any) -> int:
    """The longest side, in pixels, that the image processor can use from an image (its largest anyres grid)."""
    pinpoints = getattr(image_processor, "image_grid_pinpoints", None)
    if pinpoints:
        return max(max(pair) for pair in pinpoints)
    size = image_processor.size
    get = size.get if isinstance(size, dict) else lambda key, default=None: getattr(size, key, default)
    return int(get("shortest_edge") or max(get("height") or 0, get("width") or 0) or 336)
