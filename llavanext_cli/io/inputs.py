"""Turning IMAGES arguments into an ordered list of inputs: files, directories, quoted globs, `-` for stdin; and,
for `classify --truth-from-dirs`, each input with its ground truth, the name of its parent folder."""

from __future__ import annotations

import glob
import os
import posixpath
import sys
import urllib.parse
import warnings
from collections.abc import Iterable
from pathlib import Path
from typing import TextIO

from llavanext_cli.errors import InputWarning, UsageError
from llavanext_cli.io.images import IMAGE_EXTENSIONS, is_url

_GLOB_CHARS = set("*?[")


def no_input_images() -> UsageError:
    """The error of a command given no image at all (or inputs that expand to none)."""
    return UsageError("no input images", hint="pass image files, directories, quoted globs, URLs or - for stdin")


def _image_paths(directory: Path, recursive: bool) -> list[Path]:
    """The image files of a directory (and with `recursive` of its subdirectories), relative to it, hidden names
    skipped, sorted as strings (as `find | sort` would)."""
    pattern = "**/*" if recursive else "*"
    found = []
    for path in directory.glob(pattern):
        relative = path.relative_to(directory)
        if any(part.startswith(".") for part in relative.parts):
            continue
        if path.is_file() and path.suffix.lower() in IMAGE_EXTENSIONS:
            found.append(relative)
    return sorted(found, key=str)


def _directory_images(directory: Path, recursive: bool, shown: str) -> list[str]:
    # Named as directory + name with the directory spelled as the user wrote it ("./imgs/" stays "./imgs/...").
    return [os.path.join(shown, str(name)) for name in _image_paths(directory, recursive)]


def _stdin_lines(stream: TextIO) -> list[str]:
    lines = []
    for line in stream:
        line = line.strip()
        if line and not line.startswith("#"):
            lines.append(line)
    return lines


def _is_directory(path: str) -> bool:
    """A directory to expand; a path the system refuses to look at (a loop of links, a name too long) is not: it is
    an input, whose error record says why."""
    try:
        return Path(path).is_dir()
    except OSError:
        return False


def _exists(path: str) -> bool:
    try:
        return Path(path).exists()
    except OSError:
        return True  # there, in some form: the loader reports what is wrong with it


def _expand_one(argument: str, recursive: bool, stdin: TextIO | None) -> list[str]:
    if argument == "-":
        return _stdin_lines(stdin or sys.stdin)
    if is_url(argument):
        return [argument]
    if _is_directory(argument):
        return _directory_images(Path(argument), recursive, argument)
    if not _exists(argument) and _GLOB_CHARS & set(argument):
        matches = [m for m in sorted(glob.glob(argument, recursive=recursive)) if Path(m).is_file()]
        if not matches:
            warnings.warn(f"no file matches {argument}", InputWarning, stacklevel=3)
        return matches
    return [argument]


def expand_inputs(arguments: Iterable[str], recursive: bool = False, stdin: TextIO | None = None,
                  allow_none: bool = False) -> list[str]:
    """Every input in the order given: a directory's images sorted by path, a glob's matches sorted; a file named
    explicitly is kept whatever its extension (a missing one becomes an error record later). No input at all is a
    usage error, unless `allow_none` (the caller counts them)."""
    expanded: list[str] = []
    for argument in arguments:
        expanded.extend(_expand_one(argument, recursive, stdin))
    if not expanded and not allow_none:
        raise no_input_images()
    return expanded


# --- classify --truth-from-dirs ------------------------------------------------------------------------------


def parent_folder_name(source: str) -> str:
    """An input's ground truth for --truth-from-dirs: the name of its parent folder. A path counts from its
    absolute form ("1.jpg" run inside cat/ is "cat"; symbolic links are not followed); a URL from its path
    (".../cat/1.jpg" is "cat")."""
    if is_url(source):
        path = urllib.parse.unquote(urllib.parse.urlsplit(source).path)
        name = posixpath.basename(posixpath.dirname(path))
    else:
        name = os.path.basename(os.path.dirname(os.path.abspath(source)))
    if not name:
        raise UsageError(f"{source}: no parent folder to take its truth from (--truth-from-dirs)",
                         hint="put the images in one folder per class: ROOT/CLASS/IMAGE")
    return name


def _class_folder_images(directory: Path, recursive: bool, shown: str) -> list[str]:
    """A directory argument of --truth-from-dirs, read as an ImageFolder root: the images in its class folders
    (ROOT/CLASS/IMAGE; with `recursive` at any depth below them), sorted by path, hidden names skipped. A directory
    with images but no class folders is itself a class folder (`classify data/cat data/dog`). Images beside the
    class folders, and without `recursive` below them, are left out with a warning: they are in no class folder."""
    everything = _image_paths(directory, recursive=True)
    loose = [path for path in everything if len(path.parts) == 1]
    in_classes = [path for path in everything if len(path.parts) == 2 or (recursive and len(path.parts) > 2)]
    deeper = [] if recursive else [path for path in everything if len(path.parts) > 2]
    if not in_classes and loose:
        chosen = loose
    else:
        chosen = in_classes
        if loose:
            warnings.warn(f"{shown}: {_count(loose)} directly in it, beside its class folders, left out (in no "
                          f"class folder): {_sample(loose)}", InputWarning, stacklevel=3)
    if deeper:
        warnings.warn(f"{shown}: {_count(deeper)} in subfolders of its class folders left out: {_sample(deeper)} "
                      "(--recursive takes them, each with its own parent folder as truth)", InputWarning,
                      stacklevel=3)
    return [os.path.join(shown, str(name)) for name in chosen]


def _count(paths: list[Path]) -> str:
    return f"{len(paths)} image{'s' if len(paths) != 1 else ''}"


def _sample(paths: list[Path], shown: int = 3) -> str:
    names = ", ".join(map(str, paths[:shown]))
    return names + (f" and {len(paths) - shown} more" if len(paths) > shown else "")


def expand_with_truth(arguments: Iterable[str], recursive: bool = False,
                      stdin: TextIO | None = None) -> list[tuple[str, str]]:
    """classify --truth-from-dirs: every input, in the order `expand_inputs` gives, with the name of its parent
    folder. A directory argument is an ImageFolder root (see `_class_folder_images`); files, globs, stdin lines
    and URLs are taken as usual, each with its own parent folder."""
    expanded: list[str] = []
    roots: list[str] = []
    for argument in arguments:
        if argument != "-" and not is_url(argument) and _is_directory(argument):
            roots.append(argument)
            expanded.extend(_class_folder_images(Path(argument), recursive, argument))
        else:
            expanded.extend(_expand_one(argument, recursive, stdin))
    if not expanded:
        if roots:
            raise UsageError(f"no images in the class folders of {', '.join(roots)}",
                             hint="--truth-from-dirs reads ROOT/CLASS/IMAGE: one subfolder per class, named as the "
                                  "label (hidden ones skipped)")
        raise no_input_images()
    return [(source, parent_folder_name(source)) for source in expanded]
