"""llava: run LLaVA and LLaVA-NeXT checkpoints from the command line or from Python.

    import llavanext_cli as llava
    model = llava.load("./tiny")                  # weights load on first use
    for record in model.caption("photo.jpg"):
        print(record.to_json())

Importing the package imports neither torch nor transformers: the names below load their modules when first used.
Layers, each importing only those below it: cli -> serve -> api -> engine -> model -> io (errors beside them all).
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    "load": "llavanext_cli.api", "inspect": "llavanext_cli.api", "score": "llavanext_cli.api",
    "Model": "llavanext_cli.api", "Chat": "llavanext_cli.api",
    "Answer": "llavanext_cli.io.records", "Classification": "llavanext_cli.io.records",
    "Failure": "llavanext_cli.io.records",
    "LlavaError": "llavanext_cli.errors", "UsageError": "llavanext_cli.errors", "SetupError": "llavanext_cli.errors",
    "InputError": "llavanext_cli.errors", "InputWarning": "llavanext_cli.errors",
}
__all__ = ["__version__", *_EXPORTS]


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'llavanext_cli' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)
