"""Keeping the model busy: inputs grouped by image-token count (little padding per batch), the CPU work of the
next batches (decoding, preprocessing, tokenizing) done in a background thread while the model generates (and
while its weights load), and, where it pays (a CPU), more than one batch generated at once. Results still come
out in input order."""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any, TypeVar

from llavanext_cli.images import image_size_without_decoding

T = TypeVar("T")
_DONE = object()

# How many batches' worth of inputs are sorted together by token count: wider packs batches more tightly,
# narrower holds fewer finished records back to keep the output in input order.
BUCKET_WINDOW_BATCHES = 4
# How many inputs may be prepared ahead of the model (about 7 MB of pixels each at 5 tiles of 336 px): enough to
# keep the model fed from the moment its weights are in memory, few enough to bound the memory.
PREFETCH_INPUTS = 16
# How long a stopping consumer waits for the background thread to finish the item in hand, in seconds.
JOIN_TIMEOUT = 10.0


def image_token_count(checkpoint: Any, size: tuple[int, int] | None) -> int:
    """How many image tokens the processor will insert for an image of this (width, height); -1 if unknown."""
    if size is None:
        return -1
    width, height = size
    try:
        return int(checkpoint.processor._get_num_multimodal_tokens(image_sizes=[(height, width)])["num_image_tokens"][0])
    except Exception:  # a processor without this helper: no bucketing, same results
        return -1


def plan_batches(counts: Sequence[int], batch_size: int, tolerance: float = 0.0,
                 window_batches: int = BUCKET_WINDOW_BATCHES) -> list[list[int]]:
    """Batches of input indices. Within each window of `window_batches * batch_size` inputs, inputs are sorted by
    token count and a batch only takes inputs whose counts are within `tolerance` (a fraction) of each other, so
    batches carry little or (tolerance 0) no padding."""
    if batch_size <= 1:
        return [[index] for index in range(len(counts))]
    window = batch_size * window_batches
    batches: list[list[int]] = []
    for start in range(0, len(counts), window):
        current: list[int] = []
        for index in sorted(range(start, min(start + window, len(counts))), key=lambda i: (counts[i], i)):
            if current and (len(current) == batch_size or
                            counts[index] - counts[current[0]] > tolerance * max(counts[index], 1)):
                batches.append(current)
                current = []
            current.append(index)
        if current:
            batches.append(current)
    return batches


def token_counts(checkpoint: Any, image_lists: Sequence[Sequence[str]], batch_size: int) -> list[int]:
    """The image-token count of each input (its images summed), read from file headers only."""
    if batch_size <= 1:
        return [0] * len(image_lists)
    counts = []
    for images in image_lists:
        per_image = [image_token_count(checkpoint, image_size_without_decoding(source)) for source in images]
        counts.append(-1 if any(c < 0 for c in per_image) else sum(per_image))
    return counts


def in_background(items: Iterable[T], depth: int = 2) -> Iterator[T]:
    """Produce `items` in a worker thread, at most `depth` ahead of the consumer. An exception in the worker is
    raised in the consumer; closing the consumer stops the worker."""
    buffer: queue.Queue[Any] = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def offer(item: Any) -> bool:
        """Put `item` in the buffer unless the consumer stops first."""
        while not stop.is_set():
            try:
                buffer.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def work() -> None:
        try:
            for item in items:
                if not offer(item):
                    return
            offer(_DONE)
        except BaseException as error:  # handed to the consumer, which raises it
            offer(error)

    thread = threading.Thread(target=work, name="llava-prefetch", daemon=True)
    thread.start()
    try:
        while True:
            item = buffer.get()
            if item is _DONE:
                return
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
        # Wait for the item in hand (a bounded wait: a URL can take up to its timeout): a thread still inside
        # the processor's native code when the interpreter exits can abort the process.
        thread.join(timeout=JOIN_TIMEOUT)


def in_input_order(results: Iterable[tuple[int, T]]) -> Iterator[T]:
    """Re-order (index, result) pairs that arrive out of order into index order, holding back only what must wait."""
    waiting: dict[int, T] = {}
    next_index = 0
    for index, result in results:
        waiting[index] = result
        while next_index in waiting:
            yield waiting.pop(next_index)
            next_index += 1


def prefetch_depth(batch_size: int, workers: int) -> int:
    """How many prepared batches may wait for the model."""
    return max(workers + 1, PREFETCH_INPUTS // max(batch_size, 1))


def run_concurrently(run: Callable[[Any], Iterable[tuple[int, T]]], items: Iterator[Any], workers: int,
                     cancelled: threading.Event) -> Iterator[tuple[int, T]]:
    """run(item) for the items in `workers` threads at once; each item's results together, items in the order
    they finish. An exception in a worker is raised here; when the consumer stops (an exception, Ctrl-C,
    closing), `cancelled` is set and the workers are waited for, so none is left running."""
    # The first item runs here, on the consumer's thread: it is where a lazily loaded model loads, and Ctrl-C
    # interrupts a load here at once, where a worker thread would have to be waited for.
    first = next(items, _DONE)
    if first is _DONE:
        return
    yield from run(first)
    finished: queue.Queue[Any] = queue.Queue()
    take = threading.Lock()

    def work() -> None:
        try:
            while not cancelled.is_set():
                with take:
                    item = next(items, _DONE)
                if item is _DONE:
                    break
                results = list(run(item))
                if not cancelled.is_set():
                    finished.put(results)
        except BaseException as error:  # handed to the consumer, which raises it
            cancelled.set()
            finished.put(error)
        finally:
            finished.put(_DONE)

    threads = [threading.Thread(target=work, name=f"llava-worker-{n}", daemon=True) for n in range(workers)]
    for thread in threads:
        thread.start()
    try:
        running = len(threads)
        while running:
            got = finished.get()
            if got is _DONE:
                running -= 1
            elif isinstance(got, BaseException):
                raise got
            else:
                yield from got
    finally:
        cancelled.set()
        for thread in threads:
            thread.join()


def run_pipelined(prepare: Callable[[list[int]], Any], run: Callable[[Any], Iterable[tuple[int, T]]],
                  batches: Sequence[list[int]], prefetch: bool = True, workers: int = 1, depth: int = 2,
                  cancelled: threading.Event | None = None) -> Iterator[T]:
    """prepare(batch) in the background (at most `depth` batches ahead), run(prepared) here or, with
    `workers` > 1, in that many threads at once; results in input order. `cancelled` is set when the consumer
    stops early, for `run` to cut short what it is doing."""
    cancelled = cancelled if cancelled is not None else threading.Event()
    prepared = (prepare(batch) for batch in batches)
    source = in_background(prepared, depth) if prefetch else prepared

    def results() -> Iterator[tuple[int, T]]:
        try:
            if workers > 1:
                yield from run_concurrently(run, iter(source), workers, cancelled)
            else:
                for item in source:
                    yield from run(item)
        finally:
            cancelled.set()
            close = getattr(source, "close", None)
            if close is not None:
                try:
                    close()
                except ValueError:  # a worker is still inside it (a second Ctrl-C cut the wait short)
                    pass

    return in_input_order(results())
