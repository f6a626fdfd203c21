"""`llava serve`'s HTTP side (Starlette on uvicorn): OpenAI's chat completions and models, the native caption / ask /
classify routes that answer with the CLI's records, and what the server refuses.

Every refusal is OpenAI's error envelope, `{"error": {"message", "type", "param", "code"}}`, with the tool's own
message: an exception's text never reaches a client (an unexpected one is logged here and answered "internal
error"). A key, when set, is asked of every route but /health (401). Bodies, images and pixels are capped (413), the
queue is bounded (429 with Retry-After), and a client that goes away frees its slot at once.
"""

from __future__ import annotations

import asyncio
import base64
import hmac
import json
import re
import sys
import time
import traceback
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from llavanext_cli.errors import Cancelled, LlavaError
from llavanext_cli.serve.media import MediaError, MediaPolicy
from llavanext_cli.serve.scheduler import Scheduler, Work


@dataclass
class ServerLimits:
    max_body: int = 32 * 2**20
    max_images: int = 8
    max_new_tokens: int = 8192


class Refused(Exception):
    """A request the server refuses: its status, message and OpenAI error type/code."""

    def __init__(self, status: int, message: str, code: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.code, self.headers = status, message, code, headers or {}


def error_response(status: int, message: str, code: str | None = None, headers: dict[str, str] | None = None
                   ) -> JSONResponse:
    kind = {401: "authentication_error", 404: "invalid_request_error", 413: "invalid_request_error",
            429: "rate_limit_error"}.get(status, "invalid_request_error" if status < 500 else "server_error")
    return JSONResponse({"error": {"message": message, "type": kind, "param": None, "code": code}}, status_code=status,
                        headers=headers)


@dataclass
class Server:
    """What the routes share: the model's names, the scheduler, the limits, the media policy, the key."""

    names: list[str]
    scheduler: Scheduler
    policy: MediaPolicy
    limits: ServerLimits = field(default_factory=ServerLimits)
    api_key: str | None = None
    started: float = field(default_factory=time.time)

    # -- the parts of every request -------------------------------------------------------------------------------
    def check_key(self, request: Request) -> None:
        if self.api_key is None:
            return
        given = request.headers.get("authorization", "")
        token = given[7:] if given.lower().startswith("bearer ") else ""
        if not hmac.compare_digest(token.encode(), self.api_key.encode()):
            raise Refused(401, "a valid API key is needed: Authorization: Bearer KEY (the server's --api-key)",
                          "invalid_api_key")

    async def body(self, request: Request) -> dict[str, Any]:
        length = request.headers.get("content-length", "")
        if length.isdigit() and int(length) > self.limits.max_body:
            raise Refused(413, f"the request is larger than the server's limit of {self.limits.max_body:,} bytes")
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > self.limits.max_body:
                raise Refused(413, f"the request is larger than the server's limit of {self.limits.max_body:,} bytes")
            chunks.append(chunk)
        try:
            data = json.loads(b"".join(chunks) or b"null")
        except ValueError:
            raise Refused(400, "the request body is not JSON") from None
        if not isinstance(data, dict):
            raise Refused(400, "the request body must be a JSON object")
        return data

    def check_model(self, body: dict[str, Any], required: bool) -> str:
        name = body.get("model")
        if name is None and not required:
            return self.names[0]
        if name is None:
            raise Refused(400, f"model is required: this server serves {', '.join(self.names)}", "missing_model")
        if name not in self.names:
            raise Refused(404, f"model {name!r} is not served here; this server serves {', '.join(self.names)} "
                               "(it never downloads another)", "model_not_found")
        return name

    def image(self, given: Any, count: list[int], in_memory: dict[str, Any], tag: str, name: str | None = None,
              strict: bool = True) -> str:
        """An image of the request (an OpenAI image_url, or a native route's {"url"} / {"data", "name"}), read and
        checked; the name it goes by (the client's own, or <image N>). Not `strict` (the native routes), an image
        that does not decode is left to the engine, whose record says why, as the CLI's would."""
        count[0] += 1
        if count[0] > self.limits.max_images:
            raise Refused(413, f"a request may carry {self.limits.max_images} images at the most")
        if isinstance(given, dict) and "data" in given:
            try:
                data = base64.b64decode(str(given["data"]), validate=True)
            except ValueError:
                raise Refused(400, "an image's \"data\" is not valid base64") from None
            try:
                self.policy.check_image(data)
            except MediaError as error:
                if strict or error.status != 400:
                    raise
            name = given.get("name") if isinstance(given.get("name"), str) and given.get("name") else name
        else:
            url = given.get("url") if isinstance(given, dict) else given
            data = self.policy.image_bytes(url)
        shown = name or f"<image {count[0] - 1}>"
        in_memory[f"{tag}{shown}"] = data
        return f"{tag}{shown}"

    def generation(self, body: dict[str, Any], openai: bool) -> dict[str, Any]:
        """The generation settings a request gives (checked again by the model, as a call's are)."""
        settings: dict[str, Any] = {}
        tokens = body.get("max_completion_tokens", body.get("max_tokens")) if openai else body.get("max_new_tokens")
        if tokens is not None:
            if not isinstance(tokens, int) or isinstance(tokens, bool) or not 1 <= tokens <= self.limits.max_new_tokens:
                raise Refused(400, f"max_tokens must be an integer from 1 to {self.limits.max_new_tokens}")
            settings["max_new_tokens"] = tokens
        for key in ("temperature", "top_p", "seed"):
            if body.get(key) is not None:
                settings[key] = body[key]
        stop = body.get("stop")
        if stop is not None:
            stops = [stop] if isinstance(stop, str) else stop
            if not isinstance(stops, list) or len(stops) > 4 or not all(isinstance(s, str) and s for s in stops):
                raise Refused(400, "stop must be a text or a list of at most 4 texts")
            settings["stop"] = stops
        return settings

    def submit(self, work: Work) -> None:
        """Queue the work, or refuse it (429) when --max-queue requests already wait or run."""
        if not self.scheduler.submit(work):
            raise Refused(429, f"the server is busy ({self.scheduler.max_queue} requests waiting or running); try "
                               "again in a moment", "queue_full", headers={"Retry-After": "1"})

    async def run(self, request: Request, work: Work) -> Any:
        """Queue the work, wait for it; a client that goes away gives it up (its slot is free at once)."""
        self.submit(work)
        waiting = asyncio.wrap_future(work.future)
        while True:
            done, _ = await asyncio.wait({waiting}, timeout=0.05)
            if done:
                return waiting.result()
            if await request.is_disconnected():
                self.scheduler.give_up(work)
                raise Cancelled()


def _schema_of(response_format: Any) -> Any:
    """OpenAI's response_format as a JSON Schema for --schema's machinery (None for text)."""
    if response_format is None:
        return None
    if not isinstance(response_format, dict):
        raise Refused(400, "response_format must be an object")
    kind = response_format.get("type")
    if kind == "text":
        return None
    if kind == "json_object":
        return {"type": "object"}
    if kind == "json_schema":
        schema = (response_format.get("json_schema") or {}).get("schema")
        if not isinstance(schema, dict):
            raise Refused(400, "response_format.json_schema.schema must be a JSON Schema object")
        return schema
    raise Refused(400, f"response_format type {kind!r} is not one this server enforces (text, json_object, "
                       "json_schema)")


def _checked_schema(schema: Any) -> Any:
    from llavanext_cli.api.model import load_answer_schema

    return load_answer_schema(schema)  # UsageError (400) for a schema that is invalid or cannot be enforced


async def chat_completions(request: Request) -> Response:
    server: Server = request.app.state.server
    server.check_key(request)
    body = await server.body(request)
    name = server.check_model(body, required=True)
    if body.get("n", 1) != 1:
        raise Refused(400, "n must be 1: this server answers each request once")
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise Refused(400, "messages must be a non-empty list")
    tag, count, in_memory = f"<{uuid.uuid4().hex[:8]}>", [0], {}
    # Reading the images (base64, a file, a URL's hops within their deadline) happens off the event loop, which keeps
    # serving the other requests and streams meanwhile.
    converted = await asyncio.to_thread(lambda: [_message(server, message, count, in_memory, tag)
                                                 for message in messages])
    if converted[-1]["role"] != "user":
        raise Refused(400, "the last message must be the user's")
    schema = _checked_schema(_schema_of(body.get("response_format")))
    generation = server.generation(body, openai=True)
    generation.setdefault("max_new_tokens", server.scheduler.model.settings.max_new_tokens)
    stream = bool(body.get("stream"))
    text = "\n".join(item["text"] for item in converted[-1]["content"] if item["type"] == "text")
    images = [item["path"] for item in converted[-1]["content"] if item["type"] == "image"]
    if not text.strip():
        raise Refused(400, "the last user message has no text")
    completion = f"chatcmpl-{uuid.uuid4().hex}"
    if len(converted) == 1 and not stream:  # one user turn: answered with the requests that arrive with it
        from llavanext_cli.io.questions import PromptJob
        from llavanext_cli.io.records import Subject

        subject = Subject(tuple(images), together=len(images) != 1)
        work = Work("answer", jobs=[PromptJob(subject, text)], generation=generation, schema=schema,
                    in_memory=in_memory, messages=converted, text=text)
        result = await server.run(request, work)
        if not isinstance(result, list):  # it arrived alone and ran as a conversation (its prefix kept)
            return _completion(completion, name, result.text, result, generation)
        [record] = result
        if not record.ok and "data" not in record.to_json():
            if getattr(record, "error", "").startswith("answer cut at"):
                return _completion(completion, name, "", record, generation)
            raise Refused(400, _untagged(record.error, tag))
        return _completion(completion, name, record.text, record, generation)
    work = Work("conversation", messages=converted, text=text, generation=generation, schema=schema,
                in_memory=in_memory)
    if not stream:
        reply = await server.run(request, work)
        return _completion(completion, name, reply.text, reply, generation)
    return await _stream(request, server, work, completion, name, body, generation)


def _message(server: Server, message: Any, count: list[int], in_memory: dict[str, Any], tag: str) -> dict[str, Any]:
    """An OpenAI message in the Hugging Face chat format the prompt formats render (a turn's images before its
    text, as the CLI puts them)."""
    if not isinstance(message, dict) or message.get("role") not in ("system", "user", "assistant"):
        raise Refused(400, "each message needs a role: system, user or assistant")
    content = message.get("content")
    parts = [{"type": "text", "text": content}] if isinstance(content, str) else content
    if not isinstance(parts, list):
        raise Refused(400, "a message's content must be a text or a list of parts")
    texts, images = [], []
    for part in parts:
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text" and isinstance(part.get("text"), str):
            texts.append(part["text"])
        elif kind == "image_url" and message["role"] == "user":
            images.append({"type": "image", "path": server.image(part.get("image_url"), count, in_memory, tag)})
        else:
            raise Refused(400, f"a message part of type {kind!r} is not one this server takes (text, image_url in a "
                               "user message)")
    return {"role": message["role"], "content": [*images, {"type": "text", "text": "\n".join(texts)}]}


def _completion(completion: str, name: str, text: str, result: Any, generation: dict[str, Any]) -> JSONResponse:
    return JSONResponse({
        "id": completion, "object": "chat.completion", "created": int(time.time()), "model": name,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                     "finish_reason": _finish(result, generation)}],
        "usage": _usage(result),
    })


def _usage(result: Any) -> dict[str, Any]:
    """OpenAI's usage of a reply or record; `cached_tokens`, the prompt tokens a conversation took from the cached
    prefix of an earlier request instead of running them again."""
    new = getattr(result, "new_tokens", 0)
    prompt = getattr(result, "prompt_length", 0) or getattr(result, "prompt_tokens", 0)
    return {"prompt_tokens": prompt, "completion_tokens": new, "total_tokens": prompt + new,
            "prompt_tokens_details": {"cached_tokens": getattr(result, "reused_tokens", 0)}}


def _finish(result: Any, generation: dict[str, Any]) -> str:
    error = getattr(result, "error", None)
    if error and error.startswith("answer cut at"):
        return "length"
    limit = generation.get("max_new_tokens")
    return "length" if limit is not None and getattr(result, "new_tokens", 0) >= limit else "stop"


async def _stream(request: Request, server: Server, work: Work, completion: str, name: str, body: dict[str, Any],
                  generation: dict[str, Any]) -> Response:
    loop = asyncio.get_running_loop()
    pieces: asyncio.Queue[Any] = asyncio.Queue()
    work.on_text = lambda piece: loop.call_soon_threadsafe(pieces.put_nowait, piece)
    server.submit(work)
    work.future.add_done_callback(lambda _: loop.call_soon_threadsafe(pieces.put_nowait, None))
    usage = bool((body.get("stream_options") or {}).get("include_usage"))
    created = int(time.time())

    def chunk(delta: dict[str, Any], finish: str | None = None, **extra: Any) -> str:
        return "data: " + json.dumps({"id": completion, "object": "chat.completion.chunk", "created": created,
                                      "model": name, "choices": [{"index": 0, "delta": delta,
                                                                  "finish_reason": finish}], **extra}) + "\n\n"

    async def events() -> Any:
        try:
            yield chunk({"role": "assistant", "content": ""})
            while (piece := await pieces.get()) is not None:
                yield chunk({"content": piece})
            error = work.future.exception()
            if error is not None:
                message = error.message if isinstance(error, LlavaError) else "internal error; see the server's log"
                if not isinstance(error, (LlavaError, Cancelled)):
                    traceback.print_exception(error, file=sys.stderr)
                yield "data: " + json.dumps({"error": {"message": message, "type": "server_error", "param": None,
                                                       "code": None}}) + "\n\n"
            else:
                reply = work.future.result()
                yield chunk({}, _finish(reply, generation))
                if usage:
                    yield "data: " + json.dumps({"id": completion, "object": "chat.completion.chunk",
                                                 "created": created, "model": name, "choices": [],
                                                 "usage": _usage(reply)}) + "\n\n"
            yield "data: [DONE]\n\n"
        finally:
            if not work.future.done():  # the client went away mid-stream
                server.scheduler.give_up(work)

    return StreamingResponse(events(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})


async def native(request: Request) -> Response:
    """/v1/caption, /v1/ask, /v1/classify: the CLI's records, in the order of the request's images (and questions)."""
    from llavanext_cli.io.questions import PromptJob
    from llavanext_cli.engine.scoring import LabelJob, classification_prompt, parse_labels
    from llavanext_cli.io.records import Subject

    server: Server = request.app.state.server
    server.check_key(request)
    body = await server.body(request)
    name = server.check_model(body, required=False)
    route = request.url.path.rsplit("/", 1)[-1]
    given = body.get("images")
    if not isinstance(given, list) or not given:
        raise Refused(400, "images must be a non-empty list of {\"data\": base64, \"name\"} or {\"url\"}")
    tag, count, in_memory = f"<{uuid.uuid4().hex[:8]}>", [0], {}
    names = await asyncio.to_thread(lambda: [server.image(image, count, in_memory, tag, strict=False)
                                             for image in given])
    model = server.scheduler.model
    if route == "classify":
        labels = body.get("labels")
        label_list = parse_labels(labels) if isinstance(labels, str) else parse_labels(given=labels or [])
        prompt = body.get("prompt") or model.settings.classify_prompt
        work = Work("classify", jobs=[LabelJob(Subject.of(image)) for image in names], labels=tuple(label_list),
                    question=classification_prompt(prompt, label_list), normalize=body.get("normalize"),
                    in_memory=in_memory)
    else:
        schema = _checked_schema(body.get("schema"))
        if route == "caption":
            prompt = body.get("prompt") or model.settings.caption_prompt
            jobs = [PromptJob(Subject.of(image), prompt) for image in names]
        else:
            from llavanext_cli.io.questions import check_questions

            questions = check_questions(body.get("questions", body.get("question")))
            subjects = ([Subject(tuple(names), together=True)] if body.get("together")
                        else [Subject.of(image) for image in names])
            jobs = [PromptJob(subject, question) for subject in subjects for question in questions]
        work = Work("answer", jobs=jobs, generation=server.generation(body, openai=False), schema=schema,
                    in_memory=in_memory)
    records = await server.run(request, work)
    return JSONResponse({"object": "list", "model": name,
                         "records": [json.loads(_untagged(json.dumps(record.to_json()), tag)) for record in records]})


def _untagged(text: str, tag: str) -> str:
    return text.replace(tag, "")


_ANY_TAG = re.compile(r"<[0-9a-f]{8}>")  # a request's tag (see chat_completions and native)


async def models(request: Request) -> Response:
    server: Server = request.app.state.server
    server.check_key(request)
    return JSONResponse({"object": "list", "data": [{"id": name, "object": "model", "created": int(server.started),
                                                     "owned_by": "llava"} for name in server.names]})


async def health(request: Request) -> Response:
    server: Server = request.app.state.server
    return JSONResponse({"status": "ok", "model": server.names[0], "queue": server.scheduler.active})


def _guard(handler: Any) -> Any:
    """Every route's refusals in OpenAI's envelope; the tool's messages as they are; anything else logged here and
    answered without its text."""
    async def guarded(request: Request) -> Response:
        try:
            return await handler(request)
        except Refused as refused:
            return error_response(refused.status, refused.message, refused.code, refused.headers)
        except MediaError as error:
            return error_response(error.status, error.message)
        except Cancelled:
            return Response(status_code=499)  # nobody reads it: the client went away
        except LlavaError as error:  # it may name a request's image by its internal name: the tag goes
            return error_response(400 if error.exit_code != 3 else 500, _ANY_TAG.sub("", error.message))
        except Exception as error:  # noqa: BLE001 (a bug: logged with its traceback, never shown to a client)
            traceback.print_exception(error, file=sys.stderr)
            return error_response(500, "internal error; see the server's log")

    return guarded


def make_app(server: Server) -> Starlette:
    routes = [Route("/health", _guard(health), methods=["GET"]),
              Route("/v1/models", _guard(models), methods=["GET"]),
              Route("/v1/chat/completions", _guard(chat_completions), methods=["POST"]),
              *[Route(f"/v1/{name}", _guard(native), methods=["POST"]) for name in ("caption", "ask", "classify")]]

    @asynccontextmanager  # a plain async generator is deprecated in Starlette 0.40's range
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        server.scheduler.start()
        yield
        server.scheduler.stop()  # what waits and runs is finished first

    app = Starlette(routes=routes, lifespan=lifespan)
    app.state.server = server
    return app
