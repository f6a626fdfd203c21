"""The one reader of the tool's YAML files: settings files (`--config`, the user config, configs/default.yaml),
prompt-format files and init-model specs. A file that cannot be read or is not valid YAML cannot be loaded:
SetupError (exit 3), in one line that names the file and where the YAML breaks. What the YAML says is checked by
each caller, with errors that name the field (UsageError, exit 2)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from llavanext_cli.errors import SetupError
from llavanext_cli.io.textfiles import read_text


def yaml_problem(exc: yaml.YAMLError) -> str:
    """A YAML error in one line: 'line L, column C: problem'."""
    mark = getattr(exc, "problem_mark", None)
    problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
    return f"line {mark.line + 1}, column {mark.column + 1}: {problem}" if mark is not None else problem


def read_yaml(path: Path, what: str) -> Any:
    """The parsed content of the YAML file `path` (None for an empty file); `what` names the file's role in
    messages ("config file", "prompt format", "spec")."""
    text = read_text(path, what, SetupError)
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise SetupError(f"{what} {path} is not valid YAML: {yaml_problem(exc)}") from exc
