"""The CLI's side of `--server URL`: caption, ask, classify and chat send their work to a running `llava serve` (the
images as bytes) instead of loading a model. What stays here makes the run the local run's: the inputs, the run plan
(resume, outputs, refusals), each record rebuilt for its job (its extra keys, its truth), the order, the exit code.
Standard library only: a client run imports no torch."""

from __future__ import annotations

import base64
import hashlib
import json
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from llavanext_cli.errors import InputError, SetupError, UsageError
from llavanext_cli.io.records import NO_DATA, Answer, Classification, Record, Subject

IN_FLIGHT = 4  # requests sent at once (the server answers those that arrive together in one batch)


class ServerClient:
    """Requests to one server, its errors as the tool's: a refusal (4xx) is a UsageError with the server's message,
    a server that cannot be reached or fails (5xx) a SetupError (exit 3)."""

    def __init__(self, url: str, api_key: str | None = None, timeout: float = 3600.0):
        self.url = url.rstrip("/")
        self.api_key = api_key
        self.timeout = timeout

    def _request(self, path: str, body: dict[str, Any] | None = None) -> Any:
        headers = {"content-type": "application/json"}
        if self.api_key:
            headers["authorization"] = f"Bearer {self.api_key}"
        data = json.dumps(body).encode() if body is not None else None
        request = urllib.request.Request(self.url + path, data=data, headers=headers,
                                         method="POST" if body is not None else "GET")
        try:
            return urllib.request.urlopen(request, timeout=self.timeout)
        except urllib.error.HTTPError as error:
            message = _error_message(error)
            if error.code < 500:
                raise UsageError(f"the server refused: {message}", hint=f"the server at {self.url}") from None
            raise SetupError(f"the server failed: {message}") from None
        except (urllib.error.URLError, OSError) as error:
            reason = getattr(error, "reason", error)
            raise SetupError(f"cannot reach a llava server at {self.url}: {reason}",
                             hint="start one with `llava serve`, or drop --server / LLAVA_SERVER") from None

    def get(self, path: str) -> Any:
        with self._request(path) as response:
            return json.loads(response.read())

    def post(self, path: str, body: dict[str, Any]) -> Any:
        with self._request(path, body) as response:
            return json.loads(response.read())

    def stream(self, path: str, body: dict[str, Any]) -> Iterator[dict[str, Any]]:
        """The events of a streamed chat completion."""
        with self._request(path, body) as response:
            for raw in response:
                line = raw.decode("utf-8").strip()
                if not line.startswith("data: "):
                    continue
                payload = line[6:]
                if payload == "[DONE]":
                    return
                event = json.loads(payload)
                if "error" in event:
                    raise SetupError(f"the server failed: {event['error'].get('message')}")
                yield event


def _error_message(error: urllib.error.HTTPError) -> str:
    try:
        return json.loads(error.read())["error"]["message"]
    except (ValueError, KeyError, TypeError):
        return f"HTTP {error.code}"


def _image(source: str, fetching: Any) -> dict[str, Any] | str:
    """A local input as the server takes it (bytes, named as the user named it), or why it cannot be read."""
    try:
        data = fetching.read_bytes(source)
    except InputError as error:
        return error.message
    return {"data": base64.b64encode(data).decode("ascii"), "name": source}


class RemoteModel:
    """What a command runs on with --server: the methods of api.Model it uses, done by the server."""

    local = False

    def __init__(self, url: str, settings: Any, api_key: str | None = None):
        self.settings = settings
        self.client = ServerClient(url, api_key)
        self.name = url
        self.checkpoint = None

    def open(self) -> RemoteModel:
        """Reach the server now (exit 3 if it is not there); the model is the one it serves."""
        health = self.client.get("/health")
        self.name = health.get("model", self.name)
        return self

    def check_answering(self, schema: Any = None, **generation: Any) -> tuple[Any, int, Any]:
        if schema is None:
            return None, self.settings.batch_size, None
        from llavanext_cli.api.model import load_answer_schema

        return None, self.settings.batch_size, load_answer_schema(schema)  # a bad schema: exit 2 here already

    def _generation(self) -> dict[str, Any]:
        settings = self.settings
        values = {"max_new_tokens": settings.max_new_tokens, "temperature": settings.temperature,
                  "top_p": settings.top_p}
        if settings.seed is not None:
            values["seed"] = settings.seed
        return values

    def answer(self, jobs: Sequence[Any], *, schema: Any = None, on_text: Callable[[str], None] | None = None,
               **_: Any) -> Iterator[Record]:
        """caption / ask jobs, each image's questions in one request (their prefix shared there), records in order."""
        from llavanext_cli.io.images import ImageFetching

        fetching = ImageFetching.from_settings(self.settings)
        schema_json = schema.schema if schema is not None else None
        units: list[list[Any]] = []
        for job in jobs:  # consecutive questions about the same images go together, as the CLI orders them
            if units and units[-1][0].subject == job.subject:
                units[-1].append(job)
            else:
                units.append([job])

        def ask(unit: list[Any]) -> list[Record]:
            subject = unit[0].subject
            images = [_image(source, fetching) for source in subject.images]
            unreadable = [(source, why) for source, why in zip(subject.images, images) if isinstance(why, str)]
            if unreadable:
                source, why = unreadable[0]
                return [job.failure(f"{source}: {why}" if subject.together else why) for job in unit]
            reply = self.client.post("/v1/ask", {"images": images, "questions": [job.prompt for job in unit],
                                                 "together": subject.together, "schema": schema_json,
                                                 **self._generation()})
            return [self._answer(job, record) for job, record in zip(unit, reply["records"])]

        yield from _in_order(ask, units)

    def _answer(self, job: Any, record: dict[str, Any]) -> Record:
        if "error" in record:
            return job.failure(record["error"])
        return Answer(job.subject, job.prompt, record["text"], record["model"], record["new_tokens"],
                      record["seconds"], job.extra, data=record.get("data", NO_DATA))

    def classify_jobs(self, jobs: Sequence[Any], labels: Sequence[str], question: str, *,
                      normalize: str | None = None, batch_size: int | None = None, **_: Any) -> Iterator[Record]:
        from llavanext_cli.io.images import ImageFetching

        fetching = ImageFetching.from_settings(self.settings)
        size = max(1, batch_size or self.settings.batch_size)
        chunks = [list(jobs[start:start + size]) for start in range(0, len(jobs), size)]

        def classify(chunk: list[Any]) -> list[Record]:
            images = [_image(job.subject.images[0], fetching) for job in chunk]
            readable = [(job, image) for job, image in zip(chunk, images) if not isinstance(image, str)]
            results: dict[int, Record] = {id(job): job.failure(image) for job, image in zip(chunk, images)
                                          if isinstance(image, str)}
            if readable:
                reply = self.client.post("/v1/classify", {"images": [image for _, image in readable],
                                                          "labels": list(labels), "prompt": question,
                                                          "normalize": normalize or self.settings.normalize})
                for (job, _), record in zip(readable, reply["records"]):
                    results[id(job)] = (job.failure(record["error"]) if "error" in record else
                                        Classification(job.subject, record["label"], record["scores"],
                                                       record["model"], truth=job.truth))
            return [results[id(job)] for job in chunk]

        yield from _in_order(classify, chunks)

    def chat(self, system: str | None = None, **_: Any) -> RemoteChat:
        return RemoteChat(self, system)


def _in_order(work: Callable[[Any], list[Record]], units: list[Any]) -> Iterator[Record]:
    """work(unit) for each unit, IN_FLIGHT at once, their records in the units' order."""
    with ThreadPoolExecutor(max_workers=IN_FLIGHT, thread_name_prefix="llava-client") as pool:
        pending = [pool.submit(work, unit) for unit in units[:IN_FLIGHT]]
        for position in range(len(units)):
            records = pending[position].result()
            if position + IN_FLIGHT < len(units):
                pending.append(pool.submit(work, units[position + IN_FLIGHT]))
            yield from records


class _Reply:
    def __init__(self, text: str, new_tokens: int, prompt_tokens: int, seconds: float = 0.0):
        self.text, self.new_tokens, self.prompt_tokens, self.seconds = text, new_tokens, prompt_tokens, seconds


class RemoteChat:
    """A conversation held here (its messages, its images' paths and digests, its transcript) and answered by the
    server, which renders it with the checkpoint's prompt format and reuses its cached prefix turn after turn."""

    def __init__(self, model: RemoteModel, system: str | None):
        from llavanext_cli.io.images import ImageFetching

        self.model = model
        self.system = system
        self.messages: list[dict[str, Any]] = []
        self.pending: list[dict[str, Any]] = []
        self.prompt_format = "the server's"
        self.fetching = ImageFetching.from_settings(model.settings)
        self._bytes: dict[str, bytes] = {}

    def attach(self, source: str) -> str:
        data = self.fetching.read_bytes(source)
        self._bytes[source] = data
        self.pending.append({"type": "image", "path": source, "sha256": hashlib.sha256(data).hexdigest()})
        return source

    def reset(self) -> None:
        self.messages, self.pending = [], []

    def _openai(self, message: dict[str, Any]) -> dict[str, Any]:
        parts: list[dict[str, Any]] = []
        for item in message["content"]:
            if item["type"] == "image":
                data = self._bytes.get(item["path"]) or self.fetching.read_bytes(item["path"])
                self._bytes[item["path"]] = data
                parts.append({"type": "image_url", "image_url": {
                    "url": "data:application/octet-stream;base64," + base64.b64encode(data).decode("ascii")}})
            else:
                parts.append({"type": "text", "text": item["text"]})
        return {"role": message["role"], "content": parts}

    def send(self, text: str, on_text: Callable[[str], None] | None = None) -> _Reply:
        turn = {"role": "user", "content": [*self.pending, {"type": "text", "text": text}]}
        system = [{"role": "system", "content": self.system}] if self.system else []
        settings = self.model.settings
        body: dict[str, Any] = {"model": self.model.name, "messages": system + [self._openai(m) for m in
                                                                                 [*self.messages, turn]],
                                "max_tokens": settings.max_new_tokens, "temperature": settings.temperature,
                                "top_p": settings.top_p}
        if settings.seed is not None:
            body["seed"] = settings.seed
        if on_text is None:
            reply = self.model.client.post("/v1/chat/completions", body)
            answer = reply["choices"][0]["message"]["content"]
            usage = reply.get("usage", {})
        else:
            pieces, usage = [], {}
            for event in self.model.client.stream("/v1/chat/completions", {
                    **body, "stream": True, "stream_options": {"include_usage": True}}):
                if event.get("usage"):
                    usage = event["usage"]
                for choice in event.get("choices", []):
                    piece = choice.get("delta", {}).get("content")
                    if piece:
                        pieces.append(piece)
                        on_text(piece)
            answer = "".join(pieces)
        self.messages += [turn, {"role": "assistant", "content": [{"type": "text", "text": answer}]}]
        self.pending = []
        return _Reply(answer, usage.get("completion_tokens", 0), usage.get("prompt_tokens", 0))

    def save(self, path: str) -> None:
        from llavanext_cli.io.writers import write_atomically

        system = [{"role": "system", "content": [{"type": "text", "text": self.system}]}] if self.system else []
        write_atomically(Path(path), json.dumps({"model": self.model.name, "settings": {"server": self.model.client.url},
                                                 "messages": system + self.messages}, indent=2,
                                                ensure_ascii=False) + "\n")

    def load(self, path: str) -> list[str]:
        from llavanext_cli.io.textfiles import read_text

        try:
            data = json.loads(read_text(path, "transcript"))
        except ValueError as exc:
            raise UsageError(f"cannot read transcript {path}: {exc}") from exc
        messages = data.get("messages") if isinstance(data, dict) else None
        if not isinstance(messages, list):
            raise UsageError(f"{path} is not a llava chat transcript (no valid \"messages\" list)")
        self.system = next(("".join(i.get("text", "") for i in m["content"]) for m in messages
                            if m.get("role") == "system"), None)
        self.messages = [m for m in messages if m.get("role") in ("user", "assistant")]
        self.pending = []
        return []
