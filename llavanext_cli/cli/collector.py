"""The garbage collector in a real `llava` process (tests that call main() in-process keep their own).

Importing torch and transformers and building a model create about a million objects that live until the
process ends. CPython's cyclic collector would walk them again and again while they are being created, and
once more at exit (about a second each way on a small CPU). So collection waits until the model is in memory;
then everything alive is frozen (left out of later collections) and collection resumes for the run itself; at
exit what is left is frozen again, so that the interpreter's last collections have nothing big to walk.

What is frozen and held only in reference cycles is never freed: the interpreter's last collections leave it
out. That is harmless (the process is ending), except for extensions built with nanobind, such as triton from 3.9
(torch imports triton wherever it is installed, and every CUDA build depends on it): after the interpreter has
shut down, nanobind checks that all its objects were freed, and prints dozens of `nanobind: leaked ...` lines on
stderr when they were not. Its classes and functions live in reference cycles. So where a nanobind extension is
loaded, what is frozen is unfrozen at exit instead: that exit is as slow as without the policy; start-up and the
run keep their gain.
"""

from __future__ import annotations

import gc
import importlib.machinery
import sys

_deferred = False


def defer_until_loaded() -> None:
    global _deferred
    _deferred = True
    gc.disable()


def model_loaded() -> None:
    if _deferred:
        gc.freeze()
        gc.enable()


def before_exit() -> None:
    if _deferred:
        if nanobind_loaded():
            gc.unfreeze()
        else:
            gc.freeze()
        gc.enable()  # a command that loaded no model (inspect-config, a failed load) leaves it as it found it


def nanobind_loaded() -> bool:
    """Whether an extension module built with nanobind is loaded: its functions and classes are of types that
    nanobind defines (module `nanobind`). Only extension modules and modules without a file (an extension's
    submodules) are looked at: a few milliseconds. Where the look fails, the answer is yes (the safe exit)."""
    suffixes = tuple(importlib.machinery.EXTENSION_SUFFIXES)
    try:
        for module in list(sys.modules.values()):
            namespace = getattr(module, "__dict__", None)
            if not isinstance(namespace, dict):
                continue
            file = namespace.get("__file__")
            if isinstance(file, str) and not file.endswith(suffixes):
                continue
            for value in list(namespace.values()):
                kind = type(value)
                if "nanobind" in (getattr(kind, "__module__", None), getattr(type(kind), "__module__", None)):
                    return True
    except Exception:
        return True
    return False
