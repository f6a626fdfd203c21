"""A newcomer's first hour: quiet runs on today's libraries, clear refusals of a mistyped command line, help that
says every default, and a README whose install and test commands are the ones CI runs."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys

import pytest

from conftest import EXAMPLES, REPO, run_cli

CAT = EXAMPLES / "chelsea.png"
TOKENS = ("--max-new-tokens", "3")


def records_of(result) -> list[dict]:
    assert result.exit_code in (0, 1), result.stderr
    return [json.loads(line) for line in result.stdout.splitlines()]


# --- quiet: a successful run says nothing on stderr but what the contract names -------------------------------------

@pytest.mark.parametrize("args", [
    ("caption", CAT),
    ("ask", CAT, EXAMPLES / "rocket.jpg", "-q", "What is it?", "-q", "Where is it?"),  # continues from a KV cache
    ("classify", CAT, "--labels", "cat,dog,rocket"),                                  # so does every label
    ("caption", CAT, "--schema", "kind: animal|object, count int 0..9", "--max-new-tokens", "40"),
    ("chat", CAT),
], ids=["caption", "ask-several", "classify", "schema", "chat-piped"])
def test_a_successful_run_prints_nothing_on_stderr(tiny_next, args):
    """Whatever the libraries deprecate (transformers 5.2x renamed past_key_values to cache), nothing reaches the
    user; the suite itself makes deprecations errors, so a call the tool makes to a deprecated API fails here."""
    tokens = () if args[0] == "classify" or "--max-new-tokens" in args else TOKENS
    result = run_cli(*args, "-m", tiny_next, *tokens, "--format", "jsonl",
                     stdin="What is it?\nAnd its colour?\n" if args[0] == "chat" else "")
    assert result.exit_code == 0, result.stderr
    assert result.stderr == ""
    assert result.stdout.strip()


def test_the_cache_is_handed_over_under_the_name_the_model_takes(tiny_next):
    """One place knows transformers' name for the key/value cache (`cache` since the rename, `past_key_values`
    before): it is the name the installed model's forward takes."""
    import inspect

    from transformers import LlavaNextForConditionalGeneration

    from llavanext_cli.model.cache_api import cache_keyword

    model = LlavaNextForConditionalGeneration.__new__(LlavaNextForConditionalGeneration)
    keyword = cache_keyword(model)
    assert keyword in inspect.signature(LlavaNextForConditionalGeneration.forward).parameters


# --- the command line's rough edges ----------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["out.xlsx", "out.tsv", "out.md"])
def test_an_output_extension_that_is_no_format_is_refused_naming_format(tmp_path, name):
    result = run_cli("caption", CAT, "-m", tmp_path / "no-model", "-o", tmp_path / name)
    assert result.exit_code == 2 and "Traceback" not in result.stderr
    assert "is not an output format" in result.stderr and "--format" in result.stderr
    assert not (tmp_path / name).exists()


@pytest.mark.parametrize("name", ["out.txt", "out.log", "answers"])
def test_txt_log_and_no_extension_are_text(tiny_next, tmp_path, name):
    result = run_cli("caption", CAT, "-m", tiny_next, *TOKENS, "-o", tmp_path / name)
    assert result.exit_code == 0, result.stderr
    text = (tmp_path / name).read_text()
    assert text.strip() and not text.startswith("{")


def test_an_extension_is_fine_when_format_says_what_to_write(tiny_next, tmp_path):
    result = run_cli("caption", CAT, "-m", tiny_next, *TOKENS, "-o", tmp_path / "out.data", "--format", "jsonl")
    assert result.exit_code == 0 and json.loads((tmp_path / "out.data").read_text())["text"]


def test_one_label_is_a_usage_error(tmp_path):
    for labels in ("cat", " cat "):
        result = run_cli("classify", CAT, "--labels", labels, "-m", tmp_path / "no-model")
        assert result.exit_code == 2 and "at least two labels" in result.stderr, result.stderr
    one_class = tmp_path / "pets" / "cat"
    one_class.mkdir(parents=True)
    shutil.copy(CAT, one_class / "1.png")
    result = run_cli("classify", tmp_path / "pets", "--truth-from-dirs", "-m", tmp_path / "no-model")
    assert result.exit_code == 2 and "at least two labels" in result.stderr


def test_a_missing_input_is_reported_before_torch_is_imported(tiny_next, tmp_path):
    """Only missing inputs: their error records, exit 1, and torch never imported. With a good input too, the
    missing one is warned about before the checkpoint is opened (here one that cannot be: its error comes last)."""
    code = ("import json, sys\n"
            "from llavanext_cli.cli.main import main\n"
            "try:\n"
            f"    main(['caption', {str(tmp_path / 'typo.jpg')!r}, '-m', {str(tiny_next)!r}, '--format', 'jsonl'])\n"
            "except SystemExit as exc:\n"
            "    print(json.dumps({'code': exc.code, 'torch': 'torch' in sys.modules}), file=sys.stderr)\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=str(REPO), timeout=120)
    *lines, last = result.stderr.strip().splitlines()
    assert json.loads(last) == {"code": 1, "torch": False}, result.stderr
    assert lines == [f"Warning: {tmp_path / 'typo.jpg'}: no such file"]
    assert json.loads(result.stdout) == {"image": str(tmp_path / "typo.jpg"), "error": "no such file"}

    mixed = run_cli("caption", CAT, tmp_path / "typo.jpg", "-m", tmp_path / "not-a-checkpoint")
    assert mixed.exit_code == 3
    warning, error = mixed.stderr.index("typo.jpg: no such file"), mixed.stderr.index("Error:")
    assert warning < error and mixed.stderr.count("no such file") == 1


def test_questions_file_images_resolve_against_its_folder(tiny_next, tmp_path, monkeypatch):
    """As metadata.jsonl does for an imagefolder: `img/cat.png` in `data/vqa.jsonl` is `data/img/cat.png`, whatever
    the current directory, and its record names it so (as a directory's files are named); from stdin, relative
    paths are the current directory's."""
    (tmp_path / "data" / "img").mkdir(parents=True)
    shutil.copy(CAT, tmp_path / "data" / "img" / "cat.png")
    line = json.dumps({"image": "img/cat.png", "question": "What is it?", "id": 7}) + "\n"
    (tmp_path / "data" / "vqa.jsonl").write_text(line)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    [record] = records_of(run_cli("ask", "--questions", "../data/vqa.jsonl", "-m", tiny_next, *TOKENS,
                                  "--format", "jsonl"))
    assert record["image"] == "../data/img/cat.png" and record["text"] and record["id"] == 7
    monkeypatch.chdir(tmp_path / "data")
    [from_stdin] = records_of(run_cli("ask", "--questions", "-", "-m", tiny_next, *TOKENS, "--format", "jsonl",
                                      stdin=line))
    assert from_stdin["image"] == "img/cat.png" and from_stdin["text"] == record["text"]
    monkeypatch.chdir(elsewhere)
    [missing] = records_of(run_cli("ask", "--questions", "-", "-m", tiny_next, *TOKENS, "--format", "jsonl",
                                   stdin=line))
    assert missing == {"image": "img/cat.png", "error": "no such file", "id": 7}


# --- --help says every default, and where a setting's variable is ---------------------------------------------------

def _help(command: str) -> str:
    result = run_cli(command, "--help", env={"COLUMNS": "400"})
    assert result.exit_code == 0, result.stderr
    return " ".join(re.sub("[│╭╮╰╯─]", " ", result.stdout).split())


@pytest.mark.parametrize("command", ["caption", "ask", "classify", "chat", "inspect-config", "init-model", "score", "serve"])
def test_every_option_shows_its_default_and_a_settings_variable(command):
    import typer.main

    from llavanext_cli.cli.main import app
    from llavanext_cli.cli.options import COMMAND_PARAMETERS
    from llavanext_cli.io.settings import SETTING_NAMES

    shown = _help(command)
    assert "<bool>" not in shown  # a flag takes no value
    params = typer.main.get_command(app).commands[command].params
    for param in params:
        if param.name == "help":
            continue
        about = re.search(re.escape(" ".join((param.help or "").split())) + r" \((default [^)]*(\)[^)]*)?)\)", shown)
        assert about, (command, param.name)
        setting = "format" if param.name == "output_format" else param.name
        if setting in SETTING_NAMES and setting not in COMMAND_PARAMETERS and command not in ("score", "init-model") \
                and not (command == "inspect-config" and setting == "format"):
            assert f"env LLAVA_{setting.upper()}" in about.group(1), (command, param.name, about.group(1))


# --- the README is what CI runs ---------------------------------------------------------------------------------------

def _readme_block(heading: str) -> list[str]:
    text = (REPO / "README.md").read_text(encoding="utf-8")
    section = text.split(f"## {heading}\n", 1)[1].split("\n## ", 1)[0]
    block = section.split("```\n", 2)[1]
    return [line for line in block.splitlines() if line.strip() and not line.lstrip().startswith("#")]


def test_ci_runs_the_readme_install_and_test_commands():
    commands = _readme_block("Install and test")
    ci = (REPO / ".ci" / "run").read_text(encoding="utf-8")
    for command in commands:
        if command.startswith(("python3 -m venv", "source ")):
            continue  # CI makes its own virtual environment
        assert command in ci, command
    assert any("-c constraints.txt" in command for command in commands)
    assert "python -m pytest -q" in commands


def test_constraints_pin_every_package_and_fit_the_declared_ranges():
    """constraints.txt: an exact version of each package the suite last passed with (torch comes from its own line
    of the README), inside the ranges pyproject.toml declares."""
    tomllib = pytest.importorskip("tomllib")

    from packaging.requirements import Requirement
    from packaging.version import Version

    pins = {}
    for line in (REPO / "constraints.txt").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            name, _, version = line.partition("==")
            assert version and ";" not in version, line
            pins[name.lower().replace("_", "-")] = Version(version)
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    extras = project["optional-dependencies"]
    required = project["dependencies"] + extras["test"] + extras["serve"]
    for requirement in map(Requirement, required):
        name = requirement.name.lower().replace("_", "-")
        if name == project["name"]:
            continue  # the test extra names the project's own serve extra
        if name == "torch":
            assert name not in pins  # the README installs it first, CPU or CUDA build
            continue
        assert name in pins, name
        assert requirement.specifier.contains(pins[name], prereleases=True), (name, pins[name])
