"""How the installed transformers names a model's key/value cache: the one place that knows.

transformers renamed the argument `past_key_values=` (of `forward` and `generate`) and the output attribute
`.past_key_values` to `cache` during the 5.x series; the old names still work for a while, with a FutureWarning on
every call, and then go. The tool asks the model class which name its `forward` takes and uses that name
everywhere, so it runs on either side of the rename without a warning.
"""

from __future__ import annotations

import functools
import inspect
from typing import Any

NEW_NAME = "cache"
OLD_NAME = "past_key_values"


@functools.lru_cache(maxsize=None)
def _keyword_of(model_class: type) -> str:
    parameters = inspect.signature(model_class.forward).parameters
    return NEW_NAME if NEW_NAME in parameters else OLD_NAME


def cache_keyword(model: Any) -> str:
    """`cache` where the model's forward (and so `generate`) takes it, else `past_key_values`."""
    return _keyword_of(type(model))


def with_cache(model: Any, cache: Any) -> dict[str, Any]:
    """The keyword argument that hands `cache` to the model's `forward` or `generate`."""
    return {cache_keyword(model): cache}


def cache_of(output: Any) -> Any:
    """The key/value cache a forward pass returned, under whichever name its output class declares."""
    fields = getattr(output, "__dataclass_fields__", {})
    return getattr(output, NEW_NAME if NEW_NAME in fields else OLD_NAME)
