"""The Python API, above the engine and below the CLI (its first client): `load` a model and run its jobs,
`inspect` a checkpoint from its config, `score` records. See docs/python.md."""

from __future__ import annotations

import os
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from llavanext_cli.api.model import Chat, Model, load

__all__ = ["Chat", "Model", "inspect", "load", "score"]


def __getattr__(name: str) -> Any:
    """Chat, Model and load, from api.model when first used (the run plan beside them does not need the engine)."""
    if name in ("Chat", "Model", "load"):
        from llavanext_cli.api import model

        return getattr(model, name)
    raise AttributeError(f"module 'llavanext_cli.api' has no attribute {name!r}")


def inspect(model: str | None = None, image_size: tuple[int, int] | None = None, prompt: str | None = None, *,
            schema: Any = None, prompt_format: str | None = None, offline: bool | None = None,
            gpu_memory: str = "80GiB", config_file: str | os.PathLike | None = None) -> dict[str, Any]:
    """inspect-config's report as a dict, from the checkpoint's config alone (no weights): architecture, prompt
    format and the rendered one-image prompt, vision and text configs, parameters, memory per dtype and
    quantization, and with `image_size` (width, height) the image tokens and tiles. The model, prompt format and
    offline settings come through the settings' layers, as the CLI's (`config_file` among them)."""
    from pathlib import Path

    from llavanext_cli.api.model import load_answer_schema
    from llavanext_cli.io.settings import load_settings, user_config_path
    from llavanext_cli.model.inspection import DEFAULT_INSPECT_PROMPT, inspect_checkpoint, parse_memory

    flags = {key: value for key, value in (("model", model), ("prompt_format", prompt_format),
                                           ("offline", offline)) if value is not None}
    settings = load_settings(flags, Path(config_file) if config_file is not None else None,
                             user_config=user_config_path())
    parse_memory(gpu_memory)  # a usage error for an amount that is none
    question = prompt or DEFAULT_INSPECT_PROMPT
    answer_schema = load_answer_schema(schema)
    if answer_schema is not None:
        question = answer_schema.prompt(question)  # what caption / ask send with that schema
    return inspect_checkpoint(settings.model, prompt=question, image_size=tuple(image_size) if image_size else None,
                              requested_format=settings.prompt_format, offline=settings.offline,
                              gpu_memory=gpu_memory)


def score(records: Any, by: str | None = None) -> dict[str, Any]:
    """llava score's JSON as a dict: `records` are record objects (with `to_json()`), dicts, or the paths of record
    files (jsonl or json)."""
    from llavanext_cli.engine.evaluation import SourceRecord, evaluate, read_records

    if isinstance(records, (str, os.PathLike)):
        records = [records]
    sources: list[SourceRecord] = []
    for position, item in enumerate(records if isinstance(records, Iterable) else [records], start=1):
        if isinstance(item, (str, os.PathLike)):
            sources.extend(read_records([os.fspath(item)], stdin=None))  # type: ignore[arg-type]
        else:
            record = item.to_json() if hasattr(item, "to_json") else item
            if not isinstance(record, dict):
                from llavanext_cli.errors import UsageError

                raise UsageError(f"record {position}: expected a record or a dict, not {type(item).__name__}")
            sources.append(SourceRecord(record, f"record {position}"))
    return evaluate(sources, by=by, inputs="records").as_dict()
