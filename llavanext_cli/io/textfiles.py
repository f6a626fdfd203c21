"""Reading a text file the user named (a questions file, a labels file, a schema, record files, a transcript, a
YAML file): its whole text as UTF-8, or one error line that says which file, in which role, and why. Standard
library only (llava score imports it)."""

from __future__ import annotations

from pathlib import Path

from llavanext_cli.errors import UsageError


def read_text(path: str | Path, what: str, error: type[Exception] = UsageError) -> str:
    """The text of `path`; `what` names the file's role in messages ("questions file", "config file"); a file
    that is missing, a directory, unreadable or not UTF-8 raises `error` (UsageError: exit 2; the YAML reader
    passes SetupError: exit 3)."""
    try:
        return Path(path).read_text(encoding="utf-8")
    except FileNotFoundError as exc:
        raise error(f"{what} not found: {path}") from exc
    except IsADirectoryError as exc:
        raise error(f"{what} {path} is a directory, not a file") from exc
    except UnicodeDecodeError as exc:
        raise error(f"cannot read {what} {path}: not UTF-8 text") from exc
    except OSError as exc:
        raise error(f"cannot read {what} {path}: {exc.strerror or exc}") from exc
