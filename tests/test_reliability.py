"""Hostile checkpoints never run code; hostile inputs are error records; interruptions keep every finished record;
two writers refuse to share a file; mistakes are caught before the model loads; a thousand inputs, one record each,
flat memory."""

from __future__ import annotations

import json
import pickle
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from llavanext_cli.errors import InputError
from llavanext_cli.io.images import image_from_bytes

from conftest import EXAMPLES, REPO, TEST_IMAGES, folder_of_examples, run_cli

IMAGE = EXAMPLES / "chelsea.png"


class _Payload:
    """Unpickling this object runs code: it writes the marker file."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (exec, (f"open({self.marker!r}, 'w').write('pwned')",))


def _every_command(checkpoint: Path) -> list[tuple[str, ...]]:
    return [("caption", IMAGE, "-m", checkpoint), ("ask", IMAGE, "-q", "hi", "-m", checkpoint),
            ("classify", IMAGE, "--labels", "a,b", "-m", checkpoint), ("inspect-config", checkpoint),
            ("chat", "-m", checkpoint)]


def test_pickle_weights_are_never_unpickled(tmp_path, tiny_next):
    marker = tmp_path / "MARKER-pickle"
    hostile = tmp_path / "pickled"
    shutil.copytree(tiny_next, hostile)
    (hostile / "model.safetensors").unlink()
    (hostile / "pytorch_model.bin").write_bytes(pickle.dumps(_Payload(marker)))
    for command in _every_command(hostile):
        result = run_cli(*command, stdin="hello\n")
        assert result.exit_code == 3, (command, result.stderr)
        assert "safetensors" in result.stderr
    assert not marker.exists()
    pickle.loads((hostile / "pytorch_model.bin").read_bytes())  # the payload is real: unpickling does run it
    assert marker.exists()


@pytest.mark.parametrize("where", ["config.json", "tokenizer_config.json", "processor_config.json"])
def test_remote_code_is_never_imported(tmp_path, tiny_next, where):
    marker = tmp_path / f"MARKER-{where}"
    hostile = tmp_path / "remote"
    shutil.copytree(tiny_next, hostile)
    (hostile / "evil.py").write_text(f"open({str(marker)!r}, 'w').write('pwned')\nclass Evil: pass\n")
    data = json.loads((hostile / where).read_text())
    data["auto_map"] = {"AutoConfig": "evil.Evil", "AutoModelForImageTextToText": "evil.Evil",
                        "AutoProcessor": "evil.Evil", "AutoTokenizer": ["evil.Evil", None]}
    if where == "config.json":
        data["model_type"] = "evil-llava"  # unknown to transformers: only remote code could load it
    (hostile / where).write_text(json.dumps(data))
    for command in _every_command(hostile):
        result = run_cli(*command, stdin="hello\n")
        assert result.exit_code == 3, (command, result.stderr)
        assert "never runs code" in result.stderr
    assert not marker.exists()


_SEEDS = [(EXAMPLES / "rocket.jpg").read_bytes()[:6000], (TEST_IMAGES / "horse.png").read_bytes(),
          (TEST_IMAGES / "no_time_for_that_tiny.gif").read_bytes(), (TEST_IMAGES / "multipage.tif").read_bytes()]


@st.composite
def _mutated_image_bytes(draw):
    data = bytearray(draw(st.sampled_from(_SEEDS)))
    for _ in range(draw(st.integers(0, 8))):
        position = draw(st.integers(0, len(data) - 1))
        data[position] = draw(st.integers(0, 255))
    cut = draw(st.integers(0, len(data)))
    return bytes(data[:cut]) if draw(st.booleans()) else bytes(data)


@pytest.mark.filterwarnings("ignore:(Corrupt EXIF|Truncated File|Tag data|Metadata Warning):UserWarning")
@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.one_of(st.binary(max_size=2048), _mutated_image_bytes()))
def test_fuzzed_bytes_give_an_rgb_image_or_an_input_error(data):
    try:
        image = image_from_bytes(data, "fuzz")
    except InputError:
        return
    assert image.mode == "RGB" and image.width > 0 and image.height > 0


def _start(*args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "llavanext_cli", *map(str, args)], cwd=str(REPO),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait_for_lines(path: Path, count: int, process: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if path.exists() and len(path.read_text().splitlines()) >= count:
            return
        if process.poll() is not None:
            raise AssertionError(f"finished before it could be interrupted: {process.stderr.read()}")
        time.sleep(0.05)
    raise AssertionError("no records appeared")


@pytest.mark.parametrize("sig,code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_interrupted_run_keeps_finished_records_and_resume_completes_it(tmp_path, tiny_next, sig, code):
    folder = folder_of_examples(tmp_path / "many", 20)
    out = tmp_path / "out.jsonl"
    args = ("caption", folder, "-m", tiny_next, "--max-new-tokens", "4", "-o", out)
    process = _start(*args)
    _wait_for_lines(out, 3, process)
    process.send_signal(sig)
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == code, stderr
    # Not an error: it says it stops after the current step, and its last line says what is kept and how to go on.
    assert "Error" not in stderr and "Traceback" not in stderr and "Stopping after the current step" in stderr
    assert stderr.strip().splitlines()[-1] == (f"{'Interrupted' if code == 130 else 'Terminated'}: the finished "
                                               f"records are in {out}: run the same command with --resume to do "
                                               "the rest.")
    text = out.read_text()
    assert text.endswith("\n")
    kept = [json.loads(line) for line in text.splitlines()]  # every line is whole
    assert 3 <= len(kept) < 20
    assert [r["image"] for r in kept] == [str(folder / p.name) for p in sorted(folder.iterdir())][:len(kept)]
    resumed = run_cli(*args, "--resume")
    assert resumed.exit_code == 0, resumed.stderr
    final = [json.loads(line) for line in out.read_text().splitlines()]
    assert sorted(r["image"] for r in final) == sorted(str(p) for p in folder.iterdir())  # each once


def test_interrupted_json_output_is_absent_not_partial(tmp_path, tiny_next):
    folder = folder_of_examples(tmp_path / "many", 150)
    out = tmp_path / "out.json"
    process = _start("caption", folder, "-m", tiny_next, "--max-new-tokens", "4", "-o", out)
    deadline = time.time() + 120
    while not [p for p in tmp_path.iterdir() if p.name.startswith(".out.json.")]:  # records are being made
        assert process.poll() is None and time.time() < deadline
        time.sleep(0.05)
    process.send_signal(signal.SIGINT)
    process.communicate(timeout=60)
    assert process.returncode == 130
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out.json")]  # no temporary left behind


def test_second_writer_to_the_same_file_refuses(tmp_path, tiny_next):
    folder = folder_of_examples(tmp_path / "many", 40)
    out = tmp_path / "shared.jsonl"
    first = _start("caption", folder, "-m", tiny_next, "--max-new-tokens", "4", "-o", out)
    _wait_for_lines(out, 1, first)
    second = run_cli("caption", IMAGE, "-m", tiny_next, "-o", out)
    first.send_signal(signal.SIGINT)
    first.communicate(timeout=60)
    assert second.exit_code == 2 and "another llava run is writing" in second.stderr
    lines = out.read_text().splitlines()
    assert all(json.loads(line)["image"].startswith(str(folder)) for line in lines)


@pytest.mark.parametrize("args", [
    ("caption", "-m", "/no/such/checkpoint", "-o", "/no/such/dir/out.jsonl", str(IMAGE)),
    ("caption", "-m", "/no/such/checkpoint", "--batch-size", "0", str(IMAGE)),
    ("caption", "-m", "/no/such/checkpoint", "/tmp/definitely-empty-dir-for-llava-tests/*.jpg"),
    ("classify", "-m", "/no/such/checkpoint", "--labels", "a,a", str(IMAGE)),
])
def test_mistakes_are_reported_before_the_model_loads(args):
    """A usage error wins over the missing checkpoint (exit 2, not 3): it was found first."""
    result = run_cli(*args)
    assert result.exit_code == 2, result.stderr
    assert len([line for line in result.stderr.splitlines() if line.startswith("Error:")]) == 1


def test_a_thousand_inputs_one_record_each_and_flat_memory(tmp_path, tiny_next):
    good = tmp_path / "good.png"
    from PIL import Image

    Image.open(IMAGE).convert("RGB").resize((64, 48)).save(good)
    (tmp_path / "empty.jpg").write_bytes(b"")
    (tmp_path / "junk.png").write_bytes(b"junk" * 100)

    def inputs(count: int) -> list[str]:
        kinds = [str(good), str(tmp_path / "empty.jpg"), str(tmp_path / "junk.png"), str(tmp_path / "missing.jpg"),
                 str(tmp_path / "junk.png"), str(tmp_path / "missing.jpg"), str(tmp_path / "empty.jpg")]
        return [kinds[i % len(kinds)] if i % len(kinds) else str(good) for i in range(count)]

    small_list, large_list = tmp_path / "small.txt", tmp_path / "large.txt"
    small_list.write_text("\n".join(inputs(200)) + "\n")
    large_list.write_text("\n".join(inputs(1000)) + "\n")
    with open(small_list) as stdin:
        small_peak, small = _run_with_stdin(stdin, tiny_next)
    with open(large_list) as stdin:
        large_peak, large = _run_with_stdin(stdin, tiny_next)
    assert len(small) == 200 and len(large) == 1000
    assert [r["image"] for r in large] == inputs(1000)  # exactly one record per input, in order
    assert sum("text" in r for r in large) == 1000 // 7 + (1 if 1000 % 7 else 0)
    assert large_peak - small_peak < 40 * 1024, (small_peak, large_peak)  # KiB: no growth with the inputs


def _run_with_stdin(stdin, checkpoint) -> tuple[int, list[dict]]:
    code = ("import resource, subprocess, sys\n"
            "p = subprocess.run(sys.argv[1:], stdin=sys.stdin, capture_output=True, text=True)\n"
            "sys.stdout.write(p.stdout)\n"
            "sys.stderr.write(str(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss))\n")
    result = subprocess.run([sys.executable, "-c", code, sys.executable, "-m", "llavanext_cli", "caption", "-",
                             "-m", str(checkpoint), "--max-new-tokens", "2", "--format", "jsonl", "--batch-size", "4",
                             # one worker: with two, the peak depends on whether their batches' peaks coincide,
                             # which a longer run has more chances of (a growth that is not a leak)
                             "--workers", "1"],
                            stdin=stdin, capture_output=True, text=True, cwd=str(REPO), timeout=600)
    return int(result.stderr.strip().splitlines()[-1]), [json.loads(line) for line in result.stdout.splitlines()]


@pytest.mark.parametrize("left", ['{"image": "a.png", "text": "cut sh', '{"image": "a.png", "text": "whole"}'])
def test_appending_without_resume_starts_on_a_clean_line(tmp_path, tiny_next, left):
    """A run killed mid-line left part of a record: the next run appending to the file (no --resume) drops that
    part instead of gluing its first record to it; a whole last line that only lacks its newline is kept."""
    out = tmp_path / "out.jsonl"
    out.write_text('{"image": "b.png", "text": "kept"}\n' + left, encoding="utf-8")
    result = run_cli("caption", IMAGE, "-m", tiny_next, "--max-new-tokens", "2", "-o", out)
    assert result.exit_code == 0, result.stderr
    records = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    kept = 2 if left.endswith("}") else 1
    assert len(records) == kept + 1 and records[-1]["image"] == str(IMAGE)
