"""The server's one model, one thread: requests wait in a bounded queue; the worker takes what arrived within a short
window and runs it the way the CLI runs a command's inputs, so that every answer is the one the same request gets
alone (greedy):

- answering work (captions, questions, a chat completion of one user turn without streaming) with the same
  generation settings and schema runs as one `Model.answer` call: questions about the same image share its encoded
  prefix, other inputs are batched by image-token count (--batch-size);
- classify work with the same labels and prompt runs as one `Model.classify_jobs` call;
- a conversation (several turns, a system prompt, or streaming), and a one-turn chat completion that arrived alone,
  runs alone, continuing from the cached prefix of an earlier one that began like it (a conversation's last turn,
  the same image) and leaving its own for the next, within --cache-memory.

A request given up by its client is dropped if it has not started; if it runs alone, or every request it runs with
was given up too, the generation stops after its current step; its slot in the queue is free at once.
"""

from __future__ import annotations

import concurrent.futures
import json
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from llavanext_cli.errors import Cancelled

_STOP: Any = object()


@dataclass
class Work:
    """One request's work for the model. `kind`: "answer" (jobs), "classify" (jobs, labels, question, normalize) or
    "conversation" (messages, text); `generation`: its generation settings; `in_memory`: its images, by name."""

    kind: str
    jobs: list[Any] = field(default_factory=list)
    generation: dict[str, Any] = field(default_factory=dict)
    schema: Any = None
    in_memory: dict[str, Any] = field(default_factory=dict)
    labels: tuple[str, ...] = ()
    question: str = ""
    normalize: str | None = None
    messages: list[dict[str, Any]] = field(default_factory=list)
    text: str = ""
    on_text: Callable[[str], None] | None = None
    future: concurrent.futures.Future = field(default_factory=concurrent.futures.Future)
    cancelled: threading.Event = field(default_factory=threading.Event)
    started: bool = False

    def group_key(self) -> Any:
        """Works that may run together have the same key (None: alone)."""
        if self.kind == "answer" and self.on_text is None:
            return ("answer", tuple(sorted((key, repr(value)) for key, value in self.generation.items())),
                    # equal schemas (each request parses its own) run together
                    json.dumps(self.schema.schema, sort_keys=True) if self.schema is not None else None)
        if self.kind == "classify":
            return ("classify", self.labels, self.question, self.normalize)
        return None


class Scheduler:
    """The worker thread and its bounded queue (see the module's docstring)."""

    def __init__(self, model: Any, *, max_queue: int = 64, window: float = 0.01, cache_memory: int = 2 * 2**30):
        from llavanext_cli.engine.prefix_cache import PrefixStore

        self.model = model
        self.max_queue = max_queue
        self.window = window
        self.prefixes = PrefixStore(cache_memory)
        self._queue: queue.Queue[Any] = queue.Queue()
        self._active = 0  # works queued or running, whose clients still wait
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, name="llava-serve-worker", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        """Finish what runs and what waits, then end the worker."""
        self._queue.put(_STOP)
        self._thread.join()

    # -- the handlers' side -----------------------------------------------------------------------------------------
    def submit(self, work: Work) -> bool:
        """Queue a work; False when the queue is full (the handler answers 429)."""
        with self._lock:
            if self._active >= self.max_queue:
                return False
            self._active += 1
        work.future.add_done_callback(lambda _: self._release())
        self._queue.put(work)
        return True

    def give_up(self, work: Work) -> None:
        """The client went away: its slot is free now; its generation stops after the current step if it runs alone
        (or with others that were all given up), and it never starts if it has not."""
        work.cancelled.set()
        _settle(work.future, error=Cancelled())

    def _release(self) -> None:
        with self._lock:
            self._active -= 1

    @property
    def active(self) -> int:
        return self._active

    # -- the worker's side ------------------------------------------------------------------------------------------
    def _run(self) -> None:
        while True:
            first = self._queue.get()
            if first is _STOP:
                return
            time.sleep(self.window)  # what arrives meanwhile runs with it
            taken = [first]
            stop_after = False
            while True:
                try:
                    item = self._queue.get_nowait()
                except queue.Empty:
                    break
                if item is _STOP:
                    stop_after = True
                    break
                taken.append(item)
            live = [work for work in taken if not work.cancelled.is_set()]
            groups: dict[Any, list[Work]] = {}
            alone: list[Work] = []
            for work in live:
                key = work.group_key()
                (alone.append(work) if key is None else groups.setdefault(key, []).append(work))
            for group in groups.values():
                if len(group) == 1 and group[0].messages:  # a chat turn with no company: as a conversation, its
                    self._guarded(group, lambda works: self._run_conversation(works[0]))  # prefix kept for the next
                else:
                    self._guarded(group, self._run_group)
            for work in alone:
                self._guarded([work], lambda works: self._run_conversation(works[0]))
            if stop_after:
                self._queue.put(_STOP)

    def _guarded(self, works: list[Work], run: Callable[[list[Work]], None]) -> None:
        """Run `works`; what goes wrong is each one's error (the handler decides what the client reads)."""
        for work in works:
            work.started = True
        try:
            run(works)
        except BaseException as error:  # a handler reports it, without its text unless it is the tool's own
            for work in works:
                _settle(work.future, error=error)

    def _group_cancel(self, works: list[Work]) -> threading.Event:
        """An event set once every work of a group is given up (watched by a small thread for the group's time)."""
        everyone_gone = threading.Event()

        def watch() -> None:
            while not everyone_gone.is_set():
                if all(work.cancelled.is_set() for work in works):
                    everyone_gone.set()
                    return
                if all(work.future.done() for work in works):
                    return
                time.sleep(0.02)

        threading.Thread(target=watch, name="llava-serve-watch", daemon=True).start()
        return everyone_gone

    def _run_group(self, works: list[Work]) -> None:
        jobs = [job for work in works for job in work.jobs]
        in_memory = {name: data for work in works for name, data in work.in_memory.items()}
        cancelled = self._group_cancel(works)
        first = works[0]
        if first.kind == "classify":
            records = self.model.classify_jobs(jobs, list(first.labels), first.question, normalize=first.normalize,
                                               in_memory=in_memory)
        else:
            records = self.model.answer(jobs, schema=first.schema, in_memory=in_memory, cancelled=cancelled,
                                        **first.generation)
        try:
            produced = list(records)
        finally:
            cancelled.set()  # the watcher ends
        start = 0
        for work in works:
            mine = produced[start:start + len(work.jobs)]
            start += len(work.jobs)
            _settle(work.future, mine)

    def _run_conversation(self, work: Work) -> None:
        if not work.messages:
            raise RuntimeError(f"a {work.kind} work without messages cannot run as a conversation")
        from llavanext_cli.api.model import load_answer_schema

        chat = self.model.chat(**work.generation)
        session = chat.session
        session.fetching.in_memory.update(work.in_memory)
        session.cache_pool = self.prefixes
        history, last = work.messages[:-1], work.messages[-1]
        session.continue_from(history)
        for item in last["content"]:
            if item.get("type") == "image":
                session.attach(item["path"])
        schema = load_answer_schema(work.schema)
        text = schema.prompt(work.text) if schema is not None else work.text
        constraint = schema.compile(self.model.checkpoint) if schema is not None else None

        def turn() -> Any:
            yield session.send(text, on_text=work.on_text, cancelled=work.cancelled, constraint=constraint)

        reply = next(self.model._exclusively(turn))
        _settle(work.future, reply)


def _settle(future: concurrent.futures.Future, result: Any = None, error: BaseException | None = None) -> None:
    """Settle a work's future unless it is settled already: the worker and a client that goes away (give_up, on the
    event loop) may both try at once, and the second must not raise in either thread."""
    try:
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(result)
    except concurrent.futures.InvalidStateError:
        pass
