"""Entry points, startup cost and error style: real processes where the process is what is tested (the torch-free
start, the console script, the exit code of a real failure, a closed pipe), the CLI in-process elsewhere."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from conftest import EXAMPLES, REPO, folder_of_examples, run_cli, run_llava_process

COMMANDS = ["caption", "ask", "classify", "chat", "inspect-config", "init-model", "score", "serve"]


def test_help_imports_neither_torch_nor_transformers():
    """`llava --help`, every command's --help, and llava score (no model), in one fresh process: none of them
    imports torch or transformers."""
    code = (
        "import io, json, sys, contextlib\n"
        "from llavanext_cli.cli.main import main\n"
        "outputs = []\n"
        f"for args in {[['--help']] + [[command, '--help'] for command in COMMANDS]!r}:\n"
        "    out = io.StringIO()\n"
        "    with contextlib.redirect_stdout(out):\n"
        "        try:\n"
        "            main(args)\n"
        "        except SystemExit as exc:\n"
        "            assert exc.code in (0, None), (args, exc.code)\n"
        "    outputs.append(out.getvalue())\n"
        "heavy = [m for m in ('torch', 'transformers') if m in sys.modules]\n"
        "print(json.dumps({'heavy': heavy, 'usage': [('Usage' in o) for o in outputs]}))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=str(REPO), timeout=120)
    assert result.returncode == 0, result.stderr
    report = __import__("json").loads(result.stdout.splitlines()[-1])
    assert report == {"heavy": [], "usage": [True] * (len(COMMANDS) + 1)}


def test_console_script_and_module_entry_point():
    module = run_llava_process("--version")
    assert module.returncode == 0 and module.stdout.startswith("llava ")
    script = subprocess.run([str(Path(sys.executable).parent / "llava"), "--version"], capture_output=True, text=True)
    assert script.returncode == 0 and script.stdout == module.stdout


def test_user_error_is_one_line_without_traceback(tmp_path):
    result = run_llava_process("caption", EXAMPLES / "chelsea.png", "-m", tmp_path / "missing")
    assert result.returncode == 3
    assert result.stdout == ""
    assert result.stderr.startswith("Error:") and "Traceback" not in result.stderr
    assert len([line for line in result.stderr.splitlines() if line.startswith("Error:")]) == 1


def test_unknown_option_is_a_usage_error():
    result = run_cli("caption", "x.png", "--no-such-flag")
    assert result.exit_code == 2
    assert result.stderr.startswith("Error:") and "Hint:" in result.stderr


def test_stdout_has_results_only(tiny_next):
    """Library logs and progress bars stay off stdout and, without -v, off stderr too."""
    result = run_cli("caption", EXAMPLES / "chelsea.png", "-m", tiny_next, "--max-new-tokens", "4")
    assert result.exit_code == 0, result.stderr
    assert len(result.stdout.strip().splitlines()) == 1
    assert result.stderr == ""


def test_llava_debug_shows_the_traceback_and_keeps_the_exit_code(tmp_path):
    result = run_cli("caption", EXAMPLES / "chelsea.png", "-m", tmp_path / "missing", env={"LLAVA_DEBUG": "1"})
    assert result.exit_code == 3 and "Traceback" in result.stderr and "Error:" in result.stderr


def test_closed_pipe_is_quiet(tiny_next, tmp_path):
    """The reader goes away after one line while the run still has records to write: no traceback, exit 0."""
    folder = folder_of_examples(tmp_path / "many", 12)
    command = (f"set -o pipefail; {sys.executable} -m llavanext_cli caption {folder} -m {tiny_next} "
               f"--max-new-tokens 2 --format jsonl | head -n 1")
    result = subprocess.run(["bash", "-c", command], capture_output=True, text=True, cwd=str(REPO), timeout=300)
    assert len(result.stdout.splitlines()) == 1
    assert result.returncode == 0 and result.stderr == "", result.stderr


def test_unwritable_output_is_one_line(tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir()
    target = locked / "out.jsonl"
    target.mkdir()  # a directory where the file should go
    result = run_cli("caption", EXAMPLES / "chelsea.png", "-o", target)
    assert result.exit_code == 2 and result.stderr.startswith("Error:") and "Traceback" not in result.stderr
    result = run_cli("caption", EXAMPLES / "chelsea.png", "-o", "/proc/no-such-dir-here/x.jsonl")
    assert result.exit_code == 2 and "Traceback" not in result.stderr


def test_yaml_errors_are_one_line(tmp_path):
    config = tmp_path / "broken.yaml"
    config.write_text("model: [unclosed\n")
    result = run_cli("inspect-config", "--config", config)
    assert result.exit_code == 3
    assert len(result.stderr.strip().splitlines()) == 1 and "line " in result.stderr


def test_non_finite_numbers_and_misplaced_quant_type(tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text("temperature: .inf\n")
    assert run_cli("caption", EXAMPLES / "chelsea.png", "--config", config).exit_code == 2
    result = run_cli("caption", EXAMPLES / "chelsea.png", env={"LLAVA_QUANT_TYPE": "fp4"})
    assert result.exit_code == 2 and "LLAVA_QUANT_TYPE" in result.stderr


def _command_function(name: str):
    import typer.main

    from llavanext_cli.cli.main import app

    return typer.main.get_command(app).commands[name]


@pytest.mark.parametrize("name", COMMANDS)
def test_every_help_string_is_shown_as_written(name):
    """Typer renders help as rich markup: text in square brackets would vanish. Every option's and argument's help,
    and every example, appears in `--help` as written."""
    import re

    command = _command_function(name)
    result = run_cli(name, "--help", env={"COLUMNS": "1000"})
    assert result.exit_code == 0, result.stderr
    shown = " ".join(re.sub("[│╭╮╰╯─]", " ", result.stdout).split())
    texts = [param.help for param in command.params if getattr(param, "help", None)]
    texts += [line.strip() for line in (command.help or "").splitlines() if line.strip().startswith("llava ")]
    assert texts
    for text in texts:
        assert " ".join(text.split()) in shown, text


def test_model_flags_refuse_a_parameter_that_is_neither_a_setting_nor_a_command_parameter():
    from llavanext_cli.cli.options import model_flags

    assert model_flags({"max_new_tokens": 3, "output_format": "csv", "images": ["x"], "verbose": False,
                        "compile": None}) == {"max_new_tokens": 3, "format": "csv"}
    with pytest.raises(RuntimeError, match="max_new_tokns"):
        model_flags({"max_new_tokns": 3})


@pytest.mark.parametrize("name", ["caption", "ask", "classify", "chat"])
def test_every_parameter_of_a_model_command_is_a_setting_or_its_own(name):
    """A parameter added to a command without deciding whether it is a setting fails here, not silently."""
    import inspect

    from llavanext_cli.cli.options import model_flags
    from llavanext_cli.io.settings import SETTING_NAMES

    function = _command_function(name).callback
    parameters = inspect.signature(function).parameters
    model_flags({parameter: None for parameter in parameters})
    settings = {"format" if p == "output_format" else p for p in parameters} & set(SETTING_NAMES)
    run_flags = {"caption": {"workers", "fast_decode", "compile", "max_memory"},
                 "ask": {"workers", "fast_decode", "compile", "max_memory"}, "classify": {"normalize", "max_memory"},
                 "chat": set()}
    assert {"model", "device", "dtype", "format"} | run_flags[name] <= settings


@pytest.mark.parametrize("category", [UserWarning, DeprecationWarning, FutureWarning])
def test_a_librarys_warnings_show_only_with_verbose_or_debug(monkeypatch, tmp_path, category):
    """A warning raised inside a library is not the user's business (the contract's "Quiet runs"): hidden by default,
    one `Warning:` line with -v or LLAVA_DEBUG=1, where it was raised included. The tool's own warnings always show."""
    import warnings

    from llavanext_cli.io import inputs


    real = inputs.expand_inputs

    def noisy(*args, **kwargs):
        with warnings.catch_warnings():  # the suite makes deprecations errors; here one must reach the tool
            warnings.simplefilter("always")
            warnings.warn("a library has something to say\nover two lines", category)
        return real(*args, **kwargs)

    monkeypatch.setattr(inputs, "expand_inputs", noisy)
    args = ("caption", EXAMPLES / "chelsea.png", str(tmp_path / "*.none"), "-m", tmp_path / "no-model")
    quiet = run_cli(*args)
    assert quiet.exit_code == 3 and "something to say" not in quiet.stderr
    assert "Warning: no file matches" in quiet.stderr  # the tool's own
    for shown in (run_cli(*args, "-v"), run_cli(*args, env={"LLAVA_DEBUG": "1"})):
        assert shown.exit_code == 3
        assert f"Warning: a library has something to say over two lines ({category.__name__}, " in shown.stderr


@pytest.mark.parametrize("kind", ["config", "prompt format", "spec"])
def test_a_file_that_is_not_valid_yaml_cannot_be_loaded(tmp_path, tiny_next, kind):
    """One reader for every YAML file the tool takes, one exit code for a file that is not YAML: 3."""

    broken = tmp_path / "broken.yaml"
    broken.write_text("name: [unclosed\n")
    image = EXAMPLES / "chelsea.png"
    args = {"config": ("caption", image, "-m", tiny_next, "--config", broken),
            "prompt format": ("caption", image, "-m", tiny_next, "--prompt-format", broken),
            "spec": ("init-model", broken, tmp_path / "out")}[kind]
    result = run_cli(*args)
    assert result.exit_code == 3, result.stderr
    assert result.stderr.count("Error:") == 1 and "not valid YAML" in result.stderr and "line 2" in result.stderr
    assert kind in result.stderr and str(broken) in result.stderr


def test_the_machine_saying_no_is_one_line_and_any_other_os_error_is_a_bug(tiny_next, tmp_path, monkeypatch):
    import errno

    from llavanext_cli.io import writers


    def disk_full(self, record):
        raise OSError(errno.ENOSPC, "No space left on device", "out.jsonl")

    monkeypatch.setattr(writers.RecordSink, "write", disk_full)
    args = ("caption", EXAMPLES / "chelsea.png", "-m", tiny_next, "--max-new-tokens", "2", "-o", tmp_path / "o.jsonl")
    result = run_cli(*args)
    assert result.exit_code == 3 and "No space left on device (out.jsonl)" in result.stderr
    assert "Traceback" not in result.stderr

    def bug(self, record):
        raise FileNotFoundError(errno.ENOENT, "the tool lost its own file", "somewhere")

    monkeypatch.setattr(writers.RecordSink, "write", bug)
    with pytest.raises(FileNotFoundError, match="lost its own file"):
        run_cli(*args)


@pytest.mark.parametrize("args,code,message", [
    (("ask", "--questions", "{dir}"), 2, "questions file {dir} is a directory"),
    (("ask", "--questions", "{dir}/none.jsonl"), 2, "questions file not found: {dir}/none.jsonl"),
    (("classify", str(EXAMPLES / "chelsea.png"), "--labels-file", "{dir}"), 2, "labels file {dir} is a directory"),
    (("caption", str(EXAMPLES / "chelsea.png"), "--schema", "{dir}/latin1.json"), 2, "not UTF-8 text"),
    (("score", "{dir}"), 2, "record file {dir} is a directory"),
    (("caption", str(EXAMPLES / "chelsea.png"), "--config", "{dir}"), 3, "config file {dir} is a directory"),
])
def test_a_named_file_that_cannot_be_read_is_one_line(tmp_path, args, code, message):
    """Every file the user names (questions, labels, schema, records, config) is read by one reader: a directory,
    a missing file or bytes that are not UTF-8 give one Error line and the contract's exit code, not a traceback."""
    (tmp_path / "latin1.json").write_bytes('{"description": "café"}'.encode("latin-1"))
    model = () if args[0] == "score" else ("-m", tmp_path / "no-model")  # score loads no model
    result = run_cli(*[arg.replace("{dir}", str(tmp_path)) for arg in args], *model)
    assert result.exit_code == code, result.stderr
    assert result.stderr.count("Error:") == 1 and "Traceback" not in result.stderr
    assert message.replace("{dir}", str(tmp_path)) in result.stderr
