"""Keeping the model busy: inputs grouped by image-token count (little padding per batch), the CPU work of the
next batches (decoding, preprocessing, tokenizing) done in a background thread while the model generates (and
while its weights load), and, where it pays (a CPU), more than one batch generated at once. Results still come
out in input order.

Stopping is part of the design: when the consumer stops (it finished, an error, Ctrl-C, SIGTERM), the `cancelled`
event is set, the producer of prepared batches is stopped, and every thread is joined before the consumer goes
on, so that no thread is left inside the model or the processor when the interpreter exits.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any, Generic, TypeVar

from llavanext_cli.io.images import image_size_without_decoding
from llavanext_cli.model.preprocessing import image_token_count

T = TypeVar("T")
_DONE: Any = object()

# How many batches' worth of inputs are sorted together by token count: wider packs batches more tightly,
# narrower holds fewer finished records back to keep the output in input order.
BUCKET_WINDOW_BATCHES = 4
# How many inputs may be prepared ahead of the model (about 7 MB of pixels each at 5 tiles of 336 px): enough to
# keep the model fed from the moment its weights are in memory, few enough to bound the memory.
PREFETCH_INPUTS = 16
# How long a stopping consumer waits for the producer to finish the item in hand, in seconds (a URL can take up to
# its timeout); and how often a waiting taker looks whether it should stop.
JOIN_TIMEOUT = 10.0
POLL_SECONDS = 0.1


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


def token_counts(processor: Any, image_lists: Sequence[Sequence[str]], batch_size: int) -> list[int]:
    """The image-token count of each input (its images summed), read from file headers only; -1 where unknown."""
    if batch_size <= 1:
        return [0] * len(image_lists)
    counts = []
    for images in image_lists:
        per_image = [image_token_count(processor, image_size_without_decoding(source)) for source in images]
        counts.append(-1 if any(c < 0 for c in per_image) else sum(per_image))
    return counts


class Source(Generic[T]):
    """Items for one or more takers: `take()` is safe from several threads and returns `_DONE` once the items are
    exhausted or `stop()` was called; an exception raised while producing an item is raised in the taker."""

    def take(self) -> T:
        raise NotImplementedError

    def stop(self) -> None:
        raise NotImplementedError


class InPlace(Source[T]):
    """Items produced by the taker itself, one taker at a time."""

    def __init__(self, items: Iterable[T]):
        self._items = iter(items)
        self._lock = threading.Lock()
        self._stopped = False

    def take(self) -> T:
        with self._lock:
            if self._stopped:
                return _DONE
            return next(self._items, _DONE)

    def stop(self) -> None:
        with self._lock:
            self._stopped = True


class InBackground(Source[T]):
    """Items produced in a background thread, at most `depth` ahead of the takers."""

    def __init__(self, items: Iterable[T], depth: int = 2):
        self._buffer: queue.Queue[Any] = queue.Queue(maxsize=depth)
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._produce, args=(items,), name="llava-prefetch", daemon=True)
        self._thread.start()

    def _offer(self, item: Any) -> bool:
        """Put `item` in the buffer unless the source is stopped first."""
        while not self._stopped.is_set():
            try:
                self._buffer.put(item, timeout=POLL_SECONDS)
                return True
            except queue.Full:
                continue
        return False

    def _produce(self, items: Iterable[T]) -> None:
        try:
            for item in items:
                if not self._offer(item):
                    return
            self._offer(_DONE)
        except BaseException as error:  # handed to a taker, which raises it
            self._offer(error)

    def take(self) -> T:
        while not self._stopped.is_set():
            try:
                item = self._buffer.get(timeout=POLL_SECONDS)
            except queue.Empty:
                continue
            if item is _DONE:
                self._buffer.put(_DONE)  # for the other takers: there is room, this taker just made it
                return _DONE
            if isinstance(item, BaseException):
                self._stopped.set()
                raise item
            return item
        return _DONE

    def stop(self) -> None:
        """Stop producing and wait for the item in hand (bounded: a thread still inside the processor's native code
        when the interpreter exits can abort the process)."""
        self._stopped.set()
        self._thread.join(timeout=JOIN_TIMEOUT)


def in_input_order(results: Iterator[tuple[int, T]]) -> Iterator[T]:
    """Re-order (index, result) pairs that arrive out of order into index order, holding back only what must wait.
    The source is closed however this ends; results left waiting at the end (an index never delivered) are a bug,
    raised as one."""
    waiting: dict[int, T] = {}
    next_index = 0
    try:
        for index, result in results:
            waiting[index] = result
            while next_index in waiting:
                yield waiting.pop(next_index)
                next_index += 1
        if waiting:
            raise RuntimeError(f"results for inputs {sorted(waiting)[:5]} were held back: input {next_index} "
                               "never came")
    finally:
        close = getattr(results, "close", None)
        if close is not None:
            close()


def prefetch_depth(batch_size: int, workers: int) -> int:
    """How many prepared batches may wait for the model."""
    return max(workers + 1, PREFETCH_INPUTS // max(batch_size, 1))


def run_concurrently(run: Callable[[Any], Iterable[tuple[int, T]]], source: Source[Any], workers: int,
                     cancelled: threading.Event) -> Iterator[tuple[int, T]]:
    """run(item) for the source's items in `workers` threads at once; each item's results together, items in the
    order they finish. An exception in a worker is raised here. When this generator stops (done, an exception,
    Ctrl-C, closed), `cancelled` is set, the source is stopped and the workers are joined."""
    # The first item runs here, on the consumer's thread: it is where a lazily loaded model loads, and Ctrl-C
    # interrupts a load here at once, where a worker thread would have to be waited for.
    first = source.take()
    if first is _DONE:
        return
    yield from run(first)
    finished: queue.Queue[Any] = queue.Queue()

    def work() -> None:
        try:
            while not cancelled.is_set():
                item = source.take()
                if item is _DONE or cancelled.is_set():  # the run may have been abandoned while this one waited
                    break
                results = list(run(item))
                if not cancelled.is_set():
                    finished.put(results)
        except BaseException as error:  # handed to the consumer, which raises it
            cancelled.set()
            finished.put(error)
        finally:
            finished.put(_DONE)

    threads: list[threading.Thread] = []
    try:
        # Started inside the `try`: a Ctrl-C between two starts still cancels and joins the ones started.
        for number in range(workers):
            threads.append(threading.Thread(target=work, name=f"llava-worker-{number}", daemon=True))
            threads[-1].start()
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
        source.stop()  # first: a worker waiting for an item wakes up and ends
        for thread in threads:
            thread.join()


def run_pipelined(prepare: Callable[[Any], Any], run: Callable[[Any], Iterable[tuple[int, T]]],
                  batches: Sequence[Any], prefetch: bool = True, workers: int = 1, depth: int = 2,
                  cancelled: threading.Event | None = None) -> Iterator[T]:
    """prepare(batch) in the background (at most `depth` batches ahead), run(prepared) here or, with
    `workers` > 1, in that many threads at once; results in input order. `cancelled` is set when the consumer
    stops early, for `run` to cut short what it is doing."""
    cancelled = cancelled if cancelled is not None else threading.Event()
    prepared = (prepare(batch) for batch in batches)
    source: Source[Any] = InBackground(prepared, depth) if prefetch else InPlace(prepared)

    def results() -> Iterator[tuple[int, T]]:
        try:
            if workers > 1:
                yield from run_concurrently(run, source, workers, cancelled)
            else:
                while (item := source.take()) is not _DONE:
                    yield from run(item)
        finally:
            cancelled.set()
            source.stop()

    return in_input_order(results())
