"""Prompts that begin alike pay for their beginning once.

Several questions about one image render to prompts that share everything up to where the questions differ,
the image's ~2,000 tokens included; the turns of a conversation render to prompts that each extend the last. Here
the shared part is decoded, preprocessed and run through the model once, and each prompt continues from a copy
of its key/value cache (transformers' prompt reuse: `generate(..., cache=cache)`): the image is encoded
once for all its questions, and a chat turn runs only its new tokens (and its new images) through the model.

Token ids are built without running the image processor for every prompt: the processor turns each image tag
into a run of image tokens whose length depends on the image alone, so a prompt's ids are its tokenized text with
each image tag expanded to its image's run. The expansion is checked against the processor's own output for the
first prompt of each group; where they differ, or where the shared part would end inside an image, the prompts
are run the ordinary way.
"""

from __future__ import annotations

import copy
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from PIL import Image

from llavanext_cli.model.cache_api import cache_of, with_cache
from llavanext_cli.engine.generation import (
    OUT_OF_MEMORY, Generation, generate_from_inputs, is_out_of_memory, on_model, release_memory)
from llavanext_cli.engine.plan import ExecutionPlan
from llavanext_cli.model.preprocessing import identity_image_steps


def image_token_id(processor: Any) -> int:
    return processor.tokenizer.convert_tokens_to_ids(processor.image_token)


def expand_image_tokens(ids: Sequence[int], image_token: int, counts: Sequence[int]) -> list[int] | None:
    """The ids with the k-th image token repeated counts[k] times; None if the prompt has another number of images."""
    expanded: list[int] = []
    image = 0
    for token in ids:
        if token == image_token:
            if image >= len(counts):
                return None
            expanded.extend([token] * counts[image])
            image += 1
        else:
            expanded.append(token)
    return expanded if image == len(counts) else None


def image_token_runs(ids: Sequence[int], image_token: int) -> list[tuple[int, int]]:
    """(start, end) of each run of image tokens."""
    runs = []
    start = None
    for position, token in enumerate(ids):
        if token == image_token and start is None:
            start = position
        elif token != image_token and start is not None:
            runs.append((start, position))
            start = None
    if start is not None:
        runs.append((start, len(ids)))
    return runs


def common_prefix_length(sequences: Sequence[Sequence[int]]) -> int:
    """How many leading ids all the sequences share. Found by halving with slice comparisons (done in C), not id by
    id: a server compares each request with every cached conversation, thousands of ids each, most of them alike
    (every image token has the same id)."""
    first = list(sequences[0])
    shared = min(len(sequence) for sequence in sequences)
    for other in sequences[1:]:
        other = list(other)
        if first[:shared] == other[:shared]:
            continue
        low, high = 0, shared - 1  # first[:low] == other[:low]; they differ within first[:high + 1]
        while low < high:
            middle = (low + high + 1) // 2
            if first[:middle] == other[:middle]:
                low = middle
            else:
                high = middle - 1
        shared = low
    return shared


def tokenize(processor: Any, prompt: str) -> list[int]:
    """A prompt's ids with each image tag as one image token (what the processor tokenizes after expanding them)."""
    return list(processor.tokenizer(prompt)["input_ids"])


def process_images(checkpoint: Any, images: Sequence[Image.Image]) -> tuple[dict[str, Any], list[int]]:
    """The image processor's tensors for these images and each image's run of image tokens, from one processor
    call on a prompt of their tags alone (the image processor runs once per image)."""
    processor = checkpoint.processor
    skips = identity_image_steps(processor.image_processor)
    tags = "\n".join([processor.image_token] * len(images))
    inputs = processor(images=list(images), text=[tags], return_tensors="pt", **skips)
    runs = image_token_runs(inputs["input_ids"][0].tolist(), image_token_id(processor))
    return _image_tensors(inputs), [end - start for start, end in runs]


def _image_tensors(inputs: Any) -> dict[str, Any]:
    """The image processor's part of a processor's output (not the text's ids and mask)."""
    return {key: value for key, value in inputs.items() if key not in ("input_ids", "attention_mask")}


# --- several prompts about the same images --------------------------------------------------------------------


@dataclass
class SharedPrompts:
    """Prompts about the same images, ready to share their beginning: each prompt's ids, the image tensors (for
    the shared part), and how many leading ids they share (every image token among them)."""

    ids: list[list[int]]
    image_tensors: dict[str, Any]
    prefix_length: int


def prepare_shared(processor: Any, prompts: Sequence[str], images: Sequence[Image.Image]) -> SharedPrompts | None:
    """The prompts' ids from one processor call (on the first prompt: the image processor runs once per image),
    or None where they cannot share their beginning: the other prompts' expansion would not be the processor's
    (two image tags in a row merge their runs), or the shared part would not hold every image whole."""
    image_token = image_token_id(processor)
    skips = identity_image_steps(processor.image_processor)
    first = processor(images=list(images), text=[prompts[0]], return_tensors="pt", **skips)
    first_ids = first["input_ids"][0].tolist()
    runs = image_token_runs(first_ids, image_token)
    counts = [end - start for start, end in runs]
    ids = [expand_image_tokens(tokenize(processor, prompt), image_token, counts) for prompt in prompts]
    if ids[0] != first_ids or any(row is None for row in ids):
        return None
    # At least one id of every prompt is left after the shared part: generation starts from a prompt's last id.
    length = min(common_prefix_length(ids), min(len(row) for row in ids) - 1)
    if any(end > length for _, end in runs):
        return None
    return SharedPrompts(ids, _image_tensors(first), length)


def new_cache(checkpoint: Any) -> Any:
    """An empty dynamic cache for the model, one that can always be cut back: sliding-window layers (Mistral's) keep
    what falls out of their window until they are cut (the cache stays bounded: by the context in a chat, by one
    prompt and its answer elsewhere)."""
    from transformers import DynamicCache

    cache = DynamicCache(config=checkpoint.model.config)
    cache.activate_past_recording()
    return cache


def cut_back(cache: Any, length: int) -> None:
    """The cache cut back to its first `length` tokens, layer by layer (a step that failed half-way, out of memory,
    may have grown some layers and not others)."""
    layers = getattr(cache, "layers", None)
    if layers is None:  # an older transformers: one length for the whole cache
        surplus = cache.get_seq_length() - length
        if surplus > 0:
            cache.crop(-surplus)
        return
    for layer in layers:
        surplus = layer.get_seq_length() - length
        if surplus > 0:
            layer.crop(-surplus)


def encode_prefix(checkpoint: Any, shared: SharedPrompts) -> Any:
    """The shared ids (images included) run through the model once: their key/value cache."""
    import torch

    from llavanext_cli.model.loading import eager_forward

    model = checkpoint.model
    prefix = torch.tensor([shared.ids[0][:shared.prefix_length]], device=checkpoint.device)
    tensors = on_model(checkpoint, shared.image_tensors)
    cache = new_cache(checkpoint)
    with torch.inference_mode(), eager_forward(model):
        output = model(input_ids=prefix, attention_mask=torch.ones_like(prefix), use_cache=True, logits_to_keep=1,
                       **tensors, **with_cache(model, cache))
    return cache_of(output)


def generate_shared(checkpoint: Any, shared: SharedPrompts, plan: ExecutionPlan, rows_per_pass: int = 1,
                    cancelled: threading.Event | None = None, constraint: Any = None,
                    seeds: Sequence[int | None] | None = None) -> list[Generation]:
    """One answer per prompt: the shared part encoded once, each prompt continued from its cache (`rows_per_pass`
    prompts at a time, over the cache repeated; their differing parts left-padded, with positions that ignore the
    padding). One prompt at a time, the cache itself is continued and cut back to the shared part after each, so
    that the memory held is the shared part's cache and one answer's, however many prompts there are. `seeds[i]`:
    prompt i's random stream. The shared part's time is split over the prompts. Out of memory, the rows are halved;
    a prompt that does not fit alone is an error row; a shared part that does not fit fails every prompt."""
    start = time.perf_counter()
    count = len(shared.ids)
    seeds = list(seeds) if seeds is not None else [None] * count
    try:
        cache = encode_prefix(checkpoint, shared)
    except Exception as error:
        if not is_out_of_memory(error):
            raise
        release_memory()
        return [Generation(text="", new_tokens=0, seconds=0.0, error=OUT_OF_MEMORY) for _ in range(count)]
    share = (time.perf_counter() - start) / count
    step = max(rows_per_pass, 1)
    results: list[Generation] = []
    for first in range(0, count, step):
        rows = list(range(first, min(first + step, count)))
        results += _continue(checkpoint, shared, cache, rows, plan, cancelled, share, constraint, seeds)
    return results


def _continue(checkpoint: Any, shared: SharedPrompts, cache: Any, rows: list[int], plan: ExecutionPlan,
              cancelled: threading.Event | None, share: float, constraint: Any,
              seeds: list[int | None]) -> list[Generation]:
    """The prompts `rows` continued from the shared cache: one row continues the cache itself (cut back afterwards),
    several a copy of it repeated over the rows. Out of memory, the rows are halved and retried."""
    import torch

    pad = checkpoint.processor.tokenizer.pad_token_id
    length = shared.prefix_length
    width = max(len(shared.ids[row]) for row in rows)
    input_ids = torch.full((len(rows), width), pad if pad is not None else 0, dtype=torch.long)
    attention = torch.zeros((len(rows), width), dtype=torch.long)
    for position, row in enumerate(rows):
        ids = shared.ids[row]
        rest = len(ids) - length
        input_ids[position, :length] = torch.tensor(ids[:length])
        input_ids[position, width - rest:] = torch.tensor(ids[length:])
        attention[position, :length] = 1
        attention[position, width - rest:] = 1
    rows_cache = cache
    try:
        if len(rows) > 1:
            rows_cache = copy.deepcopy(cache)
            rows_cache.batch_repeat_interleave(len(rows))
        results, _ = generate_from_inputs(
            checkpoint, {"input_ids": input_ids, "attention_mask": attention}, plan, cancelled=cancelled,
            cache=rows_cache, extra_seconds=share, constraint=constraint, seed=seeds[rows[0]],
            prompt_tokens=max(len(shared.ids[row]) - length for row in rows) + round(length / len(shared.ids)))
        return results
    except Exception as error:
        if not is_out_of_memory(error):
            raise
    finally:
        if rows_cache is cache:
            cut_back(cache, length)
        del rows_cache
    release_memory()
    if len(rows) == 1:
        return [Generation(text="", new_tokens=0, seconds=0.0, error=OUT_OF_MEMORY)]
    half = len(rows) // 2
    return (_continue(checkpoint, shared, cache, rows[:half], plan, cancelled, share, constraint, seeds)
            + _continue(checkpoint, shared, cache, rows[half:], plan, cancelled, share, constraint, seeds))


# --- a conversation -------------------------------------------------------------------------------------------


@dataclass
class ConversationCache:
    """The key/value cache of a conversation and the ids it holds, kept between turns. Each turn's ids are compared
    with them: the cache is cut back to where they first differ and only the rest runs through the model (with the
    images whose tokens are in it). All of an image's tokens have the same id, so the ids alone cannot tell two
    images of the same size apart (the oldest turns dropped, another image now first): the cache also knows which
    image each run of image tokens stands for, and is cut back to the first image that is not the one it holds.
    A turn that fails or is interrupted leaves no cache (the next one starts over)."""

    cache: Any = None
    ids: list[int] = field(default_factory=list)
    images: dict[int, str] = field(default_factory=dict)  # where an image's tokens start in `ids` -> its identity
    reused: int = 0  # ids the last turn took from the cache (for tests and the curious)

    def clear(self) -> None:
        self.cache = None
        self.ids = []
        self.images = {}
        self.reused = 0

    def generate(self, checkpoint: Any, ids: list[int], images: Sequence[dict[str, Any]], image_keys: Sequence[str],
                 plan: ExecutionPlan, on_text: Callable[[str], None] | None = None,
                 seed: int | None = None, cancelled: threading.Event | None = None,
                 constraint: Any = None) -> Generation:
        """Answer the prompt `ids`; `images` are the tensors of each image in the prompt, in order, and `image_keys`
        what tells them apart (a digest of the file)."""
        import torch

        image_token = image_token_id(checkpoint.processor)
        runs = image_token_runs(ids, image_token)
        keep = min(common_prefix_length([ids, self.ids]) if self.ids else 0, len(ids) - 1)
        for (start, end), key in zip(runs, image_keys):
            if start >= keep:
                break
            if keep < end or self.images.get(start) != key:  # never cut an image in two, nor keep another's tokens
                keep = start
                break
        new_images = [tensors for (start, _), tensors in zip(runs, images) if start >= keep]
        if keep and self.cache is not None:
            cut_back(self.cache, keep)
        else:
            keep = 0
            self.cache = new_cache(checkpoint)
        inputs: dict[str, Any] = {"input_ids": torch.tensor([ids]), "attention_mask": torch.ones((1, len(ids)),
                                                                                            dtype=torch.long)}
        if new_images:
            inputs.update(stack_image_tensors(new_images))
        self.reused = keep
        try:
            [result], output = generate_from_inputs(checkpoint, inputs, plan, on_text=on_text, cache=self.cache,
                                                    seed=seed, prompt_tokens=len(ids) - keep, cancelled=cancelled,
                                                    constraint=constraint)
        except BaseException:
            self.clear()
            raise
        self.ids = output[0].tolist()[:self.cache.get_seq_length()]
        self.images = {start: key for (start, _), key in zip(runs, image_keys)}
        return result


class PrefixStore:
    """A server's conversation caches, kept between requests within a memory budget: a request takes the one whose
    tokens begin most like its prompt (a conversation's next turn finds its last turn's), cuts it back to where they
    differ and continues it; then gives it back. The least recently used go first when the budget is exceeded."""

    def __init__(self, budget_bytes: int):
        self.budget = budget_bytes
        self._caches: list[ConversationCache] = []  # least recently used first
        # Whether the ids a conversation builds (its text tokenized, each image tag expanded) proved equal to the
        # processor's own on the first prompt with images any of them had (None: not checked yet).
        self.ids_proven: bool | None = None

    def take(self, ids: Sequence[int]) -> ConversationCache:
        """The cache `ids` continue furthest, if they keep at least half of it (a conversation's next turn keeps all
        of it); otherwise a new one: a prompt that shares only its first tokens (the template) with a conversation
        would cut that conversation's cache back for nothing and leave its next turn to start again."""
        best, shared = None, 0
        for cache in self._caches:
            length = common_prefix_length([ids, cache.ids]) if cache.ids else 0
            if length > shared and 2 * length >= len(cache.ids):
                best, shared = cache, length
        if best is None:
            return ConversationCache()
        self._caches.remove(best)
        return best

    def give(self, cache: ConversationCache) -> None:
        self._caches.append(cache)
        while self._caches and self.held() > self.budget:
            self._caches.pop(0).clear()

    def held(self) -> int:
        """The bytes the caches hold."""
        return sum(cache_bytes(cache.cache) for cache in self._caches if cache.cache is not None)

    def __len__(self) -> int:
        return len(self._caches)


def cache_bytes(cache: Any) -> int:
    layers = getattr(cache, "layers", None) or []
    return sum(int(layer.keys.nbytes) + int(layer.values.nbytes) for layer in layers
               if getattr(layer, "keys", None) is not None and getattr(layer, "values", None) is not None
               and hasattr(layer.keys, "nbytes"))


def stack_image_tensors(parts: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Several images' tensors as one batch, as the processor gives them for several images: pixel values of
    LLaVA-NeXT padded to the largest number of tiles (the model reads each image's own number from its size)."""
    import torch

    if len(parts) == 1:
        return dict(parts[0])
    stacked: dict[str, Any] = {}
    for key in parts[0]:
        values = [part[key] for part in parts]
        if key == "pixel_values" and values[0].dim() == 5:
            tiles = max(value.shape[1] for value in values)
            values = [torch.nn.functional.pad(value, (0, 0, 0, 0, 0, 0, 0, tiles - value.shape[1])) for value in values]
        stacked[key] = torch.cat(values, dim=0)
    return stacked
