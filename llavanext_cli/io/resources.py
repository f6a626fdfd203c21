"""Where the shipped data (the prompt-format registry and the configs) lives.

In a wheel they are package data under `llavanext_cli/_data/`; in a source checkout (editable install, tests)
they are the repository's top-level `prompts/` and `configs/`.
"""

from __future__ import annotations

from pathlib import Path

_PACKAGE_DIR = Path(__file__).resolve().parents[1]  # llavanext_cli/


def data_dir(name: str) -> Path:
    """The directory of shipped data `name` ("prompts" or "configs")."""
    packaged = _PACKAGE_DIR / "_data" / name
    if packaged.is_dir():
        return packaged
    return _PACKAGE_DIR.parent / name


def prompts_dir() -> Path:
    return data_dir("prompts")


def configs_dir() -> Path:
    return data_dir("configs")
