"""The parts of the tool that exist for speed, held to the rule that speed never changes an answer: workers
(several batches generated at once), skipped identity steps of the image processor, the model loaded while the
first inputs are prepared, and the garbage-collector policy of a real process. Timing itself is measured in
benchmarks/, never asserted here."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from conftest import EXAMPLES, REPO, TEST_IMAGES, run_cli

PROMPT = "What is shown in this image?"


@pytest.fixture(scope="module")
def varied_images(tmp_path_factory):
    """Real images plus made ones of awkward geometry: tall, wide, tiny, grey, larger than the largest grid."""
    from PIL import Image

    folder = tmp_path_factory.mktemp("varied")
    for source in [EXAMPLES / "chelsea.png", EXAMPLES / "rocket.jpg", EXAMPLES / "coffee.png",
                   TEST_IMAGES / "camera.png", TEST_IMAGES / "page.png"]:
        shutil.copy(source, folder / source.name)
    base = Image.open(EXAMPLES / "coffee.png").convert("RGB")
    for name, size in [("tall.png", (90, 700)), ("wide.jpg", (1500, 200)), ("tiny.png", (7, 5)),
                       ("big.jpg", (2400, 1800))]:
        base.resize(size).save(folder / name)
    return folder


def _texts(result):
    assert result.exit_code == 0, result.stderr
    return [json.loads(line) for line in result.stdout.splitlines()]


def test_workers_change_no_answer_and_keep_input_order(tiny_next, hf_reference, varied_images):
    """Two workers (and two workers with batches) give exactly the records of one worker, in input order, and
    those equal plain transformers one image at a time."""
    common = ("caption", varied_images, "-m", tiny_next, "--prompt", PROMPT, "--max-new-tokens", "6",
              "--format", "jsonl")
    one = _texts(run_cli(*common, "--workers", "1"))
    two = _texts(run_cli(*common, "--workers", "2"))
    two_batched = _texts(run_cli(*common, "--workers", "2", "--batch-size", "2"))
    paths = sorted(varied_images.iterdir())
    assert [r["image"] for r in two] == [str(varied_images / p.name) for p in paths]
    strip = [{k: v for k, v in r.items() if k != "seconds"} for r in one]
    assert [{k: v for k, v in r.items() if k != "seconds"} for r in two] == strip
    assert [r["text"] for r in two_batched] == [r["text"] for r in one]

    rendered = "[INST] <image>\nWhat is shown in this image? [/INST]"
    expected = [hf_reference.answer(tiny_next, rendered, [path], 6) for path in paths]
    assert [r["text"] for r in two] == expected
    assert len(set(expected)) > 1


def test_workers_with_bad_inputs_give_one_record_each(tiny_next, tmp_path):
    (tmp_path / "broken.jpg").write_bytes(b"\xff\xd8\xff not really a jpeg")
    inputs = [EXAMPLES / "chelsea.png", tmp_path / "broken.jpg", EXAMPLES / "rocket.jpg", tmp_path / "missing.png",
              EXAMPLES / "coffee.png"]
    result = run_cli("caption", *inputs, "-m", tiny_next, "--max-new-tokens", "3", "--workers", "2",
                     "--format", "jsonl")
    assert result.exit_code == 1
    records = [json.loads(line) for line in result.stdout.splitlines()]
    assert [r["image"] for r in records] == [str(p) for p in inputs]
    assert ["error" in r for r in records] == [False, True, False, True, False]


@pytest.mark.parametrize("args,env,message", [
    (("--workers", "2", "--seed", "1", "--temperature", "0.7"), {}, "--workers 2 with --seed and sampling"),
    (("--workers", "-1"), {}, "'workers' must be at least 0"),
    ((), {"LLAVA_WORKERS": "two"}, "LLAVA_WORKERS: must be an integer"),
    ((), {"LLAVA_WORKERS": "3", "LLAVA_SEED": "4", "LLAVA_TEMPERATURE": "0.5"}, "LLAVA_WORKERS 3 with --seed"),
    (("--workers", "2", "--compile"), {}, "cannot be combined with --compile"),
])
def test_workers_mistakes_exit_2_before_the_model_loads(tmp_path, monkeypatch, args, env, message):
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    result = run_cli("caption", EXAMPLES / "chelsea.png", "-m", tmp_path / "no-such-model", *args)
    assert result.exit_code == 2, result.stderr
    assert message in result.stderr


def test_seeded_sampling_stays_reproducible_with_auto_workers(tiny_next, monkeypatch):
    """Auto picks one worker when sampling is seeded: two runs give the same records."""
    monkeypatch.delenv("LLAVA_WORKERS")
    args = ("caption", EXAMPLES / "chelsea.png", EXAMPLES / "rocket.jpg", EXAMPLES / "coffee.png", "-m", tiny_next,
            "--max-new-tokens", "5", "--temperature", "0.9", "--seed", "7", "--format", "jsonl")
    first, second = _texts(run_cli(*args)), _texts(run_cli(*args))
    assert [r["text"] for r in first] == [r["text"] for r in second]


def test_resolve_workers_rules():
    from llavanext_cli.engine.concurrency import AUTO, resolve_workers, threads_per_worker
    from llavanext_cli.errors import UsageError

    assert resolve_workers(AUTO, "cpu", 10, False, False, False) == 2
    assert resolve_workers(AUTO, "cuda", 10, False, False, False) == 1
    assert resolve_workers(AUTO, "cpu", 10, True, False, False) == 1      # seeded sampling
    assert resolve_workers(AUTO, "cpu", 10, False, False, True) == 1      # one process of a data-parallel run
    assert resolve_workers(AUTO, "cpu", 1, False, False, False) == 1      # one job
    assert resolve_workers(4, "cpu", 3, False, False, False) == 3         # never more than the jobs
    assert resolve_workers(3, "cpu", 10, False, False, True) == 3         # asked for, on a CPU: given
    with pytest.raises(UsageError, match="applies to runs on a CPU"):
        resolve_workers(3, "cuda", 10, False, False, False)
    assert resolve_workers(1, "cuda", 10, False, False, False) == 1
    assert threads_per_worker(2, 2) == 1 and threads_per_worker(2, 16) == 7 and threads_per_worker(1, 16) == 15
    assert threads_per_worker(1, 1) == 1


# --- the image processor's identity steps -------------------------------------------------------------------


def test_skipped_identity_steps_give_the_same_tensors_bit_for_bit(tiny_next, varied_images):
    from PIL import Image

    from llavanext_cli.model.preprocessing import identity_image_steps
    from llavanext_cli.model.loading import load_config, load_processor

    processor = load_processor(str(tiny_next), load_config(str(tiny_next)))
    skips = identity_image_steps(processor.image_processor)
    assert skips == {"do_resize": False, "do_center_crop": False}
    text = "[INST] <image>\nWhat is shown in this image? [/INST]"
    images = [Image.open(path).convert("RGB") for path in sorted(varied_images.iterdir())]
    for image in images:
        full = processor(images=[image], text=[text], padding=True, return_tensors="pt")
        quick = processor(images=[image], text=[text], padding=True, return_tensors="pt", **skips)
        assert full.keys() == quick.keys()
        for key in full:
            assert full[key].dtype == quick[key].dtype and full[key].shape == quick[key].shape, key
            assert bool((full[key] == quick[key]).all()), key
    batch_full = processor(images=images[:3], text=[text] * 3, padding=True, return_tensors="pt")
    batch_quick = processor(images=images[:3], text=[text] * 3, padding=True, return_tensors="pt", **skips)
    assert all(bool((batch_full[k] == batch_quick[k]).all()) for k in batch_full)


def test_identity_steps_are_kept_where_they_do_something(tiny_next, tiny_llava):
    import copy

    from llavanext_cli.model.preprocessing import identity_image_steps
    from llavanext_cli.model.loading import load_config, load_processor

    clip = load_processor(str(tiny_llava), load_config(str(tiny_llava))).image_processor
    assert identity_image_steps(clip) == {}  # LLaVA-1.5: resize then crop, both real
    next_processor = load_processor(str(tiny_next), load_config(str(tiny_next))).image_processor
    other = copy.deepcopy(next_processor)
    other.crop_size = {"height": 224, "width": 224}
    assert identity_image_steps(other) == {}
    tall = copy.deepcopy(next_processor)
    tall.size = {"height": 336, "width": 200}
    assert identity_image_steps(tall) == {}

    class LlavaNextImageProcessor:  # the torchvision backend (not importable here) is not assumed to match
        size = next_processor.size
        crop_size = next_processor.crop_size

    assert identity_image_steps(LlavaNextImageProcessor()) == {}


# --- the pipeline's concurrency -----------------------------------------------------------------------------


def test_run_concurrently_delivers_everything_and_leaves_no_thread():
    from llavanext_cli.engine.pipeline import run_pipelined

    batches = [[i] for i in range(40)]
    out = list(run_pipelined(lambda batch: batch, lambda batch: [(i, i * i) for i in batch], batches, workers=3))
    assert out == [i * i for i in range(40)]
    assert not [t for t in threading.enumerate() if t.name.startswith("llava-worker")]


def test_an_error_in_a_worker_reaches_the_consumer_and_the_others_stop():
    from llavanext_cli.engine.pipeline import run_pipelined

    seen = []

    def run(batch):
        seen.append(batch[0])
        if batch[0] == 5:
            raise ValueError("worker failed on 5")
        return [(batch[0], batch[0])]

    with pytest.raises(ValueError, match="worker failed on 5"):
        list(run_pipelined(lambda batch: batch, run, [[i] for i in range(200)], workers=2))
    assert len(seen) < 200  # the other worker stopped instead of finishing the list
    assert not [t for t in threading.enumerate() if t.name.startswith("llava-worker")]


def test_a_consumer_that_stops_early_cancels_and_waits_for_the_workers():
    from llavanext_cli.engine.pipeline import run_pipelined

    cancelled = threading.Event()
    results = run_pipelined(lambda batch: batch, lambda batch: [(batch[0], batch[0])], [[i] for i in range(500)],
                            workers=2, cancelled=cancelled)
    assert next(results) == 0
    results.close()
    assert cancelled.is_set()
    assert not [t for t in threading.enumerate() if t.name.startswith("llava-worker")]


def test_cancelled_generation_stops_after_the_current_step(tiny_next):
    """The worker side of cancellation: a real generate() with the event set ends at once."""
    from llavanext_cli.engine.generation import generate
    from llavanext_cli.engine.plan import GenerationOptions, plan_execution
    from llavanext_cli.io.images import load_image
    from llavanext_cli.model.checkpoint import open_checkpoint
    from llavanext_cli.io.settings import load_settings

    checkpoint = open_checkpoint(load_settings({"model": str(tiny_next)}, env={}))
    prompt = "[INST] <image>\nWhat is shown in this image? [/INST]"
    image = [[load_image(EXAMPLES / "chelsea.png")]]
    options = plan_execution(checkpoint, GenerationOptions(max_new_tokens=20))
    free = generate(checkpoint, [prompt], image, options, cancelled=threading.Event())
    stop = threading.Event()
    stop.set()
    cut = generate(checkpoint, [prompt], image, options, cancelled=stop)
    assert free[0].new_tokens > 1 and cut[0].new_tokens == 1


def test_a_worker_that_takes_an_item_after_cancellation_does_not_run_it():
    from llavanext_cli.engine.pipeline import _DONE, Source, run_concurrently

    cancelled = threading.Event()
    ran = []

    class CancelledWhileTaking(Source):
        def __init__(self):
            self.items = iter(range(50))
            self.lock = threading.Lock()

        def take(self):
            with self.lock:
                item = next(self.items, _DONE)
            if item == 3:
                cancelled.set()  # the run is abandoned while this worker waited for its item
            return item

        def stop(self):
            pass

    list(run_concurrently(lambda item: ran.append(item) or [(item, item)], CancelledWhileTaking(), 2, cancelled))
    assert 3 not in ran and not [item for item in ran if item > 3]


def test_workers_waiting_for_a_stuck_producer_end_when_the_consumer_stops(monkeypatch):
    """The producer is stuck inside prepare (a slow URL, say) while the workers wait for items: stopping the run
    stops the producer first, so the waiting workers wake up, end and are joined; nothing hangs."""
    from llavanext_cli.engine import pipeline

    monkeypatch.setattr(pipeline, "JOIN_TIMEOUT", 0.5)
    release = threading.Event()

    def prepare(batch):
        if batch[0] >= 1:
            release.wait(60)
        return batch

    results = pipeline.run_pipelined(prepare, lambda batch: [(batch[0], batch[0])], [[i] for i in range(6)],
                                     workers=2)
    assert next(results) == 0
    results.close()
    assert not [t for t in threading.enumerate() if t.name.startswith("llava-worker")]
    release.set()
    for thread in [t for t in threading.enumerate() if t.name == "llava-prefetch"]:
        thread.join(5)
    assert not [t for t in threading.enumerate() if t.name == "llava-prefetch"]


def test_in_input_order_closes_its_source_and_fails_loudly_on_a_lost_result():
    from llavanext_cli.engine.pipeline import in_input_order

    closed = []

    def results():
        try:
            yield 0, "a"
            yield 2, "c"  # input 1 never comes: a bug upstream
        finally:
            closed.append(True)

    with pytest.raises(RuntimeError, match="input 1 never came"):
        list(in_input_order(results()))
    early = in_input_order(results())
    assert next(early) == "a"
    early.close()
    assert closed == [True, True]


def test_bucketing_needs_the_processors_token_count():
    from llavanext_cli.model.preprocessing import image_token_count

    assert image_token_count(object(), (640, 480)) == -1  # a processor that cannot say: no grouping, same answers
    assert image_token_count(object(), None) == -1


# --- the model loads while the first inputs are prepared ----------------------------------------------------


def test_a_checkpoint_that_fails_to_load_writes_no_record(tiny_next, tmp_path):
    """The weights load on first use, after the first inputs are prepared; an input that fails to load must
    still not get a record when the checkpoint itself is broken (exit 3, nothing written)."""
    broken = tmp_path / "broken"
    shutil.copytree(tiny_next, broken)
    (broken / "model.safetensors").write_bytes(b"\x00" * 64)
    (tmp_path / "bad.jpg").write_bytes(b"not an image")
    out = tmp_path / "out.jsonl"
    result = run_cli("caption", tmp_path / "bad.jpg", EXAMPLES / "chelsea.png", "-m", broken, "-o", out,
                     "--workers", "2")
    assert result.exit_code == 3, result.stderr
    assert "a weights file is damaged" in result.stderr and "Traceback" not in result.stderr
    assert not out.exists() or out.read_text() == ""
    # Nothing at all is written before the model loads: an existing text file keeps its content, and json /
    # csv on stdout print nothing (not an empty "[]").
    kept = tmp_path / "captions.txt"
    kept.write_text("yesterday's captions\n")
    result = run_cli("caption", tmp_path / "bad.jpg", EXAMPLES / "chelsea.png", "-m", broken, "-o", kept)
    assert result.exit_code == 3 and kept.read_text() == "yesterday's captions\n"
    for fmt in ("json", "csv", "jsonl", "text"):
        result = run_cli("caption", tmp_path / "bad.jpg", EXAMPLES / "chelsea.png", "-m", broken, "--format", fmt)
        assert result.exit_code == 3 and result.stdout == "", (fmt, result.stdout)


def test_chat_loads_the_model_before_the_first_question(tiny_next):
    """chat does not wait for the person's first message to load the weights (the batch commands do: they load
    while the first inputs are prepared): on a terminal, with -v, the weights load before the first prompt, and
    the first answer comes without a load."""
    import os

    import pexpect

    child = pexpect.spawn(sys.executable, ["-m", "llavanext_cli", "chat", "-m", str(tiny_next), "-v",
                                           "--max-new-tokens", "3"], cwd=str(REPO), encoding="utf-8", timeout=120,
                          env={**{k: v for k, v in os.environ.items() if k != "HF_HUB_DISABLE_PROGRESS_BARS"},
                               "TERM": "dumb"}, dimensions=(40, 200))
    child.expect("Loading weights")
    child.expect("you>")
    time.sleep(0.5)  # readline may drop what is typed before it takes the terminal
    child.sendline("Hello")
    child.expect("llava>")
    child.expect("you>")
    assert "Loading weights" not in child.before
    child.sendeof()
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0


# --- the garbage collector in a real process ----------------------------------------------------------------


def test_a_real_process_defers_collection_until_loaded_and_then_collects(tiny_next):
    """In a real `llava` process, collection is off during start-up, and after the model loads, what is alive is
    frozen and collection is back on for the run (tests calling main() in-process keep their own collector)."""
    probe = (
        "import atexit, gc, sys\n"
        "from llavanext_cli.cli import collector\n"
        "loaded = collector.model_loaded\n"
        "def spy():\n"
        "    print('during start-up', gc.isenabled(), file=sys.stderr)\n"
        "    loaded()\n"
        "    print('after loading', gc.isenabled(), gc.get_freeze_count() > 1000, file=sys.stderr)\n"
        "collector.model_loaded = spy\n"
        "from llavanext_cli.cli.main import main\n"
        f"sys.argv = ['llava', 'caption', {str(EXAMPLES / 'chelsea.png')!r}, '-m', {str(tiny_next)!r},"
        " '--max-new-tokens', '2', '--format', 'jsonl']\n"
        "main()\n"
    )
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=300,
                            cwd=str(REPO))
    assert result.returncode == 0, result.stderr
    assert "during start-up False" in result.stderr
    assert "after loading True True" in result.stderr
    assert json.loads(result.stdout)["image"].endswith("chelsea.png")


def test_collector_policy_is_inert_unless_deferred():
    probe = ("import gc\nfrom llavanext_cli.cli import collector\ncollector.model_loaded()\ncollector.before_exit()\n"
             "print(gc.isenabled(), gc.get_freeze_count())\n")
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=60,
                            cwd=str(Path(REPO)))
    assert result.stdout.split() == ["True", "0"]
