"""`llava serve` as a real process on a free port, driven by real clients (the official openai client, `llm`, and the
CLI's --server): the CLI's answers, exact under concurrency, safe by default, a bounded queue, clients that go away,
SIGTERM while busy, and every bad input refused with the right status and the tool's own words."""

from __future__ import annotations

import base64
import io
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from conftest import EXAMPLES, REPO, run_cli

# One worker runs the module: the warm server below starts once for all its tests.
pytestmark = pytest.mark.xdist_group("serve")

CAT, ROCKET, COFFEE = EXAMPLES / "chelsea.png", EXAMPLES / "rocket.jpg", EXAMPLES / "coffee.png"
KEY = "test-key-123"
QUESTION = "What is shown in this image?"


class Served:
    """A `llava serve` process: its URL and its process."""

    def __init__(self, checkpoint, *extra: str, env: dict[str, str] | None = None):
        self.process = subprocess.Popen(
            [sys.executable, "-m", "llavanext_cli", "serve", "-m", str(checkpoint), "--port", "0",
             "--max-new-tokens", "6", *extra], cwd=str(REPO), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            text=True, env={**os.environ, **(env or {})})
        line = self.process.stderr.readline()
        match = re.search(r"on (http://[\d.]+:\d+)", line)
        assert match, line + self.process.stderr.read()
        self.url = match.group(1)
        self.name = str(checkpoint)

    def request(self, path: str, body: dict | None = None, key: str | None = KEY, raw: bytes | None = None,
                timeout: float = 120) -> tuple[int, dict, dict]:
        headers = {"content-type": "application/json"}
        if key:
            headers["authorization"] = f"Bearer {key}"
        data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
        request = urllib.request.Request(self.url + path, data=data, headers=headers,
                                         method="POST" if data is not None else "GET")
        try:
            with urllib.request.urlopen(request, timeout=timeout) as response:
                return response.status, json.loads(response.read()), _lower(response.headers)
        except urllib.error.HTTPError as error:
            return error.code, json.loads(error.read() or b"{}"), _lower(error.headers)

    def stop(self) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        return self.process.wait(timeout=60)


def _lower(headers) -> dict:
    return {key.lower(): value for key, value in dict(headers).items()}


def b64(path) -> str:
    return base64.b64encode(path.read_bytes()).decode()


def data_uri(path) -> str:
    return "data:image/png;base64," + b64(path)


def chat_body(name: str, image=CAT, text=QUESTION, **extra) -> dict:
    return {"model": name, "messages": [{"role": "user", "content": [
        {"type": "text", "text": text}, {"type": "image_url", "image_url": {"url": data_uri(image)}}]}], **extra}


@pytest.fixture(scope="module")
def media(tmp_path_factory):
    folder = tmp_path_factory.mktemp("media")
    shutil.copy(CAT, folder / "cat.png")
    return folder


@pytest.fixture(scope="module")
def server(tiny_next, media):
    served = Served(tiny_next, "--api-key", KEY, "--alias", "tiny", "--media-root", str(media),
                    "--allow-url-images", "--allow-network", "127.0.0.2/32", "--max-images", "4",
                    "--max-body", "2MiB", "--max-pixels", "2000000")
    yield served
    assert served.stop() == 0


def cli_text(tiny_next, *args) -> list[dict]:
    result = run_cli(*args, "-m", tiny_next, "--max-new-tokens", "6", "--format", "jsonl")
    assert result.exit_code == 0, result.stderr
    return [json.loads(line) for line in result.stdout.splitlines()]


# --- the clients ------------------------------------------------------------------------------------------------------

def test_the_openai_client_gets_the_clis_answers(server, tiny_next):
    from openai import OpenAI

    client = OpenAI(base_url=server.url + "/v1", api_key=KEY)
    assert {model.id for model in client.models.list()} == {server.name, "tiny"}
    [expected] = cli_text(tiny_next, "ask", CAT, "-q", QUESTION)
    reply = client.chat.completions.create(**chat_body("tiny"))
    assert reply.choices[0].message.content == expected["text"] and reply.model == "tiny"
    assert reply.usage.completion_tokens == expected["new_tokens"] and reply.choices[0].finish_reason == "length"

    pieces, usage = [], None
    for chunk in client.chat.completions.create(**chat_body(server.name), stream=True,
                                                stream_options={"include_usage": True}):
        if chunk.usage:
            usage = chunk.usage
        pieces += [choice.delta.content or "" for choice in chunk.choices]
    assert "".join(pieces) == expected["text"] and usage.completion_tokens == expected["new_tokens"]

    schema = {"type": "object", "properties": {"kind": {"enum": ["animal", "object"]},
                                               "count": {"type": "integer", "minimum": 0, "maximum": 9}},
              "required": ["kind", "count"], "additionalProperties": False}
    reply = client.chat.completions.create(**chat_body("tiny"), max_tokens=40, response_format={
        "type": "json_schema", "json_schema": {"name": "thing", "schema": schema, "strict": True}})
    data = json.loads(reply.choices[0].message.content)
    result = run_cli("ask", CAT, "-q", QUESTION, "--schema", json.dumps(schema), "-m", tiny_next,
                     "--max-new-tokens", "40", "--format", "jsonl")
    assert data == json.loads(result.stdout)["data"]


def test_a_conversation_is_rendered_as_chat_renders_it(server, tiny_next):
    from openai import OpenAI

    client = OpenAI(base_url=server.url + "/v1", api_key=KEY)
    piped = run_cli("chat", CAT, "-m", tiny_next, "--max-new-tokens", "6", "--format", "jsonl",
                    stdin="What is it?\nAnd its colour?\n")
    first, second = [json.loads(line)["text"] for line in piped.stdout.splitlines()]
    messages = chat_body("tiny", text="What is it?")["messages"]
    reply = client.chat.completions.create(model="tiny", messages=messages)
    assert reply.choices[0].message.content == first
    messages += [{"role": "assistant", "content": first}, {"role": "user", "content": "And its colour?"}]
    reply = client.chat.completions.create(model="tiny", messages=messages)
    assert reply.choices[0].message.content == second
    # The second turn ran only its new tokens: the first turn's prefix (the image's ~1,000 tokens) came from the cache.
    assert reply.usage.prompt_tokens_details.cached_tokens > 1000
    assert reply.usage.prompt_tokens - reply.usage.prompt_tokens_details.cached_tokens < 100


def test_llm_with_an_attachment(server, tiny_next, tmp_path):
    home = tmp_path / "llm"
    home.mkdir()
    (home / "extra-openai-models.yaml").write_text(
        f"- model_id: llava-tiny\n  model_name: tiny\n  api_base: {server.url}/v1\n  api_key_name: llava\n"
        "  vision: true\n")
    llm = shutil.which("llm", path=os.path.dirname(sys.executable))
    # llm is the client here, not the tool: its own deprecations (pydantic's, under llm 0.19) are not made errors
    env = {**{k: v for k, v in os.environ.items() if k != "PYTHONWARNINGS"}, "LLM_USER_PATH": str(home)}
    result = subprocess.run([llm, "-m", "llava-tiny", "--key", KEY, "--no-stream", QUESTION, "-a", str(CAT)],
                            capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 0, result.stderr
    [expected] = cli_text(tiny_next, "ask", CAT, "-q", QUESTION)
    assert result.stdout.strip() == expected["text"]


def test_the_cli_on_the_warm_model_gives_the_local_records(server, tiny_next, tmp_path):
    (tmp_path / "missing.png").unlink(missing_ok=True)
    env = {"LLAVA_API_KEY": KEY}
    local = run_cli("caption", CAT, ROCKET, tmp_path / "missing.png", "-m", tiny_next, "--max-new-tokens", "6",
                    "-o", tmp_path / "local.jsonl")
    remote = run_cli("caption", CAT, ROCKET, tmp_path / "missing.png", "--server", server.url, "--max-new-tokens",
                     "6", "-o", tmp_path / "remote.jsonl", env=env)
    assert local.exit_code == remote.exit_code == 1

    def records(name):
        return [{k: v for k, v in json.loads(line).items() if k != "seconds"}
                for line in (tmp_path / name).read_text().splitlines()]

    assert records("remote.jsonl") == records("local.jsonl")
    questions = run_cli("ask", CAT, "-q", "What?", "-q", "Where?", "--server", server.url, "--max-new-tokens", "6",
                        "--format", "jsonl", env=env)
    assert [json.loads(line)["text"] for line in questions.stdout.splitlines()] == \
        [r["text"] for r in cli_text(tiny_next, "ask", CAT, "-q", "What?", "-q", "Where?")]
    labels = run_cli("classify", CAT, ROCKET, "--labels", "a cat,a rocket", "--server", server.url, "--format",
                     "jsonl", env=env)
    local_labels = run_cli("classify", CAT, ROCKET, "--labels", "a cat,a rocket", "-m", tiny_next, "--format", "jsonl")
    assert labels.stdout == local_labels.stdout
    chat = run_cli("chat", CAT, "--server", server.url, "--max-new-tokens", "6", stdin="What is it?\n", env=env)
    local_chat = run_cli("chat", CAT, "-m", tiny_next, "--max-new-tokens", "6", stdin="What is it?\n")
    assert chat.stdout == local_chat.stdout and chat.exit_code == 0
    assert run_cli("caption", CAT, "--server", server.url, env={"LLAVA_API_KEY": "wrong"}).exit_code == 2


def test_a_client_run_imports_no_torch_and_a_missing_server_is_exit_3(server):
    code = ("import sys, json\nfrom llavanext_cli.cli.main import main\n"
            f"try:\n    main(['caption', {str(CAT)!r}, '--server', {server.url!r}, '--format', 'jsonl'])\n"
            "except SystemExit as exc:\n    print(json.dumps([exc.code, 'torch' in sys.modules]), file=sys.stderr)\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=str(REPO), timeout=120,
                            env={**os.environ, "LLAVA_API_KEY": KEY})
    assert json.loads(result.stderr.strip().splitlines()[-1]) == [0, False] and json.loads(result.stdout)["text"]
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        nobody = f"http://127.0.0.1:{probe.getsockname()[1]}"
    result = run_cli("caption", CAT, "--server", nobody)
    assert result.exit_code == 3 and "cannot reach a llava server" in result.stderr


# --- exact under concurrency ----------------------------------------------------------------------------------------

def test_sixteen_requests_at_once_get_the_answers_they_get_alone(server):
    images = [CAT, ROCKET, COFFEE, CAT] * 4
    bodies = [chat_body("tiny", image=image, text=f"Question {n % 3}?") for n, image in enumerate(images)]
    alone = [server.request("/v1/chat/completions", body)[1]["choices"][0]["message"]["content"] for body in bodies]
    with ThreadPoolExecutor(max_workers=16) as pool:
        together = list(pool.map(lambda body: server.request("/v1/chat/completions", body), bodies))
    assert all(status == 200 for status, _, _ in together)
    assert [reply["choices"][0]["message"]["content"] for _, reply, _ in together] == alone
    natively = server.request("/v1/caption", {"images": [{"data": b64(image), "name": image.name}
                                                         for image in images[:4]]})[1]["records"]
    with ThreadPoolExecutor(max_workers=4) as pool:
        one_by_one = list(pool.map(lambda image: server.request("/v1/caption", {"images": [
            {"data": b64(image), "name": image.name}]})[1]["records"][0], images[:4]))
    assert [r["text"] for r in natively] == [r["text"] for r in one_by_one]


def test_a_burst_past_the_queue_gets_429s_and_every_accepted_request_completes(tiny_next):
    served = Served(tiny_next, "--max-queue", "2", "--batch-window", "300")
    try:
        with ThreadPoolExecutor(max_workers=8) as pool:
            results = list(pool.map(lambda _: served.request("/v1/chat/completions", chat_body(served.name),
                                                             key=None), range(8)))
        statuses = sorted(status for status, _, _ in results)
        assert 429 in statuses and 200 in statuses and set(statuses) <= {200, 429}
        refused = next(result for result in results if result[0] == 429)
        assert refused[2].get("retry-after") == "1" and refused[1]["error"]["type"] == "rate_limit_error"
        accepted = [reply for status, reply, _ in results if status == 200]
        assert len({reply["choices"][0]["message"]["content"] for reply in accepted}) == 1
    finally:
        assert served.stop() == 0


# --- clients that go away, SIGTERM while busy ------------------------------------------------------------------------

def _queue_is_empty(served: Served, within: float) -> bool:
    deadline = time.time() + within
    while time.time() < deadline:
        if served.request("/health", key=None)[1]["queue"] == 0:
            return True
        time.sleep(0.05)
    return False


def test_a_client_that_goes_away_frees_its_slot_and_stops_its_generation(server):
    host, port = server.url.removeprefix("http://").split(":")
    for stream in (True, False):
        body = json.dumps(chat_body(server.name, max_tokens=6000, stream=stream)).encode()
        with socket.create_connection((host, int(port))) as connection:
            connection.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json"
                               b"\r\nAuthorization: Bearer " + KEY.encode() +
                               b"\r\nContent-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
            if stream:
                received = b""
                while b"chat.completion.chunk" not in received:  # answering
                    received += connection.recv(65536)
            else:
                time.sleep(1.0)
        # 6,000 tokens would take minutes: the generation stopped after the step it was in.
        assert _queue_is_empty(server, within=10), stream
        status, reply, _ = server.request("/v1/chat/completions", chat_body(server.name))
        assert status == 200 and reply["choices"][0]["message"]["content"]


def test_sigterm_while_busy_finishes_what_runs_and_exits_0(tiny_next):
    served = Served(tiny_next)
    results = []
    worker = threading.Thread(target=lambda: results.append(
        served.request("/v1/chat/completions", chat_body(served.name, max_tokens=300), key=None)))
    worker.start()
    time.sleep(1.5)  # the request runs
    served.process.send_signal(signal.SIGTERM)
    worker.join(timeout=120)
    assert served.process.wait(timeout=60) == 0
    [(status, reply, _)] = results
    assert status == 200 and reply["usage"]["completion_tokens"] > 0
    with pytest.raises(OSError):
        urllib.request.urlopen(served.url + "/health", timeout=5)


# --- what the server refuses ------------------------------------------------------------------------------------------

class _Images(BaseHTTPRequestHandler):
    hits: list[str] = []
    target = ""

    def do_GET(self):
        type(self).hits.append(self.path)
        if self.path == "/redirect":
            self.send_response(302)
            self.send_header("Location", type(self).target)
            self.end_headers()
            return
        data = CAT.read_bytes()
        self.send_response(200)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass


def _serve_on(address: str) -> tuple[ThreadingHTTPServer, str]:
    handler = type("Handler", (_Images,), {"hits": []})
    httpd = ThreadingHTTPServer((address, 0), handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    return httpd, f"http://{address}:{httpd.server_address[1]}"


def _bomb() -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.new("1", (20000, 20000)).save(buffer, "PNG")  # a few kB, 400 million pixels decoded
    return buffer.getvalue()


def test_bad_requests_are_refused_with_the_right_status_and_clean_words(server, media, tmp_path):
    allowed, allowed_url = _serve_on("127.0.0.2")
    forbidden, forbidden_url = _serve_on("127.0.0.1")
    allowed.RequestHandlerClass.target = forbidden_url + "/cat.png"
    try:
        truncated = CAT.read_bytes()[:300]
        cases = [
            ("wrong key", chat_body("tiny"), "nope", 401, "a valid API key is needed"),
            ("no key", chat_body("tiny"), None, 401, "a valid API key is needed"),
            ("another model", chat_body("llava-hf/llava-v1.6-mistral-7b-hf"), KEY, 404, "is not served here"),
            ("no model", {k: v for k, v in chat_body("tiny").items() if k != "model"}, KEY, 400, "model is required"),
            ("n", chat_body("tiny", n=10000), KEY, 400, "n must be 1"),
            ("bad schema", chat_body("tiny", response_format={"type": "json_schema", "json_schema": {"schema": {
                "type": "object", "properties": {"x": {"type": "string", "maxLenght": 3}}}}}), KEY, 400,
             "cannot be enforced"),
            ("bomb", _with_url(chat_body("tiny"), "data:image/png;base64," + base64.b64encode(_bomb()).decode()),
             KEY, 413, "more pixels than the server's limit"),
            ("truncated", _with_url(chat_body("tiny"), "data:image/png;base64," + base64.b64encode(truncated).decode()),
             KEY, 400, "not one Pillow can read"),
            ("empty", _with_url(chat_body("tiny"), "data:image/png;base64,"), KEY, 400, "empty"),
            ("loopback", _with_url(chat_body("tiny"), forbidden_url + "/cat.png"), KEY, 403, "does not fetch"),
            ("ipv6 loopback", _with_url(chat_body("tiny"), "http://[::1]:9/cat.png"), KEY, 403, "does not fetch"),
            ("metadata", _with_url(chat_body("tiny"), "http://169.254.169.254/latest/meta-data"), KEY, 403,
             "does not fetch"),
            ("redirect", _with_url(chat_body("tiny"), allowed_url + "/redirect"), KEY, 403, "does not fetch"),
            ("file outside", _with_url(chat_body("tiny"), f"file://{CAT}"), KEY, 403, "outside the server's"),
            ("bare path", _with_url(chat_body("tiny"), str(CAT)), KEY, 400, "a bare path is never read"),
            ("too many images", {"model": "tiny", "messages": [{"role": "user", "content": [
                {"type": "text", "text": "hi"}, *[{"type": "image_url", "image_url": {"url": data_uri(CAT)}}] * 5]}]},
             KEY, 413, "4 images at the most"),
        ]
        for name, body, key, status, words in cases:
            got, reply, _ = server.request("/v1/chat/completions", body, key=key)
            assert got == status, (name, reply)
            assert words in reply["error"]["message"], (name, reply)
            assert "Traceback" not in json.dumps(reply) and "Error(" not in reply["error"]["message"], name
        # A huge base64 string: refused from its Content-Length, before the server reads it.
        host, port = server.url.removeprefix("http://").split(":")
        with socket.create_connection((host, int(port))) as connection:
            connection.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                               b"Authorization: Bearer " + KEY.encode() + b"\r\nContent-Length: "
                               + str(3 * 2**20).encode() + b"\r\n\r\n" + b'{"model": "tiny", "messages": "' + b"A" * 4096)
            answer = ""
            while "larger than" not in answer and len(answer) < 4096:
                piece = connection.recv(65536).decode()
                if not piece:
                    break
                answer += piece
        assert answer.startswith("HTTP/1.1 413") and "larger than the server's limit" in answer
        assert forbidden.RequestHandlerClass.hits == []  # nothing was fetched from a forbidden address
        assert allowed.RequestHandlerClass.hits == ["/redirect"]  # the redirect's target was checked, not fetched
        # What is allowed works: a file under --media-root, an image on an allowed network, /health without a key.
        for url in (f"file://{media / 'cat.png'}", allowed_url + "/cat.png"):
            got, reply, _ = server.request("/v1/chat/completions", _with_url(chat_body("tiny"), url))
            assert got == 200, reply
        assert server.request("/health", key=None)[0] == 200
        assert server.request("/v1/models", key=None)[0] == 401
    finally:
        allowed.shutdown()
        forbidden.shutdown()


def _with_url(body: dict, url: str) -> dict:
    body["messages"][0]["content"][1]["image_url"]["url"] = url
    return body
