"""The Python API: a checkpoint opened with its settings, whose methods run the tool's jobs and yield its records.

    import llavanext_cli as llava
    model = llava.load("llava-hf/llava-v1.6-mistral-7b-hf", dtype="bfloat16", batch_size=8)
    for record in model.caption(["a.jpg", "photos/"]):
        print(record.to_json())

Records are those of the CLI (`Answer`, `Classification`, `Failure`, each with `to_json()`), produced lazily, in
input order, with the CLI's exactness: the same engine makes them. Bad arguments raise `UsageError` with the CLI's
message, a checkpoint that cannot be used `SetupError`; never `SystemExit`.
"""

from __future__ import annotations

import json
import os
import queue
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

from llavanext_cli.api.images import given_images
from llavanext_cli.io.questions import PromptJob, check_questions
from llavanext_cli.engine.plan import GenerationOptions
from llavanext_cli.engine.scoring import LabelJob
from llavanext_cli.errors import InputWarning, UsageError
from llavanext_cli.io.records import Answer, Record, Subject
from llavanext_cli.io.settings import Settings, resolve_settings, validate_value

# The settings a call may give for itself (the rest are the model's: its dtype, device, ...).
CALL_SETTINGS = ("max_new_tokens", "temperature", "top_p", "num_beams", "seed", "batch_size")
BUSY = ("this model is already answering another call: one Model serves one caller at a time (finish or close the "
        "other call's iterator first, or load another Model)")


def load(model: str | None = None, *, config_file: str | os.PathLike | None = None, **settings: Any) -> Model:
    """Open a checkpoint (hub id or local directory; default: the `model` setting) with any settings, named as in
    configs/default.yaml and resolved through the same layers as the CLI's (these, then LLAVA_* variables, then
    `config_file`, the user's config file, the defaults). The config and processor are read now (a checkpoint that
    cannot be used raises SetupError); the weights load on first use."""
    flags = {**settings, **({"model": model} if model is not None else {})}
    return Model(resolve_settings(flags, Path(config_file) if config_file is not None else None)).open()


class Model:
    """A checkpoint and its settings; its jobs as methods that yield records. One Model serves one caller at a time:
    a call made while another's records are still being produced raises UsageError. It is what `llava serve`
    holds."""

    def __init__(self, settings: Settings, on_loaded: Callable[[], None] | None = None) -> None:
        self.settings = settings
        self.on_loaded = on_loaded  # called once the weights are in memory
        self._checkpoint: Any = None
        self._opening = threading.Lock()
        self._busy = threading.Lock()

    @property
    def name(self) -> str:
        return self.settings.model

    @property
    def checkpoint(self) -> Any:
        """The opened checkpoint (config, generation config, processor, prompt format; the weights on first use)."""
        with self._opening:
            if self._checkpoint is None:
                import warnings

                from llavanext_cli.model.checkpoint import open_checkpoint

                self._checkpoint = open_checkpoint(self.settings, on_loaded=self.on_loaded)
                if self._checkpoint.prompt.warning:
                    warnings.warn(self._checkpoint.prompt.warning, InputWarning, stacklevel=3)
        return self._checkpoint

    def open(self) -> Model:
        _ = self.checkpoint
        return self

    # -- the jobs ------------------------------------------------------------------------------------------------
    def caption(self, images: Any, *, prompt: str | None = None, schema: Any = None, recursive: bool = False,
                **generation: Any) -> Iterator[Record]:
        """One description per image (`prompt` overrides the caption_prompt setting); with `schema` (a JSON Schema
        as a dict, a file, inline JSON or the concise form) each answer is JSON valid against it."""
        given = given_images(images, recursive)
        text = prompt if prompt is not None else self.settings.caption_prompt
        jobs = [PromptJob(Subject.of(name), text) for name in given.names]
        return self.answer(jobs, schema=schema, in_memory=given.in_memory, **generation)

    def ask(self, images: Any, questions: str | Sequence[str], *, together: bool = False, schema: Any = None,
            recursive: bool = False, **generation: Any) -> Iterator[Record]:
        """One answer per image and question, image by image (each image encoded once for all its questions); with
        `together`, one answer about all the images at once per question."""
        questions = check_questions(questions)
        given = given_images(images, recursive)
        subjects = ([Subject(tuple(given.names), together=True)] if together
                    else [Subject.of(name) for name in given.names])
        jobs = [PromptJob(subject, question) for subject in subjects for question in questions]
        return self.answer(jobs, schema=schema, in_memory=given.in_memory, **generation)

    def ask_dataset(self, source: str | os.PathLike | Iterable[dict[str, Any]], *, schema: Any = None,
                    **generation: Any) -> Iterator[Record]:
        """A VQA set, as `ask --questions`: a JSONL file, or dicts `{"image" or "images", "question", ...}` (the other
        keys copied into the records), in their order."""
        from llavanext_cli.io.questions import open_questions, question_jobs

        if isinstance(source, (str, os.PathLike)):
            jobs = open_questions(os.fspath(source), stdin=None)  # type: ignore[arg-type]
        else:
            jobs = question_jobs(((f"item {number}", item) for number, item in enumerate(source, start=1)),
                                 "questions")
        return self.answer(jobs, schema=schema, **generation)

    def classify(self, images: Any, labels: str | Sequence[str], *, prompt: str | None = None,
                 normalize: str | None = None, recursive: bool = False,
                 batch_size: int | None = None) -> Iterator[Record]:
        """Each label ("a,b,c" or a list) scored as the answer to `prompt` ({labels} becomes them joined by ", ";
        default: the classify_prompt setting), probabilities that sum to 1."""
        from llavanext_cli.engine.scoring import classification_prompt, parse_labels

        label_list = parse_labels(labels) if isinstance(labels, str) else parse_labels(given=labels)
        given = given_images(images, recursive)
        question = classification_prompt(prompt if prompt is not None else self.settings.classify_prompt, label_list)
        jobs = [LabelJob(Subject.of(name)) for name in given.names]
        return self.classify_jobs(jobs, label_list, question, normalize=normalize, batch_size=batch_size,
                                  in_memory=given.in_memory)

    def chat(self, images: Any = (), *, system: str | None = None, **generation: Any) -> Chat:
        """A conversation: `send(text, images=())` answers (an Answer), `stream(...)` yields the answer's text as it
        is generated; `images` go with the first message."""
        from llavanext_cli.engine.chat import ChatSession
        from llavanext_cli.engine.plan import check_combinations, plan_execution
        from llavanext_cli.io.images import ImageFetching

        options, _ = self._options(generation)
        check_combinations(options, compile=self.settings.compile)
        checkpoint = self.checkpoint
        plan = plan_execution(checkpoint, options, compile=self.settings.compile)
        fetching = ImageFetching.from_settings(self.settings)
        fetching = ImageFetching(fetching.url_timeout, fetching.url_max_bytes, fetching.offline, {})
        chat = Chat(self, ChatSession(checkpoint, plan, fetching, system=system), options)
        if images is not None and images != ():
            for image in ([images] if isinstance(images, (str, os.PathLike, bytes)) or not isinstance(images, Iterable)
                          else images):
                chat.attach(image)
        return chat

    # -- what the jobs run on (the CLI comes in here, with jobs it made) -------------------------------------------
    def answer(self, jobs: Sequence[PromptJob], *, schema: Any = None, on_text: Callable[[str], None] | None = None,
               in_memory: dict[str, Any] | None = None, cancelled: threading.Event | None = None,
               **generation: Any) -> Iterator[Record]:
        """caption / ask jobs to records, in order. Checked now (bad settings, a schema that cannot be enforced, a
        combination that cannot run: UsageError); run as the records are asked for."""
        options, batch_size, answer_schema = self.check_answering(schema, **generation)
        settings = self.settings

        def produce() -> Iterator[Record]:
            from llavanext_cli.engine.answering import AnswerEngine
            from llavanext_cli.engine.concurrency import resolve_workers
            from llavanext_cli.engine.plan import plan_execution
            from llavanext_cli.io.sharding import data_parallel_from_env

            checkpoint = self.checkpoint
            workers = resolve_workers(settings.workers, checkpoint.device_type, len(jobs), options.seeded_sampling,
                                      settings.compile, data_parallel_from_env() is not None)
            plan = plan_execution(checkpoint, options, compile=settings.compile, workers=workers, schema=answer_schema)
            # compiled against the checkpoint's tokenizer, before its weights load
            constraint = answer_schema.compile(checkpoint) if answer_schema is not None else None
            engine = AnswerEngine(checkpoint, plan, batch_size=batch_size, fetching=self._fetching(in_memory),
                                  on_text=on_text, fast_decode=settings.fast_decode, constraint=constraint,
                                  cancelled=cancelled)
            yield from engine.answer(jobs)

        return self._exclusively(produce)

    def check_answering(self, schema: Any = None, **generation: Any) -> tuple[GenerationOptions, int, Any]:
        """What an answering call would run with, checked before anything opens: its generation settings, batch
        size and schema (UsageError for what cannot be, alone or together)."""
        from llavanext_cli.engine.plan import check_combinations

        options, batch_size = self._options(generation)
        answer_schema = load_answer_schema(schema)
        settings = self.settings
        check_combinations(options, compile=settings.compile, workers=settings.workers, schema=answer_schema,
                           source=settings.sources.get("workers", "--workers"))
        return options, batch_size, answer_schema

    def classify_jobs(self, jobs: Sequence[LabelJob], labels: Sequence[str], question: str, *,
                      normalize: str | None = None, batch_size: int | None = None,
                      in_memory: dict[str, Any] | None = None) -> Iterator[Record]:
        """classify jobs to records, in order (each with its truth, where it has one)."""
        from llavanext_cli.engine.scoring import classify_inputs

        normalize = validate_value("normalize", normalize, "--normalize") if normalize is not None \
            else self.settings.normalize
        batch_size = validate_value("batch_size", batch_size, "--batch-size") if batch_size is not None \
            else self.settings.batch_size

        def produce() -> Iterator[Record]:
            yield from classify_inputs(self.checkpoint, jobs, question, labels, normalize, batch_size,
                                       self._fetching(in_memory))

        return self._exclusively(produce)

    # -- within ----------------------------------------------------------------------------------------------------
    def _options(self, generation: dict[str, Any]) -> tuple[GenerationOptions, int]:
        """The generation settings of a call: the model's, with the call's own (checked as flags are)."""
        generation = dict(generation)
        stop = generation.pop("stop", None) or ()
        if isinstance(stop, str):
            stop = (stop,)
        if not all(isinstance(text, str) and text for text in stop):
            raise UsageError("stop must be a text, or a list of texts, that an answer ends before")
        unknown = sorted(set(generation) - set(CALL_SETTINGS))
        if unknown:
            raise UsageError(f"unknown generation setting {unknown[0]!r}",
                             hint="a call takes " + ", ".join(CALL_SETTINGS) + ", stop")
        values: dict[str, Any] = {key: getattr(self.settings, key) for key in CALL_SETTINGS}
        for key, value in generation.items():
            if value is not None:
                values[key] = validate_value(key, value, "--" + key.replace("_", "-"))
        batch_size = values.pop("batch_size")
        return GenerationOptions(**values, stop=tuple(stop)), batch_size

    def _fetching(self, in_memory: dict[str, Any] | None) -> Any:
        from llavanext_cli.io.images import ImageFetching

        fetching = ImageFetching.from_settings(self.settings)
        if not in_memory:
            return fetching
        return ImageFetching(fetching.url_timeout, fetching.url_max_bytes, fetching.offline, dict(in_memory))

    def _exclusively(self, produce: Callable[[], Iterator[Record]]) -> Iterator[Record]:
        """`produce()`'s records, the model held for this call while they are made (from the first record asked for
        to the last, or until the iterator is closed)."""
        def held() -> Iterator[Record]:
            if not self._busy.acquire(blocking=False):
                raise UsageError(BUSY)
            try:
                yield from produce()
            finally:
                self._busy.release()

        return held()


def load_answer_schema(schema: Any) -> Any:
    """--schema as given (a file, inline JSON, the concise form, or a dict): checked, or None."""
    from llavanext_cli.engine.structured import AnswerSchema, load_schema

    if schema is None or isinstance(schema, AnswerSchema):
        return schema

    return load_schema(schema if isinstance(schema, str) else json.dumps(schema))


_END: Any = object()


class Chat:
    """A conversation with a Model: turns, the images they carry, its transcript."""

    def __init__(self, model: Model, session: Any, options: GenerationOptions) -> None:
        self.model = model
        self.session = session
        self.options = options
        self.last: Any = None  # the last turn's reply (its tokens, the exchanges dropped, the cache reused)
        self._images = 0

    @property
    def messages(self) -> list[dict[str, Any]]:
        return self.session.messages

    @property
    def prompt_format(self) -> str:
        return self.session.checkpoint.prompt.format.name

    @property
    def pending(self) -> list[dict[str, Any]]:
        """The images attached to the next message."""
        return self.session.pending

    def attach(self, image: Any) -> str:
        """Attach an image (a path, a URL, a PIL image or bytes) to the next message; its name (InputError when it
        cannot be read)."""
        if isinstance(image, (str, os.PathLike)):
            name = os.fspath(image)
        else:
            given = given_images([image])
            self._images += 1
            name = f"<chat image {self._images}>"
            self.session.fetching.in_memory[name] = given.in_memory[given.names[0]]
        self.session.attach(name)
        return name

    def send(self, text: str, images: Any = (), *, on_text: Callable[[str], None] | None = None,
             cancelled: threading.Event | None = None) -> Answer:
        """A turn: the message (with `images` and those attached before), answered from the whole conversation."""
        if not isinstance(text, str) or not text.strip():
            raise UsageError("a message needs some text")
        for image in ([images] if isinstance(images, (str, os.PathLike, bytes)) or not isinstance(images, Iterable)
                      else images):
            self.attach(image)
        attached = tuple(item["path"] for item in self.session.pending)

        def turn() -> Iterator[Any]:
            yield self.session.send(text, on_text=on_text, cancelled=cancelled)

        self.last = reply = next(self.model._exclusively(turn))
        return Answer(Subject(attached, together=True), text, reply.text, self.model.name, reply.new_tokens,
                      round(reply.seconds, 4), prompt_tokens=reply.prompt_tokens)

    def stream(self, text: str, images: Any = ()) -> Iterator[str]:
        """A turn whose answer comes piece by piece as it is generated; closing the iterator early stops the
        generation after its current step (and the turn is not kept)."""
        pieces: queue.Queue[Any] = queue.Queue()
        outcome: dict[str, Any] = {}
        cancelled = threading.Event()

        def work() -> None:
            try:
                outcome["answer"] = self.send(text, images, on_text=pieces.put, cancelled=cancelled)
            except BaseException as error:  # raised in the caller's thread, below
                outcome["error"] = error
            finally:
                pieces.put(_END)

        thread = threading.Thread(target=work, name="llava-chat-stream", daemon=True)
        thread.start()
        try:
            while (piece := pieces.get()) is not _END:
                yield piece
        finally:
            if thread.is_alive():  # closed early: the generation stops after its current step
                cancelled.set()
            thread.join()
        if "error" in outcome:
            raise outcome["error"]

    def reset(self) -> None:
        self.session.reset()

    def transcript_settings(self) -> dict[str, Any]:
        settings = self.model.settings
        return {"dtype": settings.dtype, "quant": settings.quant, "quant_type": settings.quant_type,
                "seed": self.options.seed, "prompt_format": self.session.checkpoint.prompt.format.name,
                "max_new_tokens": self.options.max_new_tokens, "temperature": self.options.temperature,
                "top_p": self.options.top_p, "num_beams": self.options.num_beams, "system": self.session.system}

    def save(self, path: str | os.PathLike) -> None:
        """The transcript: {"model", "settings", "messages"} (messages in the Hugging Face chat format)."""
        self.session.save(Path(path), self.transcript_settings())

    def load(self, path: str | os.PathLike) -> list[str]:
        """Continue a saved transcript; what to warn about (an image missing or changed)."""
        return self.session.load(Path(path))
