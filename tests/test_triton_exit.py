"""A real process with triton importable exits with nothing on stderr.

torch imports triton wherever it is installed (every CUDA build depends on it). From 3.9.0 triton's bindings are
built with nanobind, which prints `nanobind: leaked ...` lines after the interpreter has shut down for every object
of theirs still alive; the collector policy freezes what is alive, and what is frozen in reference cycles is never
freed. So these tests run the tool with triton 3.9.0 on PYTHONPATH, ahead of any triton installed with torch
(torch 2.13 and 2.14 pin triton 3.7.1 and 3.8.0, built with pybind11, which checks nothing at exit)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from conftest import EXAMPLES, REPO, run_llava_process

TRITON = "triton==3.9.0"

# It installs triton 3.9.0 from the package index (a 290 MB wheel), unless LLAVA_TEST_TRITON_DIR names a folder that
# has it: deselected by default, `python -m pytest -m network` runs it (CI does, after the suite).
pytestmark = pytest.mark.network


@pytest.fixture(scope="session")
def triton_path(request, tmp_path_factory) -> str:
    """PYTHONPATH with triton 3.9.0 first: the folder in LLAVA_TEST_TRITON_DIR, or one in pytest's cache where it is
    installed once (`pip install --no-deps --target`: a 290 MB wheel from PyPI, about 20 s; 1 GB on disk)."""
    folder = os.environ.get("LLAVA_TEST_TRITON_DIR")
    if folder is None:
        cache = getattr(request.config, "cache", None)  # None under `-p no:cacheprovider`: installed per session
        target = cache.mkdir("triton-3.9.0") if cache is not None else tmp_path_factory.mktemp("triton-3.9.0")
        if not (target / "triton" / "__init__.py").is_file():
            install = subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--target",
                                      str(target), TRITON], capture_output=True, text=True, timeout=900)
            if install.returncode != 0:
                pytest.skip(f"could not install {TRITON} (PyPI unreachable?): {install.stderr.strip()[-300:]}")
        folder = str(target)
    return os.pathsep.join(filter(None, [folder, os.environ.get("PYTHONPATH")]))


def test_triton_on_the_path_is_imported_and_reports_frozen_objects(triton_path):
    """The guard for the test below: in such a process torch imports that triton, and a process that exits with
    triton's objects frozen does get nanobind's report."""
    probe = ("import gc, sys, torch._dynamo\n"
             "assert sys.modules['triton'].__version__ == '3.9.0', sys.modules['triton'].__version__\n"
             "gc.freeze()\n")
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=300,
                            cwd=str(REPO), env={**os.environ, "PYTHONPATH": triton_path})
    assert result.returncode == 0, result.stderr
    assert "nanobind: leaked" in result.stderr


@pytest.mark.parametrize("command", ["caption", "inspect-config"])
def test_a_real_process_with_triton_leaves_stderr_empty(tiny_next, triton_path, command):
    """A run that loads the model (frozen at load and at exit) and one that loads none (frozen at exit only)."""
    args = [EXAMPLES / "chelsea.png", "-m", tiny_next, "--max-new-tokens", "4"] if command == "caption" else [tiny_next]
    result = run_llava_process(command, *args, env={"PYTHONPATH": triton_path})
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    assert result.stdout.strip()
