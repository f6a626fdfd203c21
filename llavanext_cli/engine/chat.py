"""A multi-turn conversation about images: history in the Hugging Face chat format, rendered in full every turn
with the resolved prompt format, oldest turns dropped (and reported) when the context overflows, and transcripts
that save and load.

The conversation keeps its key/value cache between turns (prefix_cache.ConversationCache): each turn's rendered
prompt is compared, token by token, with what the cache holds, and only what differs runs through the model, new
images included; each image is decoded and preprocessed once, when it is attached. So a turn costs its new
tokens, not the whole history. What the cache holds is bounded by the model's context (the oldest turns are
dropped to fit it)."""

from __future__ import annotations

import hashlib
import threading
import warnings
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image

from llavanext_cli.model.checkpoint import Checkpoint
from llavanext_cli.errors import Cancelled, InputError, InputWarning, UsageError
from llavanext_cli.engine.generation import OUT_OF_MEMORY, generate, is_out_of_memory, release_memory
from llavanext_cli.engine.plan import ExecutionPlan
from llavanext_cli.io.images import ImageFetching, image_from_bytes
from llavanext_cli.engine.prefix_cache import (
    ConversationCache, expand_image_tokens, image_token_id, image_token_runs, process_images, tokenize)
from llavanext_cli.model.preprocessing import prepare_inputs
from llavanext_cli.io.textfiles import read_text
from llavanext_cli.io.writers import write_atomically

Message = dict[str, Any]
TURN_OUT_OF_MEMORY = ("out of memory: this turn does not fit (the conversation is kept as it was); try /reset, fewer "
                      "or smaller images, a lower --max-new-tokens, or --quant 4bit")


@dataclass
class ChatReply:
    text: str
    new_tokens: int
    dropped_turns: int = 0
    reused_tokens: int = 0  # prompt tokens taken from the conversation's cache instead of run again
    prompt_tokens: int = 0  # prompt tokens run through the model for this turn
    seconds: float = 0.0
    prompt_length: int = 0  # the whole prompt's tokens (the cached ones too)
    data: Any = None        # with a constraint: the answer parsed
    error: str | None = None  # with a constraint: why the answer is not JSON valid against it (cut short)


@dataclass
class _Picture:
    image: Image.Image
    sha256: str
    tensors: dict[str, Any]  # the image processor's output for this image alone
    image_tokens: int        # how many image tokens stand for it in a prompt


@dataclass
class ChatSession:
    """The conversation state. Images attached with `attach` go with the next user turn."""

    checkpoint: Checkpoint
    plan: ExecutionPlan
    fetching: ImageFetching = field(default_factory=ImageFetching)
    system: str | None = None
    messages: list[Message] = field(default_factory=list)
    pending: list[dict[str, Any]] = field(default_factory=list)
    _pictures: dict[str, _Picture] = field(default_factory=dict)
    _cache: ConversationCache = field(default_factory=ConversationCache)
    _ids_checked: bool = False  # the first prompt with images was checked against the processor's own ids
    _cache_usable: bool = True
    cache_pool: Any = None  # a server's caches (prefix_cache.PrefixStore), which a turn takes its cache from
    def __post_init__(self) -> None:
        if self.checkpoint.device_type == "cpu":
            from llavanext_cli.engine.concurrency import use_cpu_cores

            use_cpu_cores(workers=1)

    # -- images ---------------------------------------------------------------------------------------------
    def _picture(self, source: str) -> _Picture:
        data = self.fetching.read_bytes(source)  # read once: hashed, and decoded from the same bytes
        digest = hashlib.sha256(data).hexdigest()
        image = self.fetching.load(source) if source in self.fetching.in_memory else image_from_bytes(data, source)
        tensors, [count] = process_images(self.checkpoint, [image])
        picture = _Picture(image, digest, tensors, count)
        self._pictures[source] = picture
        return picture

    def attach(self, source: str) -> dict[str, Any]:
        """Attach an image (path or URL) to the next user turn; InputError if it cannot be read."""
        picture = self._picture(source)
        item = {"type": "image", "path": source, "sha256": picture.sha256}
        self.pending.append(item)
        return item

    # -- turns ----------------------------------------------------------------------------------------------
    def reset(self) -> None:
        self.messages.clear()
        self.pending.clear()
        self._cache.clear()

    def _conversation(self, messages: list[Message]) -> list[Message]:
        system = [{"role": "system", "content": [{"type": "text", "text": self.system}]}] if self.system else []
        return system + messages

    def _pictures_of(self, messages: list[Message]) -> list[_Picture]:
        return [self._pictures[item["path"]] for m in messages for item in _items(m) if item.get("type") == "image"]

    def _prepare(self, messages: list[Message]) -> tuple[str, list[_Picture], list[int]]:
        """The rendered prompt of the whole conversation, its pictures, and its token ids (each image tag expanded
        to its image's tokens: no image is preprocessed again)."""
        prompt = self.checkpoint.prompt.format.render(self._conversation(messages))
        pictures = self._pictures_of(messages)
        processor = self.checkpoint.processor
        ids = expand_image_tokens(tokenize(processor, prompt), image_token_id(processor),
                                  [picture.image_tokens for picture in pictures])
        if ids is None:
            raise UsageError("the prompt format rendered another number of image tags than there are images")
        return prompt, pictures, ids

    def _context_limit(self) -> int | None:
        text = self.checkpoint.config.text_config
        return getattr(text, "max_position_embeddings", None)

    def _fit(self, messages: list[Message]) -> tuple[list[Message], int, tuple[str, list[_Picture], list[int]]]:
        """Drop the oldest exchanges until the prompt and the answer fit the model's context; returns the
        messages kept, how many exchanges were dropped, and the prepared prompt."""
        limit = self._context_limit()
        dropped = 0
        while True:
            prepared = self._prepare(messages)
            if limit is None or len(prepared[2]) + self.plan.options.max_new_tokens <= limit:
                return messages, dropped, prepared
            user_turns = [i for i, m in enumerate(messages) if m["role"] == "user"]
            if len(user_turns) <= 1:
                raise UsageError(f"this turn alone does not fit the model's context of {limit} tokens",
                                 hint="use fewer or smaller images, a shorter message, or a lower --max-new-tokens")
            messages = messages[user_turns[1]:]
            dropped += 1

    def _uses_cache(self, prompt: str, pictures: list[_Picture], ids: list[int]) -> bool:
        """Whether this turn continues from the conversation's cache: in greedy and sampled decoding (beam search
        keeps a cache per beam), and once the ids built here proved equal to the processor's own (checked on the
        first prompt with images, once for all the conversations of a server; where they differ, every turn runs
        whole, as the processor prepares it)."""
        if not self.plan.keep_chat_cache or not self._cache_usable:
            return False
        if len(image_token_runs(ids, image_token_id(self.checkpoint.processor))) != len(pictures):
            return False  # two image tags rendered side by side: which tokens are whose is not known here
        if pictures and not self._ids_checked:
            proven = getattr(self.cache_pool, "ids_proven", None)  # a server checks once for all its conversations
            if proven is None:
                inputs = prepare_inputs(self.checkpoint.processor, [prompt], [[picture.image for picture in pictures]])
                proven = inputs["input_ids"][0].tolist() == ids
                if self.cache_pool is not None:
                    self.cache_pool.ids_proven = proven
            self._ids_checked = True
            self._cache_usable = proven
        return self._cache_usable

    def continue_from(self, messages: list[Message]) -> None:
        """Take up a conversation given whole (a server's request): its system message, its turns (their images read
        now, by the names `fetching` knows them by)."""
        self.reset()
        for message in messages:
            if message["role"] == "system":
                self.system = "".join(item.get("text", "") for item in _items(message) if item.get("type") == "text")
                continue
            for item in _items(message):
                if item.get("type") == "image":
                    item["sha256"] = self._picture(item["path"]).sha256
            self.messages.append(message)

    def send(self, text: str, on_text: Callable[[str], None] | None = None,
             cancelled: threading.Event | None = None, constraint: Any = None) -> ChatReply:
        """Add a user turn (with the pending images), generate the answer from the whole history, keep both.
        If generation is interrupted (KeyboardInterrupt, or `cancelled` set: it stops after the current step), the
        history is left as it was before the turn (Cancelled is raised for the latter). When the oldest exchanges are
        dropped to fit the model's context, an InputWarning says how many."""
        content = [*self.pending, {"type": "text", "text": text}]
        candidate = [*self.messages, {"role": "user", "content": content}]
        candidate, dropped, (prompt, pictures, ids) = self._fit(candidate)
        # The turn's own random stream (sampling with --seed): the same conversation gives the same answers.
        seed = self.plan.seed_for("chat", sum(1 for message in candidate if message["role"] == "user"))
        if self.cache_pool is not None:
            self._cache = self.cache_pool.take(ids)
        try:
            if self._uses_cache(prompt, pictures, ids):
                result = self._cache.generate(self.checkpoint, ids, [picture.tensors for picture in pictures],
                                              [picture.sha256 for picture in pictures], self.plan, on_text=on_text,
                                              seed=seed, cancelled=cancelled, constraint=constraint)
                reused = self._cache.reused
            else:
                images = [picture.image for picture in pictures]
                [result] = generate(self.checkpoint, [prompt], [images], self.plan, on_text=on_text, seed=seed,
                                    cancelled=cancelled, constraint=constraint)
                reused = 0
        except Exception as error:
            if not is_out_of_memory(error):
                raise
            release_memory()
            raise InputError(TURN_OUT_OF_MEMORY) from error
        if result.error == OUT_OF_MEMORY:  # even alone
            raise InputError(TURN_OUT_OF_MEMORY)
        if cancelled is not None and cancelled.is_set():  # cut short: not an answer to keep
            self._cache.clear()
            raise Cancelled()
        if self.cache_pool is not None and self._cache.cache is not None:
            self.cache_pool.give(self._cache)  # for the next request that begins like this one
        if dropped:
            warnings.warn(f"the conversation outgrew the model's context: dropped the oldest {dropped} exchange(s)",
                          InputWarning, stacklevel=2)
        candidate.append({"role": "assistant", "content": [{"type": "text", "text": result.text}]})
        self.messages = candidate
        self.pending = []
        self._forget_unused_pictures()
        return ChatReply(result.text, result.new_tokens, dropped, reused, result.prompt_tokens, result.seconds,
                         prompt_length=len(ids), data=result.data, error=result.error)

    def _forget_unused_pictures(self) -> None:
        """Keep the tensors of the images still in the conversation only."""
        used = {item["path"] for m in self.messages for item in _items(m) if item.get("type") == "image"}
        used |= {item["path"] for item in self.pending}
        for source in [source for source in self._pictures if source not in used]:
            del self._pictures[source]

    # -- transcripts ----------------------------------------------------------------------------------------
    def transcript(self, settings: dict[str, Any]) -> dict[str, Any]:
        messages = self._conversation(self.messages)
        return {"model": self.checkpoint.model_id, "settings": settings, "messages": messages}

    def save(self, path: Path, settings: dict[str, Any]) -> None:
        try:
            write_atomically(Path(path), json.dumps(self.transcript(settings), indent=2, ensure_ascii=False) + "\n")
        except OSError as exc:
            raise UsageError(f"cannot save to {path}: {exc.strerror or exc}") from exc

    def load(self, path: Path) -> list[str]:
        """Restore a saved conversation; returns warnings (a missing image is dropped, a changed one is used as
        it is now)."""
        text = read_text(path, "transcript")
        try:
            data = json.loads(text)
        except ValueError as exc:
            raise UsageError(f"cannot read transcript {path}: {exc}") from exc
        messages = data.get("messages") if isinstance(data, dict) else None
        if not isinstance(messages, list) or not all(isinstance(m, dict) and m.get("role") in
                                                     ("system", "user", "assistant") for m in messages):
            raise UsageError(f"{path} is not a llava chat transcript (no valid \"messages\" list)")
        warnings = []
        if data.get("model") and data["model"] != self.checkpoint.model_id:
            warnings.append(f"the transcript was made with {data['model']}, now talking to {self.checkpoint.model_id}")
        restored: list[Message] = []
        system = None
        for message in messages:
            if message["role"] == "system":
                system = "".join(i.get("text", "") for i in _items(message) if i.get("type") == "text")
                continue
            items = []
            for item in _items(message):
                if item.get("type") != "image":
                    items.append(item)
                    continue
                source = item.get("path", "")
                try:
                    picture = self._picture(source)
                except InputError as exc:
                    warnings.append(f"image {source} cannot be read ({exc.message}); dropped from the conversation")
                    continue
                if item.get("sha256") and item["sha256"] != picture.sha256:
                    warnings.append(f"image {source} has changed since the transcript was saved; using it as it is now")
                items.append({"type": "image", "path": source, "sha256": picture.sha256})
            restored.append({"role": message["role"], "content": items})
        self.messages = restored
        self.system = system
        self.pending = []
        self._cache.clear()
        return warnings


def _items(message: Message) -> list[dict[str, Any]]:
    content = message.get("content", [])
    return [{"type": "text", "text": content}] if isinstance(content, str) else list(content)
