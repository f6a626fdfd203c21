"""What a 7B checkpoint on a real machine meets, checked on the tiny ones: out of memory in every path is an error record
or a halved batch, never a traceback; weights that cannot fit are refused before a byte is read; classify's memory
does not grow with the labels; every OS error on an input is that input's record; --offline fetches nothing; a seed
gives the same records however the run was cut and resumed; -v ends with the run's figures."""

from __future__ import annotations

import json
import os
import shutil
from http.server import BaseHTTPRequestHandler

import pytest

from conftest import EXAMPLES, TEST_IMAGES, http_server, run_cli

CAT = EXAMPLES / "chelsea.png"
BIG = TEST_IMAGES / "camera.png"  # 512 x 512: more tiles, a longer prompt than the others
TOKENS = ("--max-new-tokens", "4")


def records(result) -> list[dict]:
    return [{k: v for k, v in json.loads(line).items() if k != "seconds"} for line in result.stdout.splitlines()]


@pytest.fixture
def same_size_images(tmp_path):
    """Three different pictures of one size (so that they share a batch), and one that is larger."""
    from PIL import Image, ImageOps

    folder = tmp_path / "images"
    folder.mkdir()
    cat = Image.open(CAT).convert("RGB")
    cat.save(folder / "a.png")
    ImageOps.mirror(cat).save(folder / "b.png")
    ImageOps.invert(cat).save(folder / "c.png")
    shutil.copy(BIG, folder / "d.png")
    return folder


def out_of_memory_when(monkeypatch, too_much):
    """The model's forward raises the CUDA allocator's error when `too_much(kwargs)`, as a GPU out of memory would."""
    import torch
    from transformers import LlavaNextForConditionalGeneration

    import functools

    real = LlavaNextForConditionalGeneration.forward

    @functools.wraps(real)  # generate reads the forward's signature
    def forward(self, *args, **kwargs):
        if too_much(kwargs):
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB (GPU 0; 23.64 GiB total)")
        return real(self, *args, **kwargs)

    monkeypatch.setattr(LlavaNextForConditionalGeneration, "forward", forward)


def _rows(kwargs) -> int:
    ids = kwargs.get("input_ids")
    return 0 if ids is None else ids.shape[0]


def _big_image(kwargs) -> bool:
    """A prompt with the 512 x 512 image: about 2,900 tokens (the others' are about 1,500)."""
    ids = kwargs.get("input_ids")
    return ids is not None and ids.shape[1] > 2500


# --- out of memory ------------------------------------------------------------------------------------------------

def test_a_batch_halves_and_an_input_too_big_alone_is_an_error_record(tiny_next, same_size_images, monkeypatch):
    args = ("caption", same_size_images, "-m", tiny_next, *TOKENS, "--batch-size", "4", "--workers", "1",
            "--format", "jsonl")
    expected = records(run_cli(*args))
    out_of_memory_when(monkeypatch, lambda kwargs: _rows(kwargs) > 1 or _big_image(kwargs))
    result = run_cli(*args)
    assert result.exit_code == 1 and "Traceback" not in result.stderr
    got = records(result)
    assert got[:3] == expected[:3]  # the batch of three halved until it fit: the same answers
    assert got[3]["image"].endswith("d.png") and got[3]["error"].startswith("out of memory")
    assert "--quant 4bit" in got[3]["error"] and "Warning:" in result.stderr


def test_a_shared_prefix_that_does_not_fit_fails_its_questions_and_the_run_goes_on(tiny_next, same_size_images,
                                                                                   monkeypatch):
    args = ("ask", same_size_images / "a.png", same_size_images / "d.png", "-q", "What is it?", "-q", "Where?",
            "-m", tiny_next, *TOKENS, "--format", "jsonl")
    expected = records(run_cli(*args))
    out_of_memory_when(monkeypatch, _big_image)
    result = run_cli(*args)
    assert result.exit_code == 1
    got = records(result)
    assert got[:2] == expected[:2]
    assert len(got) == 4 and all(r["error"].startswith("out of memory") for r in got[2:])


def test_several_questions_in_one_pass_halve_on_out_of_memory(tiny_next, same_size_images, monkeypatch):
    args = ("ask", same_size_images / "a.png", "-q", "What is it?", "-q", "Where?", "-q", "Why?", "-m", tiny_next,
            *TOKENS, "--batch-size", "3", "--format", "jsonl")
    expected = records(run_cli(*args))
    out_of_memory_when(monkeypatch, lambda kwargs: _rows(kwargs) > 1)  # the continuations of several rows
    result = run_cli(*args)
    assert result.exit_code == 0 and records(result) == expected


def test_classify_halves_its_images_and_an_image_too_big_alone_is_an_error_record(tiny_next, same_size_images,
                                                                                   monkeypatch):
    args = ("classify", same_size_images, "--labels", "cat,dog,camera", "-m", tiny_next, "--batch-size", "4",
            "--format", "jsonl")
    expected = records(run_cli(*args))
    out_of_memory_when(monkeypatch, lambda kwargs: _rows(kwargs) > 1 or _big_image(kwargs))
    result = run_cli(*args)
    assert result.exit_code == 1 and "Traceback" not in result.stderr
    got = records(result)
    for before, after in zip(expected[:3], got[:3]):
        assert before["label"] == after["label"]
        assert all(abs(before["scores"][k] - after["scores"][k]) < 1e-6 for k in before["scores"])
    assert got[3]["error"].startswith("out of memory")


def test_a_chat_turn_that_does_not_fit_says_so_and_keeps_the_conversation(tiny_next, same_size_images, monkeypatch):
    out_of_memory_when(monkeypatch, _big_image)
    turns = f"What is it?\n/image {same_size_images / 'd.png'}\nAnd this?\n/reset\nHello?\n"
    result = run_cli("chat", same_size_images / "a.png", "-m", tiny_next, *TOKENS, "--format", "jsonl", stdin=turns)
    replies = [json.loads(line) for line in result.stdout.splitlines()]
    assert result.exit_code == 1 and "Traceback" not in result.stderr
    assert "text" in replies[0] and replies[1]["error"].startswith("out of memory: this turn does not fit")
    assert "text" in replies[2]  # the conversation went on


def test_every_backends_out_of_memory_is_recognised_and_release_collects_garbage():
    import gc
    import weakref

    import torch

    from llavanext_cli.engine.generation import is_out_of_memory, release_memory

    assert is_out_of_memory(torch.OutOfMemoryError("CUDA out of memory."))
    assert is_out_of_memory(RuntimeError("MPS backend out of memory (MPS allocated: 8.00 GB, other allocations: "
                                         "1.00 GB, max allowed: 9.07 GB). Tried to allocate 256 MB on private pool."))
    assert is_out_of_memory(RuntimeError("[enforce fail at alloc_cpu.cpp:117] data. DefaultCPUAllocator: not enough "
                                         "memory: you tried to allocate 21474836480 bytes."))
    assert is_out_of_memory(MemoryError())
    assert not is_out_of_memory(RuntimeError("shape mismatch")) and not is_out_of_memory(ValueError("out of memory"))

    class Cycle:
        pass

    gc.disable()
    try:
        cycle = Cycle()
        cycle.me = cycle
        alive = weakref.ref(cycle)
        del cycle
        release_memory()
        assert alive() is None  # collected, not only the device cache emptied
    finally:
        gc.enable()


# --- memory checked before loading ------------------------------------------------------------------------------------

def _huge(tiny_next, tmp_path):
    """The tiny checkpoint's processor with the config of a 110B text model, and a weights file that is not one (no
    byte of it may be read)."""
    from transformers import AutoConfig

    folder = tmp_path / "llava-next-110b"
    shutil.copytree(tiny_next, folder)
    config = AutoConfig.from_pretrained(tiny_next)
    text = config.text_config
    text.hidden_size, text.intermediate_size, text.num_hidden_layers = 8192, 49152, 80
    text.num_attention_heads, text.num_key_value_heads = 64, 8
    config.save_pretrained(folder)
    (folder / "model.safetensors").write_bytes(b"\x00" * 64)
    return folder


def test_weights_that_cannot_fit_are_refused_before_a_byte_is_read(tiny_next, tmp_path):
    import time

    huge = _huge(tiny_next, tmp_path)
    start = time.perf_counter()
    result = run_cli("caption", CAT, "-m", huge, "-o", tmp_path / "out.jsonl")
    assert time.perf_counter() - start < 60
    assert result.exit_code == 3 and "Traceback" not in result.stderr
    assert "for its weights in float32" in result.stderr and "the machine's free memory" in result.stderr
    assert "Hint: try --dtype bfloat16" in result.stderr and "--quant 4bit" in result.stderr
    assert not (tmp_path / "out.jsonl").exists()
    # Whoever knows better skips the check: then the weights are read (and found damaged here).
    skipped = run_cli("caption", CAT, "-m", huge, "--no-memory-check")
    assert skipped.exit_code == 3 and "a weights file is damaged" in skipped.stderr
    assert run_cli("caption", CAT, "-m", huge, env={"LLAVA_MEMORY_CHECK": "0"}).stderr == skipped.stderr


# --- classify's memory does not grow with the labels ------------------------------------------------------------------

def _largest_cache(tiny_next, labels: int, monkeypatch) -> int:
    """The most key/value rows x tokens any cache layer held during a classify run."""
    from transformers.cache_utils import DynamicLayer

    largest = [0]
    real = DynamicLayer.update

    def update(self, key_states, value_states, *args, **kwargs):
        keys, values = real(self, key_states, value_states, *args, **kwargs)
        largest[0] = max(largest[0], self.keys.shape[0] * self.keys.shape[-2])
        return keys, values

    monkeypatch.setattr(DynamicLayer, "update", update)
    names = ",".join(f"label number {index}" for index in range(labels))
    result = run_cli("classify", CAT, "--labels", names, "-m", tiny_next, "--format", "jsonl")
    assert result.exit_code == 0, result.stderr
    monkeypatch.setattr(DynamicLayer, "update", real)
    return largest[0]


def test_classify_holds_one_prompt_cache_whatever_the_number_of_labels(tiny_next, monkeypatch):
    few, many = _largest_cache(tiny_next, 2, monkeypatch), _largest_cache(tiny_next, 64, monkeypatch)
    assert many <= few + 16, (few, many)  # the prompt's tokens and one label's, not 64 copies


# --- every OS error on an input is that input's record; --offline fetches nothing --------------------------------------

def test_whatever_the_system_refuses_is_an_error_record(tiny_next, tmp_path):
    (tmp_path / "loop.jpg").symlink_to(tmp_path / "loop.jpg")
    long_name = tmp_path / ("x" * 300 + ".png")
    listing = "\n".join([str(CAT), str(tmp_path / "loop.jpg"), str(long_name), str(tmp_path)]) + "\n"
    result = run_cli("caption", "-", "-m", tiny_next, *TOKENS, "--format", "jsonl", stdin=listing)
    assert result.exit_code == 1 and "Traceback" not in result.stderr
    got = records(result)
    assert "text" in got[0]
    assert [r.get("error") for r in got[1:]] == ["too many levels of symbolic links", "file name too long",
                                                 "is a directory"]
    named = run_cli("caption", CAT, tmp_path / "loop.jpg", long_name, "-m", tiny_next, *TOKENS, "--format", "jsonl")
    assert named.exit_code == 1
    assert [r.get("error") for r in records(named)][1:] == [r.get("error") for r in got[1:3]]


def test_offline_fetches_nothing(tiny_next):
    asked = []

    class Counting(BaseHTTPRequestHandler):
        def do_GET(self):
            asked.append(self.path)
            self.send_response(200)
            self.end_headers()
            self.wfile.write(CAT.read_bytes())

        def log_message(self, *args):
            pass

    with http_server(Counting) as url:
        result = run_cli("caption", f"{url}/cat.png", CAT, "-m", tiny_next, *TOKENS, "--offline", "--format",
                         "jsonl")
        online = run_cli("caption", f"{url}/cat.png", "-m", tiny_next, *TOKENS, "--format", "jsonl")
    assert result.exit_code == 1 and records(result)[0]["error"].startswith("--offline: a URL is not fetched")
    assert "text" in records(result)[1]
    assert asked == ["/cat.png"] and online.exit_code == 0  # only the online run asked


# --- a seed means the same records --------------------------------------------------------------------------------------

SAMPLED = ("--temperature", "1.3", "--top-p", "0.95", "--seed", "11", "--workers", "1")


@pytest.mark.parametrize("command", [
    ("caption",),
    ("ask", "-q", "What is it?", "-q", "Where is it?"),  # the questions continue from one shared prefix
])
def test_a_seeded_sampled_run_resumed_after_an_interruption_equals_the_uninterrupted_run(tiny_next, same_size_images,
                                                                                         tmp_path, command):
    args = (command[0], same_size_images, *command[1:], "-m", tiny_next, "--max-new-tokens", "6", *SAMPLED)
    whole = tmp_path / "whole.jsonl"
    assert run_cli(*args, "-o", whole).exit_code == 0
    again = tmp_path / "again.jsonl"
    assert run_cli(*args, "-o", again).exit_code == 0
    lines = whole.read_text().splitlines()
    cut = tmp_path / "cut.jsonl"
    cut.write_text("\n".join(lines[:3]) + "\n")  # what a run stopped after its third record keeps
    assert run_cli(*args, "-o", cut, "--resume").exit_code == 0

    def texts(path):
        return [(r.get("image"), r.get("prompt"), r.get("text")) for r in map(json.loads, path.read_text().splitlines())]

    assert texts(again) == texts(whole) and texts(cut) == texts(whole)
    other = run_cli(*args[:-6], "--temperature", "1.3", "--top-p", "0.95", "--seed", "12", "--workers", "1",
                    "--format", "jsonl")
    assert [r["text"] for r in records(other)] != [t for _, _, t in texts(whole)]  # the seed does decide


def test_a_seeded_chat_gives_the_same_answers_again(tiny_next):
    args = ("chat", CAT, "-m", tiny_next, "--max-new-tokens", "6", *SAMPLED[:-2])
    turns = "What is it?\nAnd the colour?\n"
    first, second = run_cli(*args, stdin=turns), run_cli(*args, stdin=turns)
    assert first.exit_code == 0 and first.stdout == second.stdout and len(first.stdout.splitlines()) == 2


# --- -v ends with the run's figures -------------------------------------------------------------------------------------

def test_verbose_ends_with_load_time_token_rates_and_peak_memory(tiny_next):
    result = run_cli("caption", CAT, BIG, "-m", tiny_next, *TOKENS, "-v", "--format", "jsonl")
    assert result.exit_code == 0
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("2 records; weights loaded in ") and "prompt tokens and 8 generated in" in last
    assert "generated tokens/s" in last and "peak memory" in last and "GiB in RAM" in last
    quiet = run_cli("caption", CAT, "-m", tiny_next, *TOKENS)
    assert quiet.stderr == ""


# --- the schema's mask, on the host and on any device ------------------------------------------------------------------

def test_the_schema_mask_is_the_same_applied_on_the_host_or_with_torch(tiny_next):
    """The packed bitmask unpacked by numpy (CPU logits) and by torch (any device; here float64 logits take that
    path): the same tokens blocked."""
    import torch

    from llavanext_cli.model.checkpoint import open_checkpoint
    from llavanext_cli.io.settings import load_settings
    from llavanext_cli.engine.structured import load_schema

    checkpoint = open_checkpoint(load_settings({"model": str(tiny_next)}, env={}))
    constraint = load_schema("kind: animal|object, count int 0..9").compile(checkpoint)
    width = checkpoint.config.get_text_config().vocab_size
    processors = [constraint.logits_processor(2) for _ in range(2)]
    ids = torch.ones((2, 3), dtype=torch.long)
    host = processors[0](ids, torch.zeros((2, width), dtype=torch.float32))
    device = processors[1](ids, torch.zeros((2, width), dtype=torch.float64))
    assert torch.equal(torch.isinf(host), torch.isinf(device)) and 0 < int((~torch.isinf(host[0])).sum()) < width


# --- threads ------------------------------------------------------------------------------------------------------------

def test_the_thread_that_prepares_inputs_never_shares_the_tokenizer_of_the_workers(tiny_next, monkeypatch):
    """A fast tokenizer's padding state is mutable: the prefetch thread tokenizes with a processor of its own."""
    import threading

    from llavanext_cli.model import preprocessing

    seen = []
    real = preprocessing.prepare_inputs

    def spy(processor, prompts, images):
        seen.append((threading.current_thread().name, processor))
        return real(processor, prompts, images)

    monkeypatch.setattr(preprocessing, "prepare_inputs", spy)
    result = run_cli("caption", CAT, BIG, EXAMPLES / "rocket.jpg", "-m", tiny_next, *TOKENS, "--workers", "2",
                     "--format", "jsonl")
    assert result.exit_code == 0
    prefetched = [processor for thread, processor in seen if thread == "llava-prefetch"]
    assert prefetched and len({id(processor) for processor in prefetched}) == 1
    from llavanext_cli.model.checkpoint import open_checkpoint
    from llavanext_cli.io.settings import load_settings

    checkpoint = open_checkpoint(load_settings({"model": str(tiny_next)}, env={}))
    copy = checkpoint.preparing_processor
    assert copy is not checkpoint.processor and copy.tokenizer is not checkpoint.processor.tokenizer
    assert copy.tokenizer.padding_side == checkpoint.processor.tokenizer.padding_side == "left"
