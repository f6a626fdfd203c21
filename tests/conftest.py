"""Shared fixtures: tiny real checkpoints built once per session with `llava init-model`, an isolated user config,
a helper that runs the real CLI in-process (subprocess where the process itself is under test), and plain
transformers, the way the seeds use it, for the tool's answers to be compared with.

The suite runs on the CPU wherever it runs: a GPU host's GPUs are hidden from it (and from the processes it
starts), except from the tests marked `gpu`, which run the CUDA paths in processes of their own
(`pytest -m gpu`)."""

from __future__ import annotations

import contextlib
import functools
import io
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[1]
EXAMPLES = REPO / "examples"
TEST_IMAGES = Path(__file__).resolve().parent / "data" / "images"  # copied from shared/images (public domain)

# Before torch is imported anywhere: CUDA reads this once, when it first initialises.
_VISIBLE_GPUS = os.environ.get("CUDA_VISIBLE_DEVICES")
os.environ["CUDA_VISIBLE_DEVICES"] = ""
# The workers a run uses unless told otherwise, whatever the host's cores (auto is 2 on a CPU of 2 or more).
TEST_WORKERS = "2"

# The suite hears of deprecations before users do: a DeprecationWarning or FutureWarning raised while a test runs
# fails it, in this process (pytest's filterwarnings, added in pytest_configure) and in the CLI processes the tests
# start (PYTHONWARNINGS). Users never see them (the CLI shows library warnings only with -v). Noise a library makes
# on its own, whatever the tool calls, is listed here with why, as (message prefix, category):
STRICT_WARNINGS = ["error::DeprecationWarning", "error::PendingDeprecationWarning", "error::FutureWarning"]
FOREIGN_DEPRECATIONS: list[tuple[str, str]] = []


def _warning_filters(escape_regex: bool) -> list[str]:
    import re

    ignored = [f"ignore:{re.escape(message) if escape_regex else message}:{category}"
               for message, category in FOREIGN_DEPRECATIONS]
    return STRICT_WARNINGS + ignored


def pytest_configure(config):
    for line in _warning_filters(escape_regex=True):
        config.addinivalue_line("filterwarnings", line)


def gpu_environment() -> dict[str, str]:
    """The environment for a process that may use the host's GPUs (the `gpu` tests), with the default workers
    (more than one is a CPU setting)."""
    env = dict(os.environ)
    env.pop("LLAVA_WORKERS", None)
    if _VISIBLE_GPUS is None:
        env.pop("CUDA_VISIBLE_DEVICES", None)
    else:
        env["CUDA_VISIBLE_DEVICES"] = _VISIBLE_GPUS
    return env


@functools.cache
def cuda_is_available() -> bool:
    """Whether a process with the host's GPUs visible has CUDA (asked once, in a process of its own)."""
    probe = subprocess.run([sys.executable, "-c", "import torch; print(torch.cuda.is_available())"],
                           capture_output=True, text=True, env=gpu_environment(), timeout=300)
    return probe.stdout.strip() == "True"


@pytest.fixture(autouse=True)
def gpu_tests_need_cuda(request):
    if request.node.get_closest_marker("gpu") is not None and not cuda_is_available():
        pytest.skip("needs a CUDA GPU")


@dataclass
class CliResult:
    exit_code: int
    stdout: str
    stderr: str


def run_cli(*args: str, stdin: str = "", env: dict[str, str] | None = None) -> CliResult:
    """Run `llava ARGS...` in this process through the real entry point (error mapping included); `env` is set for
    the run only."""
    from llavanext_cli.cli.main import main

    out, err = io.StringIO(), io.StringIO()
    old_stdin = sys.stdin
    sys.stdin = io.StringIO(stdin)
    saved = {name: os.environ.get(name) for name in (env or {})}
    os.environ.update(env or {})
    code = 0
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                main([str(a) for a in args])
            except SystemExit as exc:
                code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    finally:
        sys.stdin = old_stdin
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
    return CliResult(code, out.getvalue(), err.getvalue())


def run_llava_process(*args: str, env: dict[str, str] | None = None, stdin: str = "",
                      timeout: float = 300) -> subprocess.CompletedProcess[str]:
    """Run `python -m llavanext_cli ARGS...` as a separate process."""
    full_env = {**os.environ, **(env or {})}
    return subprocess.run([sys.executable, "-m", "llavanext_cli", *map(str, args)], input=stdin, text=True,
                          capture_output=True, env=full_env, timeout=timeout, cwd=str(REPO))


def free_port() -> int:
    """A TCP port nobody listens on now (the OS picks it: bind port 0), for a server a test starts."""
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def accelerate_launch(*args: str) -> subprocess.Popen:
    """`accelerate launch` of `llava ARGS...` on two CPU processes (gloo) with a free rendezvous port.
    (`accelerate launch --cpu` would start ONE process; --multi_gpu with a CPU-only torch starts two ranks.)"""
    accelerate = str(Path(sys.executable).parent / "accelerate")
    command = [accelerate, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
               "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(free_port()),
               "-m", "llavanext_cli", *map(str, args)]
    return subprocess.Popen(command, cwd=str(REPO), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


@contextlib.contextmanager
def http_server(handler: type):
    """A local HTTP server answering with `handler` (a BaseHTTPRequestHandler class): its base URL."""
    from http.server import ThreadingHTTPServer
    import threading

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}"
    finally:
        httpd.shutdown()


def folder_of_examples(folder: Path, count: int) -> Path:
    """`count` copies of the example images (cycling through them) in a new folder, named in input order."""
    import shutil

    folder.mkdir()
    sources = [EXAMPLES / "chelsea.png", EXAMPLES / "rocket.jpg", EXAMPLES / "coffee.png"]
    for index in range(count):
        shutil.copy(sources[index % 3], folder / f"{index:03d}{sources[index % 3].suffix}")
    return folder


@pytest.fixture(autouse=True)
def isolated_environment(tmp_path_factory, monkeypatch):
    """No user config, no LLAVA_* from the developer's shell, never the network; and in every process a test starts,
    deprecations are errors (PYTHONWARNINGS), as they are in this one."""
    for name in list(os.environ):
        if name.startswith("LLAVA_"):
            monkeypatch.delenv(name)
    home = tmp_path_factory.mktemp("llava-home")
    monkeypatch.setenv("LLAVA_HOME", str(home))
    monkeypatch.setenv("LLAVA_WORKERS", TEST_WORKERS)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("PYTHONWARNINGS", ",".join(_warning_filters(escape_regex=False)))
    monkeypatch.setenv("HF_HOME", str(tmp_path_factory.getbasetemp() / "hf-home"))
    yield home


def _build(spec: str, out: Path) -> Path:
    """`llava init-model SPEC OUT`, once for the whole run: the suite's processes (pytest-xdist's workers) share the
    folder, and the first to take its lock builds it."""
    from filelock import FileLock

    with FileLock(str(out) + ".lock"):
        if not (out / "model.safetensors").is_file():
            result = run_cli("init-model", REPO / "configs" / spec, out, "--force")
            assert result.exit_code == 0, result.stderr
    return out


@pytest.fixture(scope="session")
def checkpoints_dir(tmp_path_factory) -> Path:
    """Shared by every process of the run (xdist gives each worker a folder below one base)."""
    base = tmp_path_factory.getbasetemp()
    shared = base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base
    folder = shared / "checkpoints"
    folder.mkdir(exist_ok=True)
    return folder


@pytest.fixture(scope="session")
def tiny_next(checkpoints_dir) -> Path:
    """A LLaVA-NeXT checkpoint with the mistral-instruct chat template."""
    return _build("tiny-llava-next.yaml", checkpoints_dir / "tiny-next")


@pytest.fixture(scope="session")
def tiny_llava(checkpoints_dir) -> Path:
    """A LLaVA-1.5 checkpoint with no chat template (the registry must supply the format)."""
    return _build("tiny-llava.yaml", checkpoints_dir / "tiny-llava")


class PlainTransformers:
    """Plain transformers, written the way the seeds do it, for the tool's output to be compared with: each
    checkpoint loaded once (float32, eval, left padding)."""

    @functools.cache
    def __call__(self, path: Path) -> tuple[Any, Any]:
        import torch
        from transformers import AutoModelForImageTextToText, AutoProcessor

        processor = AutoProcessor.from_pretrained(path)
        processor.tokenizer.padding_side = "left"
        model = AutoModelForImageTextToText.from_pretrained(path, dtype=torch.float32).eval()
        return processor, model

    def answer(self, path: Path, prompt: str, images: list[Any], max_new_tokens: int, **generate: Any) -> str:
        """The seeds' way: the rendered prompt and its images through the processor, `generate` (greedy unless
        told otherwise), the new tokens decoded with special tokens skipped. `images` are paths or PIL images,
        loaded the contract's way."""
        import torch

        from llavanext_cli.io.images import load_image

        processor, model = self(Path(path))
        pictures = [image if hasattr(image, "size") else load_image(image) for image in images]
        inputs = processor(images=pictures or None, text=prompt, return_tensors="pt")
        with torch.inference_mode():
            output = model.generate(**inputs, max_new_tokens=max_new_tokens, **{"do_sample": False, **generate})
        return processor.decode(output[0, inputs.input_ids.shape[1]:], skip_special_tokens=True).strip()


@pytest.fixture(scope="session")
def hf_reference() -> PlainTransformers:
    return PlainTransformers()
