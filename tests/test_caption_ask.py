"""caption and ask: inputs, URLs, batching equal to one-at-a-time transformers, records, --resume, flags."""

from __future__ import annotations

import csv
import io
import json
import shutil
import time
from http.server import BaseHTTPRequestHandler

import pytest

from conftest import EXAMPLES, TEST_IMAGES, http_server, run_cli

PROMPT = "What is shown in this image?"
RENDERED = {
    "tiny_next": "[INST] <image>\nWhat is shown in this image? [/INST]",
    "tiny_llava": "USER: <image>\nWhat is shown in this image? ASSISTANT:",
}


def records_of(result):
    assert result.exit_code in (0, 1), result.stderr
    return [json.loads(line) for line in result.stdout.splitlines()]


@pytest.fixture(scope="module")
def mixed_folder(tmp_path_factory):
    """Images of mixed sizes, aspect ratios and modes (grey, RGBA, GIF, TIFF, text page)."""
    folder = tmp_path_factory.mktemp("mixed")
    for source in [EXAMPLES / "chelsea.png", EXAMPLES / "rocket.jpg", EXAMPLES / "coffee.png",
                   TEST_IMAGES / "page.png", TEST_IMAGES / "camera.png", TEST_IMAGES / "horse.png",
                   TEST_IMAGES / "no_time_for_that_tiny.gif"]:
        shutil.copy(source, folder / source.name)
    return folder


def reference_answers(hf_reference, checkpoint, paths, rendered, max_new_tokens, **generate):
    """One image at a time, the way the seeds' snippets do it (with the contract's image loading)."""
    return [hf_reference.answer(checkpoint, rendered, [path], max_new_tokens, **generate) for path in paths]


@pytest.mark.parametrize("fixture", ["tiny_next", "tiny_llava"])
def test_batched_caption_equals_one_at_a_time_transformers(request, hf_reference, mixed_folder, fixture):
    checkpoint = request.getfixturevalue(fixture)
    result = run_cli("caption", mixed_folder, "-m", checkpoint, "--prompt", PROMPT, "--max-new-tokens", "8",
                     "--batch-size", "3", "--format", "jsonl")
    records = records_of(result)
    assert result.exit_code == 0
    paths = sorted(mixed_folder.iterdir())
    assert [r["image"] for r in records] == [str(mixed_folder / p.name) for p in paths]
    expected = reference_answers(hf_reference, checkpoint, paths, RENDERED[fixture], 8)
    assert [r["text"] for r in records] == expected
    assert len(set(expected)) > 1


def test_inputs_directory_glob_stdin_and_odd_names(tiny_next, tmp_path):
    folder = tmp_path / "dir with spaces"
    (folder / "sub").mkdir(parents=True)
    shutil.copy(EXAMPLES / "chelsea.png", folder / "b-chelsea.PNG")
    shutil.copy(EXAMPLES / "rocket.jpg", folder / "a-ünïcödé.jpg")
    shutil.copy(EXAMPLES / "rocket.jpg", folder / ".hidden.jpg")
    shutil.copy(EXAMPLES / "rocket.jpg", folder / "sub" / "c.jpg")
    (folder / "notes.txt").write_text("not an image")
    odd = tmp_path / "picture.data"
    shutil.copy(EXAMPLES / "coffee.png", odd)

    def images(*args, stdin=""):
        result = run_cli("caption", *args, "-m", tiny_next, "--max-new-tokens", "2", "--format", "jsonl", stdin=stdin)
        return [r["image"] for r in records_of(result)]

    assert images(folder) == [str(folder / "a-ünïcödé.jpg"), str(folder / "b-chelsea.PNG")]
    assert images(folder, "--recursive")[-1] == str(folder / "sub" / "c.jpg")
    assert images(str(folder / "*.jpg")) == [str(folder / "a-ünïcödé.jpg")]
    assert images(odd) == [str(odd)]  # a file named explicitly is tried whatever its extension
    stdin = f"# a comment\n\n{EXAMPLES / 'rocket.jpg'}\n  {odd}  \n"
    assert images("-", stdin=stdin) == [str(EXAMPLES / "rocket.jpg"), str(odd)]


class _Handler(BaseHTTPRequestHandler):
    def do_GET(self):  # noqa: N802 (http.server's name)
        if self.path == "/rocket.jpg":
            body = (EXAMPLES / "rocket.jpg").read_bytes()
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
        elif self.path == "/text":
            self.send_response(200)
            self.end_headers()
            self.wfile.write(b"<html>not an image</html>")
        elif self.path == "/slow":
            time.sleep(3)
            self.send_response(200)
            self.end_headers()
        else:
            self.send_error(404)

    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def server():
    with http_server(_Handler) as url:
        yield url


def test_urls(tiny_next, server, monkeypatch, tmp_path):
    monkeypatch.setenv("LLAVA_URL_TIMEOUT", "1")
    urls = [f"{server}/rocket.jpg", f"{server}/missing.jpg", f"{server}/text", f"{server}/slow"]
    result = run_cli("caption", *urls, "-m", tiny_next, "--max-new-tokens", "3", "--format", "jsonl")
    assert result.exit_code == 1
    ok, missing, text, slow = records_of(result)
    assert ok["image"] == urls[0] and "text" in ok
    local = records_of(run_cli("caption", EXAMPLES / "rocket.jpg", "-m", tiny_next, "--max-new-tokens", "3",
                               "--format", "jsonl"))
    assert ok["text"] == local[0]["text"]
    assert "404" in missing["error"] and "not an image" in text["error"] and "timed out" in slow["error"]
    monkeypatch.setenv("LLAVA_URL_MAX_BYTES", "1000")
    [big] = records_of(run_cli("caption", urls[0], "-m", tiny_next, "--format", "jsonl"))
    assert "too large" in big["error"]


def test_bad_inputs_are_error_records_and_the_rest_run(tiny_next, tmp_path):
    empty = tmp_path / "empty.jpg"
    empty.write_bytes(b"")
    junk = tmp_path / "junk.png"
    junk.write_bytes(b"definitely not a png")
    truncated = tmp_path / "truncated.jpg"
    truncated.write_bytes((EXAMPLES / "rocket.jpg").read_bytes()[:3000])
    inputs = [EXAMPLES / "chelsea.png", empty, junk, truncated, tmp_path / "missing.jpg", EXAMPLES / "rocket.jpg"]
    result = run_cli("caption", *inputs, "-m", tiny_next, "--max-new-tokens", "2", "--format", "jsonl",
                     "--batch-size", "4")
    records = records_of(result)
    assert result.exit_code == 1
    assert [r["image"] for r in records] == [str(p) for p in inputs]
    assert ["text" in r for r in records] == [True, False, False, False, False, True]
    assert all(set(r) == {"image", "error"} for r in records[1:5])


def test_formats_and_output_files(tiny_next, tmp_path):
    args = ("caption", EXAMPLES / "chelsea.png", EXAMPLES / "rocket.jpg", "-m", tiny_next, "--max-new-tokens", "3")
    jsonl = records_of(run_cli(*args, "--format", "jsonl"))
    assert set(jsonl[0]) == {"image", "prompt", "text", "model", "new_tokens", "seconds"}
    as_json = json.loads(run_cli(*args, "--format", "json").stdout)
    assert [r["text"] for r in as_json] == [r["text"] for r in jsonl]
    rows = list(csv.DictReader(io.StringIO(run_cli(*args, "--format", "csv").stdout)))
    assert [row["text"] for row in rows] == [r["text"] for r in jsonl]
    text = run_cli(*args).stdout.splitlines()
    assert text == [f"{r['image']}\t{' '.join(r['text'].split(chr(10)))}" for r in jsonl]
    single = run_cli("caption", EXAMPLES / "chelsea.png", "-m", tiny_next, "--max-new-tokens", "3").stdout
    assert single == jsonl[0]["text"] + "\n"
    for suffix, load in ((".jsonl", lambda s: [json.loads(x) for x in s.splitlines()]), (".json", json.loads),
                         (".csv", lambda s: list(csv.DictReader(io.StringIO(s))))):
        out = tmp_path / f"out{suffix}"
        result = run_cli(*args, "-o", out)
        assert result.exit_code == 0 and result.stdout == ""
        assert [r["text"] for r in load(out.read_text())] == [r["text"] for r in jsonl]


def test_resume_completes_the_set_without_duplicates(tiny_next, tmp_path):
    inputs = [EXAMPLES / "chelsea.png", EXAMPLES / "rocket.jpg", EXAMPLES / "coffee.png"]
    out = tmp_path / "out.jsonl"
    full = records_of(run_cli("caption", *inputs, "-m", tiny_next, "--max-new-tokens", "3", "--format", "jsonl"))
    # An interrupted run: the first record finished, the second failed, the third cut off mid-line.
    out.write_text(json.dumps(full[0]) + "\n" + json.dumps({"image": str(inputs[1]), "error": "boom"}) + "\n"
                   + json.dumps(full[2])[:25])
    result = run_cli("caption", *inputs, "-m", tiny_next, "--max-new-tokens", "3", "-o", out, "--resume")
    assert result.exit_code == 0, result.stderr
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    successes = [r for r in lines if "text" in r]
    assert sorted(r["image"] for r in successes) == sorted(map(str, inputs))
    assert {r["image"]: r["text"] for r in successes} == {r["image"]: r["text"] for r in full}
    again = run_cli("caption", *inputs, "-m", tiny_next, "-o", out, "--resume")
    assert again.exit_code == 0 and "Nothing to do" in again.stderr
    assert run_cli("caption", *inputs, "-m", tiny_next, "--resume").exit_code == 2
    assert run_cli("caption", *inputs, "-m", tiny_next, "-o", tmp_path / "x.csv", "--resume").exit_code == 2


def test_generation_flags(tiny_next, hf_reference, monkeypatch):
    monkeypatch.delenv("LLAVA_WORKERS")  # auto: one worker when sampling is seeded
    base = ("caption", EXAMPLES / "chelsea.png", "-m", tiny_next, "--format", "jsonl")
    [short] = records_of(run_cli(*base, "--max-new-tokens", "3"))
    [longer] = records_of(run_cli(*base, "--max-new-tokens", "9"))
    assert short["new_tokens"] == 3 and longer["new_tokens"] == 9  # the random model never stops by itself
    assert longer["text"].startswith(short["text"]) and len(longer["text"]) > len(short["text"])
    assert 0 < short["seconds"] < 60
    sample = ("--temperature", "1.5", "--top-p", "0.9", "--max-new-tokens", "8")
    first = records_of(run_cli(*base, *sample, "--seed", "1"))[0]["text"]
    assert records_of(run_cli(*base, *sample, "--seed", "1"))[0]["text"] == first
    others = {records_of(run_cli(*base, *sample, "--seed", str(seed)))[0]["text"] for seed in (2, 3, 4)}
    assert others - {first}
    [beams] = records_of(run_cli(*base, "--num-beams", "3", "--max-new-tokens", "8"))
    rendered = "[INST] <image>\nDescribe this image in detail. [/INST]"  # the default prompt
    assert beams["text"] == hf_reference.answer(tiny_next, rendered, [EXAMPLES / "chelsea.png"], 8, num_beams=3)
    assert beams["text"] != hf_reference.answer(tiny_next, rendered, [EXAMPLES / "chelsea.png"], 8)  # not greedy
    assert run_cli(*base, "--temperature", "-1").exit_code == 2


def test_ask_each_and_together(tiny_next, hf_reference):
    images = [EXAMPLES / "chelsea.png", EXAMPLES / "rocket.jpg"]
    each = records_of(run_cli("ask", *images, "-q", "What colour?", "-m", tiny_next, "--max-new-tokens", "5",
                              "--format", "jsonl"))
    assert [r["prompt"] for r in each] == ["What colour?"] * 2
    assert [r["text"] for r in each] == reference_answers(
        hf_reference, tiny_next, images, "[INST] <image>\nWhat colour? [/INST]", 5)
    [together] = records_of(run_cli("ask", *images, "--together", "-q", "Which is older?", "-m", tiny_next,
                                    "--max-new-tokens", "5", "--format", "jsonl"))
    assert together["images"] == [str(p) for p in images] and "image" not in together
    assert together["text"] == hf_reference.answer(tiny_next, "[INST] <image>\n<image>\nWhich is older? [/INST]",
                                                   images, 5)


def test_ask_questions_file(tiny_next, tmp_path):
    lines = [
        {"image": str(EXAMPLES / "chelsea.png"), "question": "Is it a cat?", "id": "q1", "answer": "yes",
         "label": "cat", "model": "another"},  # named like a record's own keys: not copied, and said so
        {"images": [str(EXAMPLES / "chelsea.png"), str(EXAMPLES / "rocket.jpg")], "question": "Same?", "id": "q2"},
        {"image": str(tmp_path / "gone.jpg"), "question": "Anything?", "id": "q3"},
    ]
    data = "\n".join(json.dumps(line) for line in lines) + "\n\n"
    questions = tmp_path / "vqa.jsonl"
    questions.write_text(data)
    result = run_cli("ask", "--questions", questions, "-m", tiny_next, "--max-new-tokens", "3", "--format", "jsonl",
                     "--batch-size", "2")
    records = records_of(result)
    assert result.exit_code == 1
    assert [r["id"] for r in records] == ["q1", "q2", "q3"]
    assert records[0]["answer"] == "yes" and records[0]["prompt"] == "Is it a cat?" and "text" in records[0]
    assert "label" not in records[0] and records[0]["model"] == str(tiny_next)
    assert result.stderr.count('"label", "model" are keys of the records this command writes, not copied') == 1
    assert records[1]["images"] == lines[1]["images"] and "text" in records[1]
    assert "error" in records[2] and records[2]["id"] == "q3"
    from_stdin = records_of(run_cli("ask", "--questions", "-", "-m", tiny_next, "--max-new-tokens", "3",
                                    "--format", "jsonl", stdin=data))
    assert [r.get("text") for r in from_stdin] == [r.get("text") for r in records]
    out = tmp_path / "answers.jsonl"
    out.write_text(json.dumps(records[0]) + "\n")
    resumed = run_cli("ask", "--questions", questions, "-m", tiny_next, "--max-new-tokens", "3", "-o", out, "--resume")
    assert resumed.exit_code == 1
    assert [json.loads(line)["id"] for line in out.read_text().splitlines()] == ["q1", "q2", "q3"]


@pytest.mark.parametrize("content,message", [
    ("not json\n", ":1: not a JSON object"),
    ('{"image": "a.jpg"}\n', ":1: needs a non-empty \"question\""),
    ('{"question": "q"}\n', ":1: needs exactly one of"),
    ('{"image": "a.jpg", "question": "q"}\n{"images": [], "question": "q"}\n', ":2: \"images\" must be"),
    ("\n", "no questions"),
])
def test_bad_questions_file_exits_2_naming_the_line(tiny_next, tmp_path, content, message):
    questions = tmp_path / "q.jsonl"
    questions.write_text(content)
    result = run_cli("ask", "--questions", questions, "-m", tiny_next)
    assert result.exit_code == 2 and message in result.stderr


@pytest.mark.parametrize("args,message", [
    (("ask", "x.jpg"), "no question"),
    (("ask", "-q", "why?"), "no input images"),
    (("ask", "x.jpg", "-q", "a", "--questions", "q.jsonl"), "--questions takes"),
    (("caption",), "no input images"),
])
def test_usage_errors(args, message):
    result = run_cli(*args)
    assert result.exit_code == 2 and message in result.stderr


def test_unwritable_output_fails_before_the_model_loads(tmp_path):
    result = run_cli("caption", EXAMPLES / "chelsea.png", "-m", tmp_path / "no-model", "-o", tmp_path / "no" / "x.jsonl")
    assert result.exit_code == 2 and "does not exist" in result.stderr


def test_plan_batches_groups_equal_token_counts_and_keeps_every_input():
    from llavanext_cli.engine.pipeline import in_input_order, plan_batches

    counts = [1500, 2000, 1500, 2000, 1700, 1500, 2000, 2100]
    batches = plan_batches(counts, batch_size=2, tolerance=0.0)
    assert sorted(i for batch in batches for i in batch) == list(range(len(counts)))
    assert all(len({counts[i] for i in batch}) == 1 and len(batch) <= 2 for batch in batches)
    near = plan_batches(counts, batch_size=4, tolerance=0.1)
    assert all(max(counts[i] for i in b) - min(counts[i] for i in b) <= 0.1 * max(counts[i] for i in b) for b in near)
    assert plan_batches(counts, batch_size=1) == [[i] for i in range(len(counts))]
    shuffled = [(i, f"r{i}") for batch in batches for i in batch]
    assert list(in_input_order(shuffled)) == [f"r{i}" for i in range(len(counts))]


def test_prefetch_matches_no_prefetch_and_fast_decode_runs(tiny_next, mixed_folder):
    from llavanext_cli.engine.answering import answer_jobs
    from llavanext_cli.io.questions import PromptJob
    from llavanext_cli.model.checkpoint import open_checkpoint
    from llavanext_cli.engine.plan import GenerationOptions, plan_execution
    from llavanext_cli.io.records import Subject
    from llavanext_cli.io.settings import load_settings

    checkpoint = open_checkpoint(load_settings({"model": str(tiny_next)}, env={}))
    jobs = [PromptJob(Subject.of(str(p)), PROMPT) for p in sorted(mixed_folder.iterdir())]
    options = plan_execution(checkpoint, GenerationOptions(max_new_tokens=4))
    plain = list(answer_jobs(checkpoint, jobs, options, batch_size=2, prefetch=False))
    ahead = list(answer_jobs(checkpoint, jobs, options, batch_size=2, prefetch=True))
    assert [r.text for r in plain] == [r.text for r in ahead]
    assert [r.subject for r in ahead] == [job.subject for job in jobs]
    result = run_cli("caption", mixed_folder, "-m", tiny_next, "--max-new-tokens", "3", "--fast-decode",
                     "--format", "jsonl")
    assert result.exit_code == 0 and len(result.stdout.splitlines()) == len(jobs)


def test_fast_decode_reduces_large_jpegs_only(tmp_path):
    from PIL import Image

    from llavanext_cli.io.images import load_image

    Image.new("RGB", (4000, 3000), "teal").save(tmp_path / "big.jpg")
    Image.new("RGB", (4000, 3000), "teal").save(tmp_path / "big.png")
    assert load_image(tmp_path / "big.jpg").size == (4000, 3000)
    reduced = load_image(tmp_path / "big.jpg", draft_edge=1008)
    assert reduced.size == (2000, 1500) and min(reduced.size) >= 1008
    assert load_image(tmp_path / "big.png", draft_edge=1008).size == (4000, 3000)


def test_out_of_memory_halves_the_batch_and_drops_nothing(tiny_next, mixed_folder, tmp_path):
    """Simulated: the model 'runs out of memory' on batches of more than one; every item still gets its answer,
    the same as without the error."""
    import torch

    from llavanext_cli.engine.answering import answer_jobs
    from llavanext_cli.io.questions import PromptJob
    from llavanext_cli.model.checkpoint import open_checkpoint
    from llavanext_cli.engine.plan import GenerationOptions, plan_execution
    from llavanext_cli.io.records import Subject
    from llavanext_cli.io.settings import load_settings

    checkpoint = open_checkpoint(load_settings({"model": str(tiny_next)}, env={}))
    jobs = [PromptJob(Subject.of(str(p)), PROMPT) for p in sorted(mixed_folder.iterdir())]
    options = plan_execution(checkpoint, GenerationOptions(max_new_tokens=4))
    expected = [r.text for r in answer_jobs(checkpoint, jobs, options, batch_size=1)]
    real_generate = checkpoint.model.generate
    sizes = []

    def flaky_generate(**kwargs):
        sizes.append(kwargs["input_ids"].shape[0])
        if kwargs["input_ids"].shape[0] > 1:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")
        return real_generate(**kwargs)

    checkpoint.model.generate = flaky_generate
    # Equal token counts make real batches: four different pictures of one size (four jobs about the same image would
    # be one unit sharing its prefix, which is not generate's halving).
    from PIL import Image, ImageOps

    cat = Image.open(mixed_folder / "chelsea.png").convert("RGB")
    for name, picture in (("a", cat), ("b", ImageOps.mirror(cat)), ("c", ImageOps.flip(cat)), ("d", ImageOps.invert(cat))):
        picture.save(tmp_path / f"{name}.png")
    same = [PromptJob(Subject.of(str(tmp_path / f"{name}.png")), PROMPT) for name in "abcd"]
    records = list(answer_jobs(checkpoint, jobs + same, options, batch_size=4))
    assert [r.text for r in records[:len(jobs)]] == expected
    assert len(records) == len(jobs) + 4 and all(r.ok for r in records)
    assert max(sizes) > 1  # a real batch was tried, failed, and was split


def test_directory_records_keep_the_users_spelling(tiny_next, tmp_path, monkeypatch):
    (tmp_path / "imgs").mkdir()
    shutil.copy(EXAMPLES / "chelsea.png", tmp_path / "imgs" / "chelsea.png")
    monkeypatch.chdir(tmp_path)
    for argument, expected in (("./imgs/", "./imgs/chelsea.png"), ("imgs", "imgs/chelsea.png"),
                               ("./imgs", "./imgs/chelsea.png")):
        [record] = records_of(run_cli("caption", argument, "-m", tiny_next, "--max-new-tokens", "2",
                                      "--format", "jsonl"))
        assert record["image"] == expected


def test_a_glob_matching_nothing_is_reported(tiny_next, tmp_path):
    result = run_cli("caption", str(tmp_path / "*.jpg"), EXAMPLES / "chelsea.png", "-m", tiny_next,
                     "--max-new-tokens", "2")
    assert result.exit_code == 0 and "no file matches" in result.stderr
