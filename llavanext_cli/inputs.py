"""Turning IMAGES arguments into an ordered list of inputs: files, directories, quoted globs, `-` for stdin."""

from __future__ import annotations

import glob
import os
import sys
import warnings
from collections.abc import Iterable
from pathlib import Path
from typing import TextIO

from llavanext_cli.errors import UsageError
from llavanext_cli.images import IMAGE_EXTENSIONS, is_url

_GLOB_CHARS = set("*?[")


class InputWarning(UserWarning):
    """Something about the inputs the user should hear of (the CLI shows it on stderr)."""


def _directory_images(directory: Path, recursive: bool, shown: str) -> list[str]:
    pattern = "**/*" if recursive else "*"
    found = []
    for path in directory.glob(pattern):
        relative = path.relative_to(directory)
        if any(part.startswith(".") for part in relative.parts):
            continue
        if path.is_file() and path.suffix.lower() in IMAGE_EXTENSIONS:
            found.append(path)
    # Sorted as strings (as `find | sort` would), and named as directory + name with the directory spelled as the
    # user wrote it ("./imgs/" stays "./imgs/...").
    relative = sorted(str(p.relative_to(directory)) for p in found)
    return [os.path.join(shown, name) for name in relative]


def _stdin_lines(stream: TextIO) -> list[str]:
    lines = []
    for line in stream:
        line = line.strip()
        if line and not line.startswith("#"):
            lines.append(line)
    return lines


def expand_inputs(arguments: Iterable[str], recursive: bool = False, stdin: TextIO | None = None) -> list[str]:
    """Every input in the order given: a directory's images sorted by path, a glob's matches sorted; a file named
    explicitly is kept whatever its extension (a missing one becomes an error record later)."""
    expanded: list[str] = []
    for argument in arguments:
        if argument == "-":
            expanded.extend(_stdin_lines(stdin or sys.stdin))
        elif is_url(argument):
            expanded.append(argument)
        elif Path(argument).is_dir():
            expanded.extend(_directory_images(Path(argument), recursive, argument))
        elif not Path(argument).exists() and _GLOB_CHARS & set(argument):
            matches = [m for m in sorted(glob.glob(argument, recursive=recursive)) if Path(m).is_file()]
            if not matches:
                warnings.warn(f"no file matches {argument}", InputWarning, stacklevel=2)
            expanded.extend(matches)
        else:
            expanded.append(argument)
    if not expanded:
        raise UsageError("no input images", hint="pass image files, directories, quoted globs, URLs or - for stdin")
    return expanded
