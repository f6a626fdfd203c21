"""Scale-out: data-parallel runs under accelerate launch (two real CPU processes, gloo), resumable across shards;
model-parallel planning from the config alone."""

from __future__ import annotations

import json
import signal
import time
from pathlib import Path

import psutil
import pytest

from conftest import EXAMPLES, accelerate_launch, folder_of_examples, free_port, run_cli

def _records(path: Path) -> list[dict]:
    return [{k: v for k, v in json.loads(line).items() if k != "seconds"} for line in path.read_text().splitlines()]


def test_two_processes_merge_into_the_one_process_result(tmp_path, tiny_next):
    folder = folder_of_examples(tmp_path / "images", 9)
    (folder / "broken.png").write_bytes(b"not a png")
    out = tmp_path / "out.jsonl"
    process = accelerate_launch("caption", folder, "-m", tiny_next, "--max-new-tokens", "4", "-o", out)
    _, stderr = process.communicate(timeout=300)
    assert process.returncode != 0  # the broken input: exit 1 from the ranks, reported by the launcher
    assert "process 0 of 2 takes 5 inputs" in stderr and "process 1 of 2 takes 5 inputs" in stderr  # both ran
    assert "merged 10 records from 2 processes" in stderr
    assert not list(tmp_path.glob("out.jsonl.rank*.part"))
    single = tmp_path / "single.jsonl"
    assert run_cli("caption", folder, "-m", tiny_next, "--max-new-tokens", "4", "-o", single).exit_code == 1
    assert _records(out) == _records(single)  # record for record, in input order


def test_two_processes_share_whole_images_of_several_questions(tmp_path, tiny_next):
    """ask -q A -q B under two processes: each takes whole images (encoded once for both questions there); the
    merged records equal a one-process run's, in input order."""
    folder = folder_of_examples(tmp_path / "images", 5)
    out = tmp_path / "out.jsonl"
    questions = ("-q", "What is it?", "-q", "Is it indoors?")
    process = accelerate_launch("ask", folder, *questions, "-m", tiny_next, "--max-new-tokens", "4", "-o", out)
    _, stderr = process.communicate(timeout=300)
    assert process.returncode == 0, stderr
    assert "process 0 of 2 takes 6 inputs" in stderr and "process 1 of 2 takes 4 inputs" in stderr
    single = tmp_path / "single.jsonl"
    assert run_cli("ask", folder, *questions, "-m", tiny_next, "--max-new-tokens", "4", "-o", single).exit_code == 0
    assert _records(out) == _records(single)


def test_a_killed_rank_then_resume_completes_the_set(tmp_path, tiny_next):
    folder = folder_of_examples(tmp_path / "images", 12)
    out = tmp_path / "out.jsonl"
    args = ("caption", folder, "-m", tiny_next, "--max-new-tokens", "4", "-o", out)
    launcher = accelerate_launch(*args)
    shard = tmp_path / "out.jsonl.rank1.part"
    deadline = time.time() + 120
    while not (shard.exists() and len(shard.read_text().splitlines()) >= 2):
        assert launcher.poll() is None and time.time() < deadline, launcher.stderr.read()
        time.sleep(0.05)
    rank1 = [p for p in psutil.Process(launcher.pid).children(recursive=True)
             if p.environ().get("RANK") == "1" and "llavanext_cli" in " ".join(p.cmdline())]
    assert rank1
    rank1[0].send_signal(signal.SIGKILL)
    launcher.communicate(timeout=120)
    assert launcher.returncode != 0
    assert not out.exists() or len(out.read_text().splitlines()) < 12

    process = accelerate_launch(*args)
    _, stderr = process.communicate(timeout=300)
    assert process.returncode == 0, stderr
    records = _records(out)
    assert sorted(r["image"] for r in records) == sorted(str(p) for p in folder.iterdir())  # all, each once
    single = tmp_path / "single.jsonl"
    assert run_cli("caption", folder, "-m", tiny_next, "--max-new-tokens", "4", "-o", single).exit_code == 0
    assert {r["image"]: r["text"] for r in records} == {r["image"]: r["text"] for r in _records(single)}


def test_not_launched_means_one_process_as_before(tmp_path, tiny_next, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "1")
    result = run_cli("caption", EXAMPLES / "chelsea.png", "-m", tiny_next, "--max-new-tokens", "2",
                     "--format", "jsonl")
    assert result.exit_code == 0 and "process 0 of" not in result.stderr


def test_data_parallel_needs_a_jsonl_output(tiny_next):
    env = {"WORLD_SIZE": "2", "RANK": "0", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port())}
    result = run_cli("caption", EXAMPLES / "chelsea.png", "-m", tiny_next, env=env)
    assert result.exit_code == 2 and "-o FILE.jsonl" in result.stderr


@pytest.mark.parametrize("value,message", [("0=70", "DEVICE=AMOUNT"), ("gpu0=70GiB", "unknown device"),
                                           ("0=70GiB,cpu=200GiB", "applies when --device auto")])
def test_max_memory(tiny_next, value, message):
    result = run_cli("caption", EXAMPLES / "chelsea.png", "-m", tiny_next, "--max-memory", value)
    assert result.exit_code == 2 and message in result.stderr


def _config_only(tmp_path: Path, name: str, text: dict, text_type: str) -> Path:
    """A checkpoint directory with a config and no weights, the sizes of a real llava-hf checkpoint."""
    from transformers import AutoConfig, CLIPVisionConfig, LlavaNextConfig

    vision = CLIPVisionConfig(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                              patch_size=14, image_size=336, projection_dim=768)
    config = LlavaNextConfig(vision_config=vision, text_config=AutoConfig.for_model(text_type, **text),
                             image_token_index=32000)
    path = tmp_path / name
    config.save_pretrained(path)
    return path


def test_inspect_plans_gpus_from_the_config_alone(tmp_path):
    mistral = _config_only(tmp_path, "llava-v1.6-mistral-7b-hf", {"vocab_size": 32064}, "mistral")
    result = run_cli("inspect-config", mistral, "--format", "json")
    assert result.exit_code == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["parameters"] == 7_566_747_648  # the published size of llava-v1.6-mistral-7b-hf
    assert report["gpus_needed"] == {"float32": 1, "float16": 1, "bfloat16": 1, "8bit": 1, "4bit": 1}
    big = _config_only(tmp_path, "llava-next-110b-hf", {
        "vocab_size": 152064, "hidden_size": 8192, "intermediate_size": 49152, "num_hidden_layers": 80,
        "num_attention_heads": 64, "num_key_value_heads": 8}, "qwen2")
    report = json.loads(run_cli("inspect-config", big, "--format", "json", "--gpu-memory", "80GiB").stdout)
    assert 105e9 < report["parameters"] < 115e9
    assert report["gpus_needed"]["bfloat16"] == 4 and report["gpus_needed"]["4bit"] == 1
    assert report["prompt_format"] == "qwen-chatml"
    report = json.loads(run_cli("inspect-config", big, "--format", "json", "--gpu-memory", "141GB").stdout)
    assert report["gpus_needed"]["bfloat16"] == 2
    assert run_cli("inspect-config", big, "--gpu-memory", "lots").exit_code == 2
