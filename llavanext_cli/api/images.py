"""Images as the Python API takes them: paths, directories, globs, URLs (expanded as IMAGES arguments are), and
images in memory (a `PIL.Image.Image`, or the bytes of an image file), which records name `<image N>` (N: the
position among the arguments)."""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from llavanext_cli.errors import UsageError
from llavanext_cli.io.inputs import expand_inputs, no_input_images


@dataclass
class GivenImages:
    """The names of the images a call was given, in order, and the objects of those in memory, by name."""

    names: list[str]
    in_memory: dict[str, Any] = field(default_factory=dict)


def _is_in_memory(item: Any) -> bool:
    if isinstance(item, (bytes, bytearray, memoryview)):
        return True
    try:
        from PIL import Image
    except ImportError:  # pragma: no cover
        return False
    return isinstance(item, Image.Image)


def given_images(images: Any, recursive: bool = False) -> GivenImages:
    """One image (a path, URL, PIL image or bytes) or an iterable of them, expanded; UsageError when there is none
    or an argument is of another kind."""
    if isinstance(images, (str, os.PathLike)) or _is_in_memory(images):
        items: Iterable[Any] = [images]
    elif isinstance(images, Iterable):
        items = list(images)
    else:
        raise UsageError(f"images must be paths, URLs, PIL images or bytes, not {type(images).__name__}")
    names: list[str] = []
    in_memory: dict[str, Any] = {}
    for position, item in enumerate(items):
        if _is_in_memory(item):
            name = f"<image {position}>"
            in_memory[name] = bytes(item) if isinstance(item, (bytearray, memoryview)) else item
            names.append(name)
        elif isinstance(item, (str, os.PathLike)):
            names.extend(expand_inputs([os.fspath(item)], recursive=recursive, allow_none=True))
        else:
            raise UsageError(f"images must be paths, URLs, PIL images or bytes, not {type(item).__name__}")
    if not names:
        raise no_input_images()
    return GivenImages(names, in_memory)
