"""The Python API: importable without torch, the CLI's records for the same inputs and settings, the CLI's messages
for bad arguments, one caller at a time, docs/python.md's examples run as written; and the layers' imports running
one way (cli -> api -> engine -> model -> io)."""

from __future__ import annotations

import ast
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import EXAMPLES, REPO, run_cli

CAT, ROCKET, COFFEE = EXAMPLES / "chelsea.png", EXAMPLES / "rocket.jpg", EXAMPLES / "coffee.png"
TOKENS = ("--max-new-tokens", "5")


def cli_records(*args, stdin: str = "") -> list[dict]:
    result = run_cli(*args, "--format", "jsonl", stdin=stdin)
    assert result.exit_code in (0, 1), result.stderr
    return [json.loads(line) for line in result.stdout.splitlines()]


def without_time(records) -> list[dict]:
    return [{k: v for k, v in (r if isinstance(r, dict) else r.to_json()).items() if k != "seconds"}
            for r in records]


@pytest.fixture(scope="module")
def model(tiny_next):
    import llavanext_cli as llava

    return llava.load(str(tiny_next), max_new_tokens=5)


def test_importing_the_package_imports_neither_torch_nor_transformers():
    """Nor, until a name is used, anything but the package itself; the API's names then bring no CLI (typer, rich)
    and no model library: those load with a model. (The import's time is measured in docs/benchmarks.md.)"""
    code = ("import sys\n"
            "before = set(sys.modules)\n"
            "import llavanext_cli as llava\n"
            "print(sorted(m.split('.')[0] for m in set(sys.modules) - before if not m.startswith('llavanext_cli')))\n"
            "names = [llava.load, llava.inspect, llava.score, llava.Answer, llava.UsageError]\n"
            "print([m for m in ('torch', 'transformers', 'typer', 'rich') if m in sys.modules])")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=str(REPO), timeout=60)
    assert result.returncode == 0, result.stderr
    bare, after_names = result.stdout.splitlines()
    third_party = {"torch", "transformers", "PIL", "numpy", "typer", "rich", "yaml", "accelerate"}
    assert not set(eval(bare)) & third_party and after_names == "[]"


def test_the_api_gives_the_clis_records(tiny_next, model, tmp_path):
    m = ("-m", tiny_next)
    assert without_time(model.caption([CAT, ROCKET])) == without_time(cli_records("caption", CAT, ROCKET, *m, *TOKENS))
    assert without_time(model.ask(CAT, ["What is it?", "Where is it?"])) == without_time(
        cli_records("ask", CAT, "-q", "What is it?", "-q", "Where is it?", *m, *TOKENS))
    assert without_time(model.ask([CAT, ROCKET], "Which is older?", together=True)) == without_time(
        cli_records("ask", CAT, ROCKET, "--together", "-q", "Which is older?", *m, *TOKENS))
    questions = tmp_path / "q.jsonl"
    questions.write_text("".join(json.dumps({"image": str(image), "question": "What?", "id": n}) + "\n"
                                 for n, image in enumerate((CAT, COFFEE, CAT))))
    assert without_time(model.ask_dataset(questions)) == without_time(
        cli_records("ask", "--questions", questions, *m, *TOKENS))
    assert without_time(model.ask_dataset(json.loads(line) for line in questions.read_text().splitlines())) == \
        without_time(cli_records("ask", "--questions", questions, *m, *TOKENS))
    assert without_time(model.classify([CAT, ROCKET], "a cat,a dog,a rocket")) == without_time(
        cli_records("classify", CAT, ROCKET, "--labels", "a cat,a dog,a rocket", *m))
    schema = "kind: animal|object, count int 0..9"
    assert without_time(model.caption(CAT, schema=schema, max_new_tokens=40)) == without_time(
        cli_records("caption", CAT, "--schema", schema, *m, "--max-new-tokens", "40"))


def test_a_chat_gives_the_clis_turns(tiny_next, model):
    chat = model.chat(images=[CAT])
    texts = [chat.send("What is it?").text, "".join(chat.stream("And its colour?")), chat.send("Thanks.").text]
    piped = cli_records("chat", CAT, "-m", tiny_next, *TOKENS, stdin="What is it?\nAnd its colour?\nThanks.\n")
    assert texts == [turn["text"] for turn in piped]


def test_images_in_memory_are_answered_as_their_files(model):
    from PIL import Image

    by_path = without_time(model.caption([CAT, ROCKET]))
    in_memory = without_time(model.caption([Image.open(CAT), ROCKET.read_bytes()]))
    assert [r["text"] for r in in_memory] == [r["text"] for r in by_path]
    assert [r["image"] for r in in_memory] == ["<image 0>", "<image 1>"]
    [broken] = model.caption(b"not an image")
    assert not broken.ok and broken.to_json() == {"image": "<image 0>", "error": broken.error}


@pytest.mark.parametrize("call,cli_args", [
    (lambda m: m.classify(CAT, ["only"]), ("classify", str(CAT), "--labels", "only")),
    (lambda m: m.ask(CAT, []), ("ask", str(CAT))),
    (lambda m: m.ask(CAT, ["  "]), ("ask", str(CAT), "-q", " ")),
    (lambda m: m.caption(CAT, max_new_tokens=0), ("caption", str(CAT), "--max-new-tokens", "0")),
    (lambda m: m.caption(CAT, schema="count int, count int"), ("caption", str(CAT), "--schema", "count int, count int")),
    (lambda m: m.caption([]), ("caption", "/no/such/dir/*.jpg")),
], ids=["one-label", "no-question", "empty-question", "bad-setting", "bad-schema", "no-images"])
def test_bad_arguments_raise_usage_error_with_the_clis_message(tiny_next, model, call, cli_args):
    import llavanext_cli as llava

    with pytest.raises(llava.UsageError) as raised:
        call(model)
    result = run_cli(*cli_args, "-m", tiny_next)
    assert result.exit_code == 2
    assert f"Error: {raised.value.message}" in result.stderr


def test_errors_are_the_tools_types_never_system_exit(tmp_path):
    import llavanext_cli as llava

    with pytest.raises(llava.SetupError):
        llava.load(str(tmp_path / "no-such-checkpoint"))
    with pytest.raises(llava.UsageError, match="unknown setting 'no_such_setting'"):
        llava.load(str(tmp_path), no_such_setting=1)
    assert issubclass(llava.UsageError, llava.LlavaError) and issubclass(llava.SetupError, llava.LlavaError)


def test_one_model_serves_one_caller_at_a_time(model):
    import llavanext_cli as llava

    first = model.caption([CAT, ROCKET])
    next(first)
    with pytest.raises(llava.UsageError, match="one Model serves one caller at a time"):
        next(model.caption(CAT))
    first.close()  # given up on: the model is free again
    assert [record.ok for record in model.caption(CAT)] == [True]


def test_inspect_and_score_return_the_clis_json(tiny_next, tmp_path):
    import llavanext_cli as llava

    report = llava.inspect(str(tiny_next), image_size=(1024, 768))
    cli = json.loads(run_cli("inspect-config", tiny_next, "--image-size", "1024x768", "--format", "json").stdout)
    assert report == cli
    records = tmp_path / "run.jsonl"
    records.write_text('{"image": "a", "label": "x", "truth": "x"}\n{"image": "b", "label": "y", "truth": "x"}\n')
    assert llava.score(records) == json.loads(run_cli("score", records, "--format", "json").stdout)
    assert llava.score([json.loads(line) for line in records.read_text().splitlines()])["accuracy"] == 0.5


def test_the_examples_of_docs_python_md_run_as_written(tiny_next, tmp_path, monkeypatch, capsys):
    blocks = re.findall(r"```python\n(.*?)```", (REPO / "docs" / "python.md").read_text(encoding="utf-8"), re.S)
    assert len(blocks) >= 6
    (tmp_path / "tiny").symlink_to(tiny_next)
    (tmp_path / "examples").symlink_to(EXAMPLES)
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    for block in blocks:
        exec(compile(block, "docs/python.md", "exec"), namespace)  # noqa: S102 (our own documentation)
    printed = capsys.readouterr().out
    assert "classify needs at least two labels" in printed and "0.5" in printed
    assert json.loads((tmp_path / "conversation.json").read_text())["messages"][-1]["role"] == "assistant"


# --- the layers ----------------------------------------------------------------------------------------------------

LAYERS = ["io", "model", "engine", "api", "serve", "cli"]  # each may import those before it


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("llavanext_cli."):
            found.add(node.module.split(".")[1])
        elif isinstance(node, ast.Import):
            found.update(alias.name.split(".")[1] for alias in node.names if alias.name.startswith("llavanext_cli."))
    return found


@pytest.mark.parametrize("layer", LAYERS)
def test_imports_run_one_way(layer):
    package = REPO / "llavanext_cli"
    allowed = set(LAYERS[:LAYERS.index(layer) + 1]) | {"errors"}
    for path in sorted((package / layer).rglob("*.py")):
        upward = _imports(path) - allowed
        assert not upward, f"{path.relative_to(REPO)} imports {sorted(upward)} (a layer above {layer})"
    assert _imports(package / "errors.py") == set()
