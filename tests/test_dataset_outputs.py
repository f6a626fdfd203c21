"""Training-set outputs: caption files beside the images (--sidecar) and a Hugging Face imagefolder's metadata.jsonl
(--format imagefolder), read back by the real `datasets` client; resumable, refused up front where they cannot work."""

from __future__ import annotations

import json
import os
import shutil
import stat
from http.server import BaseHTTPRequestHandler
from pathlib import Path

import pytest

from conftest import EXAMPLES, TEST_IMAGES, accelerate_launch, http_server, run_cli

TOKENS = ("--max-new-tokens", "3")


def training_folder(folder: Path) -> Path:
    """Four images of different kinds, one of them in a subfolder with a non-ASCII name and a space."""
    (folder / "sub dir").mkdir(parents=True)
    shutil.copy(EXAMPLES / "chelsea.png", folder / "chelsea.png")
    shutil.copy(EXAMPLES / "rocket.jpg", folder / "rocket.jpg")
    shutil.copy(TEST_IMAGES / "horse.png", folder / "sub dir" / "hörse.png")
    shutil.copy(TEST_IMAGES / "no_time_for_that_tiny.gif", folder / "sub dir" / "clip.gif")
    return folder


def images_in(folder: Path) -> list[Path]:
    return sorted(path for path in folder.rglob("*") if path.suffix in (".png", ".jpg", ".gif"))


def records_of(result) -> list[dict]:
    assert result.exit_code in (0, 1), result.stderr
    return [json.loads(line) for line in result.stdout.splitlines()]


def load_imagefolder(folder: Path, cache: Path):
    import datasets

    return datasets.load_dataset("imagefolder", data_dir=str(folder), split="train", cache_dir=str(cache))


def caption_file(image: str | Path) -> Path:
    image = Path(image)
    return image.with_name(image.stem + ".txt")


def one_line(text: str) -> str:
    """What a caption file holds of an answer: its lines joined by one space."""
    return " ".join(line.strip() for line in text.splitlines() if line.strip())


def leftovers(folder: Path) -> list[Path]:
    """Temporary or lock files left behind."""
    return [path for path in folder.rglob(".*") if path.is_file()]


# --- sidecars ------------------------------------------------------------------------------------------------


def test_sidecars_hold_the_answers_then_a_rerun_does_nothing_and_overwrite_redoes(tiny_next, tmp_path):
    folder = training_folder(tmp_path / "set")
    args = ("caption", folder, "-r", "-m", tiny_next, *TOKENS, "--sidecar", "--format", "jsonl")
    result = run_cli(*args, "--prefix", "sks dog, ", "--suffix", ", film grain")
    records = records_of(result)
    assert result.exit_code == 0, result.stderr
    # The records still go to stdout, in input order, one per image.
    assert [record["image"] for record in records] == [str(path) for path in images_in(folder)]
    for record in records:
        written = caption_file(record["image"]).read_bytes()
        expected = "sks dog, " + one_line(record["text"]) + ", film grain"
        assert written == expected.encode("utf-8")  # verbatim, one line, UTF-8, no trailing newline
        mode = stat.S_IMODE(caption_file(record["image"]).stat().st_mode)
        umask = os.umask(0)
        os.umask(umask)
        assert mode == 0o666 & ~umask  # not mkstemp's 0600
    assert not leftovers(folder)
    written = {path: path.stat().st_mtime_ns for path in folder.rglob("*.txt")}
    assert len(written) == 4

    # A rerun skips every image before any work: it does not even open the checkpoint.
    again = run_cli(*args[:3], "-m", tmp_path / "no-such-checkpoint", *args[5:])
    assert again.exit_code == 0, again.stderr
    assert again.stdout == ""
    assert "4 images already have a caption file (STEM.txt), skipped; --overwrite redoes them" in again.stderr
    assert "Nothing to do" in again.stderr
    assert {path: path.stat().st_mtime_ns for path in folder.rglob("*.txt")} == written

    # One caption file removed: only its image is captioned again.
    caption_file(records[1]["image"]).unlink()
    resumed = run_cli(*args, "--prefix", "sks dog, ", "--suffix", ", film grain")
    assert [record["image"] for record in records_of(resumed)] == [records[1]["image"]]
    assert "3 images already have a caption file" in resumed.stderr

    # --overwrite captions them all again, and replaces the files.
    overwritten = run_cli(*args, "--overwrite", "--prefix", "a photo of sks, ")
    assert len(records_of(overwritten)) == 4 and overwritten.exit_code == 0
    for record in records_of(overwritten):
        expected = "a photo of sks, " + one_line(record["text"])
        assert caption_file(record["image"]).read_text(encoding="utf-8") == expected
    assert not leftovers(folder)


def test_ask_writes_its_answer_and_text_output_still_goes_to_stdout(tiny_next, tmp_path):
    folder = training_folder(tmp_path / "set")
    image = folder / "rocket.jpg"
    result = run_cli("ask", image, folder / "chelsea.png", "-q", "List the objects.", "-m", tiny_next, *TOKENS,
                     "--sidecar")
    assert result.exit_code == 0, result.stderr
    lines = result.stdout.splitlines()
    assert len(lines) == 2 and lines[0].startswith(f"{image}\t")
    written = caption_file(image).read_text(encoding="utf-8")
    assert written and written.split() == lines[0].split("\t", 1)[1].split()


class _CountingHandler(BaseHTTPRequestHandler):
    requests = 0

    def do_GET(self):  # noqa: N802 (http.server's name)
        type(self).requests += 1
        body = (EXAMPLES / "rocket.jpg").read_bytes()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture
def server():
    _CountingHandler.requests = 0
    with http_server(_CountingHandler) as url:
        yield url


def test_a_url_input_is_an_error_record_and_writes_no_file(tiny_next, tmp_path, server, monkeypatch):
    folder = training_folder(tmp_path / "set")
    monkeypatch.chdir(tmp_path)
    before = sorted(tmp_path.rglob("*"))
    url = f"{server}/rocket.jpg"
    stdin = f"{folder / 'chelsea.png'}\n{url}\n"
    result = run_cli("caption", "-", "-m", tiny_next, *TOKENS, "--sidecar", "--format", "jsonl", stdin=stdin)
    assert result.exit_code == 1
    local, remote = records_of(result)
    assert "text" in local and caption_file(local["image"]).exists()
    assert remote == {"image": url, "error": remote["error"]}
    assert "--sidecar needs a local image" in remote["error"] and "Warning:" in result.stderr
    assert _CountingHandler.requests == 0  # refused before it was fetched
    assert sorted(tmp_path.rglob("*")) == sorted(before + [caption_file(local["image"])])


def test_a_caption_file_that_cannot_be_written_is_an_error_record_and_the_others_are_written(tiny_next, tmp_path):
    folder = training_folder(tmp_path / "set")
    (folder / "rocket.txt").mkdir()  # where rocket.jpg's caption would go: even root cannot replace a directory
    result = run_cli("caption", folder, "-r", "-m", tiny_next, *TOKENS, "--sidecar", "--format", "jsonl")
    assert result.exit_code == 1
    records = {record["image"]: record for record in records_of(result)}
    failed = records.pop(str(folder / "rocket.jpg"))
    assert set(failed) == {"image", "error"} and "cannot write its caption file" in failed["error"]
    assert all(caption_file(image).read_text(encoding="utf-8") == one_line(record["text"])
               for image, record in records.items())
    assert not leftovers(folder)


def test_a_folder_that_refuses_files_fails_its_images_before_any_work(tiny_next, tmp_path, monkeypatch):
    folder = training_folder(tmp_path / "set")
    locked = folder / "sub dir"
    if os.geteuid() == 0:  # root writes in a read-only folder: the file system's refusal is played instead
        from llavanext_cli.io import dataset_outputs

        real = dataset_outputs.create_temporary

        def refused_in_locked(path):
            if path.parent == locked:
                raise PermissionError(13, "Permission denied", str(path))
            return real(path)

        monkeypatch.setattr(dataset_outputs, "create_temporary", refused_in_locked)
    locked.chmod(0o555)
    try:
        result = run_cli("caption", folder, "-r", "-m", tiny_next, *TOKENS, "--sidecar", "--format", "jsonl")
    finally:
        locked.chmod(0o755)
    records = records_of(result)
    assert result.exit_code == 1
    assert [("error" in record) for record in records] == [False, False, True, True]
    assert all("cannot write its caption file" in record["error"] and "Permission denied" in record["error"]
               for record in records[2:])
    assert caption_file(folder / "chelsea.png").exists() and not list(locked.glob("*.txt"))
    assert result.stderr.count("Warning:") == 2


def test_an_answer_on_several_lines_is_written_on_one():
    from llavanext_cli.io.dataset_outputs import Sidecars, one_line

    assert one_line("A cat on a mat.\n\n  It sleeps. \r\nThe end") == "A cat on a mat. It sleeps. The end"
    assert Sidecars(prefix="ohwx, ", suffix=" --style").content("a\nb") == "ohwx, a b --style"


# --- refusals ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def refusal_folder(tmp_path_factory) -> Path:
    folder = training_folder(tmp_path_factory.mktemp("refusals") / "set")
    shutil.copy(EXAMPLES / "coffee.png", folder / "rocket.png")  # rocket.png and rocket.jpg: one rocket.txt
    (folder / "twice.jsonl").write_text(json.dumps({"image": str(folder / "chelsea.png"), "question": "What?"})
                                        + "\n" + json.dumps({"image": str(folder / "chelsea.png"), "question": "Who?"})
                                        + "\n")
    return folder


@pytest.mark.parametrize("args,message", [
    (("ask", "{set}/chelsea.png", "-q", "What?", "-q", "Who?", "--sidecar"), "is asked more than one question"),
    (("ask", "--questions", "{set}/twice.jsonl", "--sidecar"), "is asked more than one question"),
    (("ask", "{set}/chelsea.png", "{set}/rocket.jpg", "--together", "-q", "What?", "--sidecar"), "--together"),
    (("caption", "{set}/rocket.jpg", "{set}/rocket.png", "--sidecar"), "would both write their caption"),
    (("caption", "{set}/chelsea.png", "--prefix", "sks, "), "--prefix applies to the training-set outputs"),
    (("caption", "{set}/chelsea.png", "--overwrite"), "--overwrite applies to the training-set outputs"),
    (("caption", "{set}", "--sidecar", "--overwrite", "--resume", "-o", "{set}/../out.jsonl"), "give one of them"),
    (("caption", "{set}", "--format", "imagefolder"), "writes DIR/metadata.jsonl"),
    (("caption", "{set}", "--format", "imagefolder", "-o", "{set}/captions.jsonl"), "a file named metadata.jsonl"),
    (("caption", "{set}", str(EXAMPLES / "chelsea.png"), "--format", "imagefolder", "-o", "{set}/metadata.jsonl"),
     f"{EXAMPLES / 'chelsea.png'} is not inside"),
    (("caption", "{set}/sub dir", "--format", "imagefolder", "-o", "{set}/sub dir/deeper/metadata.jsonl"),
     "is not inside"),
    (("classify", "{set}", "--labels", "a,b", "--format", "imagefolder", "-o", "{set}/../metadata.jsonl",
      "http://127.0.0.1:9/cat.jpg"), "is a URL"),
])
def test_what_cannot_work_is_refused_before_the_checkpoint_opens(refusal_folder, tmp_path, args, message):
    args = [arg.replace("{set}", str(refusal_folder)) for arg in args]
    result = run_cli(*args, "-m", tmp_path / "no-such-checkpoint")  # exit 3 if it got as far as the checkpoint
    assert result.exit_code == 2, result.stderr
    assert result.stderr.count("Error:") == 1 and message in result.stderr
    assert not list(refusal_folder.rglob("*.txt")) and not (refusal_folder / "metadata.jsonl").exists()


# --- imagefolder -----------------------------------------------------------------------------------------------


def test_imagefolder_captions_load_with_datasets_and_resume_appends_what_is_missing(tiny_next, tmp_path):
    folder = training_folder(tmp_path / "set")
    (folder / "broken.png").write_bytes(b"not a png")
    metadata = folder / "metadata.jsonl"
    base = ("caption", folder, "-r", "-m", tiny_next, *TOKENS)
    records = records_of(run_cli(*base, "--format", "jsonl"))
    answers = {record["image"]: record["text"] for record in records if "text" in record}

    result = run_cli(*base, "--format", "imagefolder", "-o", metadata, "--prefix", "ohwx, ")
    assert result.exit_code == 1 and "broken.png" in result.stderr  # the failure counts, and is said
    assert result.stdout == ""
    lines = [json.loads(line) for line in metadata.read_text(encoding="utf-8").splitlines()]
    expected = [{"file_name": path.relative_to(folder).as_posix(), "text": "ohwx, " + answers[str(path)]}
                for path in images_in(folder) if path.name != "broken.png"]
    assert lines == expected  # successes only, in input order, POSIX paths relative to the folder
    assert any("/" in line["file_name"] for line in lines)
    assert not leftovers(folder)

    data = load_imagefolder(folder, tmp_path / "cache-1")
    assert data.column_names == ["image", "text"]
    assert [row["text"] for row in data] == [line["text"] for line in lines]
    from PIL import Image

    assert [row["image"].size for row in data] == [Image.open(folder / line["file_name"]).size for line in lines]

    # An interrupted run kept two lines; --resume appends the missing one (and tries the broken image again).
    metadata.write_text("".join(json.dumps(line, ensure_ascii=False) + "\n" for line in lines[:2])
                        + json.dumps(lines[2])[:20], encoding="utf-8")
    resumed = run_cli(*base, "--format", "imagefolder", "-o", metadata, "--prefix", "ohwx, ", "--resume")
    assert resumed.exit_code == 1 and "2 images already have a line in" in resumed.stderr
    assert [json.loads(line) for line in metadata.read_text(encoding="utf-8").splitlines()] == lines
    os.remove(folder / "broken.png")
    nothing = run_cli("caption", folder, "-r", "-m", tmp_path / "no-such-checkpoint", "--format", "imagefolder",
                      "-o", metadata, "--resume")
    assert nothing.exit_code == 0 and "Nothing to do" in nothing.stderr

    # Without --resume too, a rerun is the resume: an image never gets a second line.
    rerun = run_cli("caption", folder, "-r", "-m", tmp_path / "no-such-checkpoint", "--format", "imagefolder",
                    "-o", metadata)
    assert rerun.exit_code == 0 and "4 images already have a line in" in rerun.stderr, rerun.stderr
    assert [json.loads(line) for line in metadata.read_text(encoding="utf-8").splitlines()] == lines
    # A run killed after appending a line it was redoing left an image on two lines: the next run keeps the newest.
    stale = {**lines[0], "text": "ohwx, an older caption"}
    metadata.write_text("".join(json.dumps(line, ensure_ascii=False) + "\n" for line in [stale, *lines[:3]]),
                        encoding="utf-8")
    tidied = run_cli(*base, "--format", "imagefolder", "-o", metadata, "--prefix", "ohwx, ")
    assert tidied.exit_code == 0 and "3 images already have a line in" in tidied.stderr, tidied.stderr
    assert [json.loads(line) for line in metadata.read_text(encoding="utf-8").splitlines()] == lines
    # --overwrite does every image again and replaces its line.
    overwritten = run_cli(*base, "--format", "imagefolder", "-o", metadata, "--prefix", "sks, ", "--overwrite")
    assert overwritten.exit_code == 0, overwritten.stderr
    assert [json.loads(line) for line in metadata.read_text(encoding="utf-8").splitlines()] == [
        {**line, "text": "sks, " + line["text"].removeprefix("ohwx, ")} for line in lines]
    assert load_imagefolder(folder, tmp_path / "cache-2").num_rows == len(lines)
    assert not leftovers(folder)


def test_imagefolder_classify_writes_labels(tiny_next, tmp_path):
    folder = training_folder(tmp_path / "set")
    metadata = folder / "metadata.jsonl"
    labels = ("--labels", "a cat,a rocket,a horse")
    records = records_of(run_cli("classify", folder, "-r", "-m", tiny_next, *labels, "--format", "jsonl"))
    result = run_cli("classify", folder, "-r", "-m", tiny_next, *labels, "--format", "imagefolder", "-o", metadata)
    assert result.exit_code == 0, result.stderr
    lines = [json.loads(line) for line in metadata.read_text(encoding="utf-8").splitlines()]
    assert lines == [{"file_name": Path(record["image"]).relative_to(folder).as_posix(), "label": record["label"]}
                     for record in records]
    data = load_imagefolder(folder, tmp_path / "cache")
    assert data.column_names == ["image", "label"]
    assert [row["label"] for row in data] == [record["label"] for record in records]


def test_imagefolder_of_several_questions_names_the_prompt_and_together_names_the_images(tiny_next, tmp_path):
    folder = training_folder(tmp_path / "set")
    metadata = folder / "metadata.jsonl"
    args = ("ask", folder / "chelsea.png", folder / "rocket.jpg", "-q", "What is it?", "-q", "Where is it?",
            "-m", tiny_next, *TOKENS)
    records = records_of(run_cli(*args, "--format", "jsonl"))
    assert run_cli(*args, "--format", "imagefolder", "-o", metadata).exit_code == 0
    lines = [json.loads(line) for line in metadata.read_text(encoding="utf-8").splitlines()]
    assert lines == [{"file_name": Path(r["image"]).name, "prompt": r["prompt"], "text": r["text"]} for r in records]
    data = load_imagefolder(folder, tmp_path / "cache-1")
    assert data.column_names == ["image", "prompt", "text"] and data.num_rows == 4  # an image on two rows
    # --resume keys on (image, prompt).
    metadata.write_text("".join(json.dumps(line) + "\n" for line in lines[:3]))
    resumed = run_cli(*args, "--format", "imagefolder", "-o", metadata, "--resume")
    assert resumed.exit_code == 0 and "3 inputs already have a line in" in resumed.stderr
    assert [json.loads(line) for line in metadata.read_text(encoding="utf-8").splitlines()] == lines
    # A later run of one prompt over the same images finds them done, and leaves each question's line alone.
    later = run_cli("caption", folder / "chelsea.png", folder / "rocket.jpg", "-m", tmp_path / "no-such-checkpoint",
                    "--format", "imagefolder", "-o", metadata)
    assert later.exit_code == 0 and "Nothing to do" in later.stderr, later.stderr
    assert [json.loads(line) for line in metadata.read_text(encoding="utf-8").splitlines()] == lines

    pairs = training_folder(tmp_path / "pairs")
    together = ("ask", pairs / "chelsea.png", pairs / "sub dir" / "hörse.png", "--together", "-q", "Compare them.",
                "-m", tiny_next, *TOKENS)
    [record] = records_of(run_cli(*together, "--format", "jsonl"))
    assert run_cli(*together, "--format", "imagefolder", "-o", pairs / "metadata.jsonl").exit_code == 0
    data = load_imagefolder(pairs, tmp_path / "cache-2")
    assert data.column_names == ["images", "text"] and data[0]["text"] == record["text"]
    from PIL import Image

    assert [image.size for image in data[0]["images"]] == [Image.open(path).size for path in together[1:3]]


def test_a_second_run_on_the_same_metadata_file_refuses(tiny_next, tmp_path):
    from llavanext_cli.io.writers import OutputLock

    folder = training_folder(tmp_path / "set")
    lock = OutputLock(folder / "metadata.jsonl")  # a first run, writing
    try:
        result = run_cli("caption", folder, "-m", tiny_next, *TOKENS, "--format", "imagefolder",
                         "-o", folder / "metadata.jsonl")
    finally:
        lock.release()
    assert result.exit_code == 2 and "another llava run is writing" in result.stderr
    assert not (folder / "metadata.jsonl").exists()


def test_schema_answers_become_columns(tmp_path):
    """A --schema answer's object: one column per top-level property (a name the line already uses is
    "data.NAME"), loaded by datasets with its type."""
    from llavanext_cli.io.dataset_outputs import ImageFolder
    from llavanext_cli.io.records import Answer, Subject

    folder = training_folder(tmp_path / "set")
    data = [{"kind": "cat", "count": 1, "tags": ["fur"], "text": "a cat"},
            {"kind": "rocket", "count": 2, "tags": [], "text": "a rocket"}]
    answers = [Answer(Subject.of(str(folder / name)), "Describe.", json.dumps(item), "m", 3, 0.1, data=item)
               for name, item in zip(["chelsea.png", "rocket.jpg"], data)]
    imagefolder = ImageFolder(folder / "metadata.jsonl")
    lines = [imagefolder.row(answer.to_json()) for answer in answers]
    assert lines[0] == {"file_name": "chelsea.png", "text": json.dumps(data[0]), "kind": "cat", "count": 1,
                        "tags": ["fur"], "data.text": "a cat"}
    (folder / "metadata.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    loaded = load_imagefolder(folder, tmp_path / "cache")
    assert loaded.column_names == ["image", "text", "kind", "count", "tags", "data.text"]
    assert loaded["count"] == [1, 2] and loaded["tags"] == [["fur"], []]


def test_schema_answers_through_the_cli(tiny_next, tmp_path):
    pytest.importorskip("llavanext_cli.engine.structured", reason="--schema is not implemented yet")
    folder = training_folder(tmp_path / "set")
    schema = json.dumps({"type": "object", "properties": {"kind": {"enum": ["cat", "rocket", "horse"]},
                                                          "count": {"type": "integer", "minimum": 0, "maximum": 9}},
                         "required": ["kind", "count"], "additionalProperties": False})
    result = run_cli("caption", folder, "-r", "-m", tiny_next, "--max-new-tokens", "40", "--schema", schema,
                     "--format", "imagefolder", "-o", folder / "metadata.jsonl")
    assert result.exit_code in (0, 1), result.stderr
    data = load_imagefolder(folder, tmp_path / "cache")
    assert {"kind", "count", "text"} <= set(data.column_names)
    assert all(row["kind"] in ("cat", "rocket", "horse") and 0 <= row["count"] <= 9 for row in data)


# --- data parallel -------------------------------------------------------------------------------------------


def test_two_processes_write_their_own_caption_files_and_merge_the_metadata(tiny_next, tmp_path):
    folder = training_folder(tmp_path / "set")
    caption_file(folder / "chelsea.png").write_text("kept")
    args = ("caption", folder, "-r", "-m", tiny_next, *TOKENS, "--sidecar", "--format", "imagefolder",
            "-o", folder / "metadata.jsonl")
    process = accelerate_launch(*args)
    _, stderr = process.communicate(timeout=300)
    assert process.returncode == 0, stderr
    assert "(1 image already has a caption file (STEM.txt), skipped; --overwrite redoes it)" in stderr
    lines = [json.loads(line) for line in (folder / "metadata.jsonl").read_text(encoding="utf-8").splitlines()]
    assert [line["file_name"] for line in lines] == ["rocket.jpg", "sub dir/clip.gif", "sub dir/hörse.png"]
    assert caption_file(folder / "chelsea.png").read_text() == "kept"
    assert all(caption_file(folder / line["file_name"]).read_text(encoding="utf-8") == one_line(line["text"])
               for line in lines)
    assert not leftovers(folder) and not list(folder.glob("metadata.jsonl.rank*"))
    # The one-process run of the same command gives the same answers.
    single = training_folder(tmp_path / "single")
    caption_file(single / "chelsea.png").write_text("kept")
    assert run_cli(*[str(a).replace(str(folder), str(single)) for a in args]).exit_code == 0
    assert (single / "metadata.jsonl").read_text(encoding="utf-8") == (folder / "metadata.jsonl").read_text(
        encoding="utf-8")
