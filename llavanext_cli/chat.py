"""A multi-turn conversation about images: history in the Hugging Face chat format, rendered in full every turn
with the resolved prompt format, oldest turns dropped (and reported) when the context overflows, and transcripts
that save and load."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image

from llavanext_cli.checkpoint import Checkpoint
from llavanext_cli.errors import InputError, UsageError
from llavanext_cli.generation import GenerationOptions, generate
from llavanext_cli.images import ImageFetching, image_from_bytes, is_url, load_image
from llavanext_cli.preprocessing import prepare_inputs

Message = dict[str, Any]


@dataclass
class ChatReply:
    text: str
    new_tokens: int
    dropped_turns: int = 0


@dataclass
class _Picture:
    image: Image.Image
    sha256: str


def _sha256_of_path(source: str, fetching: ImageFetching) -> tuple[bytes | None, str]:
    if is_url(source):
        data = fetching.fetch(source)
        return data, hashlib.sha256(data).hexdigest()
    try:
        data = Path(source).read_bytes()
    except FileNotFoundError:
        raise InputError("no such file") from None
    except IsADirectoryError:
        raise InputError("is a directory") from None
    except PermissionError:
        raise InputError("permission denied") from None
    return data, hashlib.sha256(data).hexdigest()


@dataclass
class ChatSession:
    """The conversation state. Images attached with `attach` go with the next user turn."""

    checkpoint: Checkpoint
    options: GenerationOptions
    fetching: ImageFetching = field(default_factory=ImageFetching)
    system: str | None = None
    messages: list[Message] = field(default_factory=list)
    pending: list[dict[str, Any]] = field(default_factory=list)
    _pictures: dict[str, _Picture] = field(default_factory=dict)

    # -- images ---------------------------------------------------------------------------------------------
    def _picture(self, source: str) -> _Picture:
        data, digest = _sha256_of_path(source, self.fetching)
        image = image_from_bytes(data, source) if is_url(source) else load_image(source)
        picture = _Picture(image, digest)
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

    def _conversation(self, messages: list[Message]) -> list[Message]:
        system = [{"role": "system", "content": [{"type": "text", "text": self.system}]}] if self.system else []
        return system + messages

    def _prepare(self, messages: list[Message]) -> tuple[str, list[Image.Image], Any]:
        """The rendered prompt of the whole conversation, its images, and the processor's tensors."""
        prompt = self.checkpoint.prompt.format.render(self._conversation(messages))
        images = [self._pictures[item["path"]].image for m in messages for item in _items(m)
                  if item.get("type") == "image"]
        return prompt, images, prepare_inputs(self.checkpoint, [prompt], [images])

    def _context_limit(self) -> int | None:
        text = self.checkpoint.config.text_config
        return getattr(text, "max_position_embeddings", None)

    def _fit(self, messages: list[Message]) -> tuple[list[Message], int, tuple[str, list[Image.Image], Any]]:
        """Drop the oldest exchanges until the prompt and the answer fit the model's context; returns the
        messages kept, how many exchanges were dropped, and the prepared prompt (each turn is prepared once)."""
        limit = self._context_limit()
        dropped = 0
        while True:
            prepared = self._prepare(messages)
            if limit is None or prepared[2]["input_ids"].shape[1] + self.options.max_new_tokens <= limit:
                return messages, dropped, prepared
            user_turns = [i for i, m in enumerate(messages) if m["role"] == "user"]
            if len(user_turns) <= 1:
                raise UsageError(f"this turn alone does not fit the model's context of {limit} tokens",
                                 hint="use fewer or smaller images, a shorter message, or a lower --max-new-tokens")
            messages = messages[user_turns[1]:]
            dropped += 1

    def send(self, text: str, on_text: Callable[[str], None] | None = None) -> ChatReply:
        """Add a user turn (with the pending images), generate the answer from the whole history, keep both.
        If generation is interrupted (KeyboardInterrupt), the history is left as it was before the turn."""
        content = [*self.pending, {"type": "text", "text": text}]
        candidate = [*self.messages, {"role": "user", "content": content}]
        candidate, dropped, (prompt, images, inputs) = self._fit(candidate)
        [result] = generate(self.checkpoint, [prompt], [images], self.options, on_text=on_text, inputs=inputs)
        candidate.append({"role": "assistant", "content": [{"type": "text", "text": result.text}]})
        self.messages = candidate
        self.pending = []
        return ChatReply(result.text, result.new_tokens, dropped)

    # -- transcripts ----------------------------------------------------------------------------------------
    def transcript(self, settings: dict[str, Any]) -> dict[str, Any]:
        messages = self._conversation(self.messages)
        return {"model": self.checkpoint.model_id, "settings": settings, "messages": messages}

    def save(self, path: Path, settings: dict[str, Any]) -> None:
        path = Path(path)
        temporary = path.with_name(f".{path.name}.tmp")
        try:
            temporary.write_text(json.dumps(self.transcript(settings), indent=2, ensure_ascii=False) + "\n",
                                 encoding="utf-8")
            temporary.replace(path)
        except OSError as exc:
            temporary.unlink(missing_ok=True)
            raise UsageError(f"cannot save to {path}: {exc.strerror or exc}") from None

    def load(self, path: Path) -> list[str]:
        """Restore a saved conversation; returns warnings (a missing image is dropped, a changed one is used as
        it is now)."""
        try:
            data = json.loads(Path(path).read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise UsageError(f"transcript not found: {path}") from None
        except (OSError, ValueError) as exc:
            raise UsageError(f"cannot read transcript {path}: {exc}") from None
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
        return warnings


def _items(message: Message) -> list[dict[str, Any]]:
    content = message.get("content", [])
    return [{"type": "text", "text": content}] if isinstance(content, str) else list(content)
