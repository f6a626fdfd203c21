"""The garbage collector in a real `llava` process (tests that call main() in-process keep their own).

Importing torch and transformers and building a model create about a million objects that live until the
process ends. CPython's cyclic collector would walk them again and again while they are being created, and
once more at exit (about a second each way on a small CPU). So collection waits until the model is in memory;
then everything alive is frozen (left out of later collections) and collection resumes for the run itself; at
exit what is left is frozen again, so that the interpreter's last collections have nothing big to walk.
"""

from __future__ import annotations

import gc

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
        gc.freeze()
        gc.enable()  # a command that loaded no model (inspect-config, a failed load) leaves it as it found it
