"""A plain (non-editable) install carries the prompt registry and the configs as package data."""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile

from conftest import REPO


def test_wheel_ships_prompts_and_configs_and_finds_them(tmp_path):
    wheel_dir = tmp_path / "wheel"
    build = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-w", str(wheel_dir), str(REPO)],
        capture_output=True, text=True, timeout=300,
    )
    assert build.returncode == 0, build.stdout + build.stderr
    [wheel] = wheel_dir.glob("llavanext_cli-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    for expected in ("llavanext_cli/_data/prompts/mistral-instruct.yaml", "llavanext_cli/_data/configs/default.yaml",
                     "llavanext_cli/_data/configs/tiny-llava-next.yaml"):
        assert expected in names

    target = tmp_path / "site"
    install = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "--no-index", "--target", str(target), str(wheel)],
        capture_output=True, text=True, timeout=300,
    )
    assert install.returncode == 0, install.stdout + install.stderr
    # Run from a directory that is not the repository, with only the installed copy importable.
    code = (
        "import llavanext_cli, json\n"
        "from llavanext_cli.model.prompts import load_registry\n"
        "from llavanext_cli.io.settings import load_settings\n"
        "from llavanext_cli.io.resources import prompts_dir\n"
        "print(json.dumps([llavanext_cli.__file__, str(prompts_dir()), sorted(load_registry()),"
        " load_settings({}, env={}).model]))\n"
    )
    env = {**os.environ, "PYTHONPATH": str(target)}
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=str(tmp_path), env=env)
    assert run.returncode == 0, run.stderr
    import json

    module_file, prompts, formats, model = json.loads(run.stdout)
    assert module_file.startswith(str(target)) and prompts.startswith(str(target))
    assert "mistral-instruct" in formats and "llava-1.5" in formats
    assert model == "llava-hf/llava-v1.6-mistral-7b-hf"
