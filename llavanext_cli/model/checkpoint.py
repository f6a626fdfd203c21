"""An opened checkpoint: config, generation config, processor, model and the resolved prompt format, built from the
settings.

The weights load on first use of `Checkpoint.model`, so that the input pipeline (decoding, resizing, tokenizing
the first images) already works while they load; every flag is checked against the machine when the checkpoint
is opened, so a wrong flag still fails before anything loads.
"""

from __future__ import annotations

import copy
import functools
import threading
import time
from collections.abc import Callable
from typing import Any

from llavanext_cli.model.loading import (
    LoadOptions, ModelPlan, load_config, load_generation_config, load_planned_model, load_processor, plan_model)
from llavanext_cli.model.prompts import PromptFormatChoice, resolve_prompt_format
from llavanext_cli.io.settings import Settings


class Checkpoint:
    """`model` loads on first use (once, whichever thread asks first; a failed load fails every later use too)."""

    def __init__(self, model_id: str, config: Any, processor: Any, prompt: PromptFormatChoice, plan: ModelPlan,
                 offline: bool = False, on_loaded: Callable[[], None] | None = None,
                 generation_config: Any = None) -> None:
        self.model_id = model_id
        self.config = config
        self.generation_config = generation_config if generation_config is not None else \
            load_generation_config(model_id, config, offline)
        self.processor = processor
        self.prompt = prompt
        self.plan = plan
        self._offline = offline
        self._on_loaded = on_loaded
        self._model: Any = None
        self.load_seconds: float | None = None  # how long the weights took to load, once they have
        self._failure: BaseException | None = None
        self._lock = threading.Lock()

    @functools.cached_property
    def preparing_processor(self) -> Any:
        """A copy of the processor for the thread that prepares the next inputs while the model works: a fast
        tokenizer's padding state is mutable, and two threads using one tokenizer fail ("Already borrowed").
        Made on first use (before that thread starts)."""
        return copy.deepcopy(self.processor)

    @property
    def device_type(self) -> str:
        """cpu, cuda or mps: known before the weights load."""
        return self.plan.device.split(":", 1)[0]

    @property
    def model(self) -> Any:
        with self._lock:
            if self._model is None:
                if self._failure is not None:
                    raise self._failure
                start = time.perf_counter()
                try:
                    self._model = load_planned_model(self.plan, self._offline)
                except BaseException as exc:
                    self._failure = exc
                    raise
                self.load_seconds = time.perf_counter() - start
                if self._on_loaded is not None:
                    self._on_loaded()
            return self._model

    def load(self) -> Checkpoint:
        """Load the weights now (commands that wait for a person rather than for inputs)."""
        _ = self.model
        return self

    @property
    def device(self) -> Any:
        return self.model.device


def load_options(settings: Settings) -> LoadOptions:
    from llavanext_cli.io.settings import parse_max_memory

    return LoadOptions(
        compile=settings.compile,
        max_memory=parse_max_memory(settings.max_memory) if settings.max_memory else None,
        dtype=settings.dtype,
        quant=settings.quant,
        quant_type=settings.quant_type,
        attn=settings.attn,
        device=settings.device,
        offline=settings.offline,
    )


def choose_prompt_format(model_id: str, config: Any, processor: Any, requested: str | None) -> PromptFormatChoice:
    """The contract's order: --prompt-format, the checkpoint's chat template, the registry by name, by config."""
    template = getattr(processor, "chat_template", None) if processor is not None else None
    return resolve_prompt_format(
        model_id,
        requested=requested,
        chat_template=processor.apply_chat_template if template else None,
        architecture=getattr(config, "model_type", None),
        text_model_type=getattr(getattr(config, "text_config", None), "model_type", None),
    )


def open_checkpoint(settings: Settings, on_loaded: Callable[[], None] | None = None) -> Checkpoint:
    """Config, processor and prompt format now, the model on first use; errors are SetupError / UsageError with a
    hint. `on_loaded` is called once the weights are in memory."""
    config = load_config(settings.model, offline=settings.offline)
    generation_config = load_generation_config(settings.model, config, offline=settings.offline)
    processor = load_processor(settings.model, config, offline=settings.offline)
    prompt = choose_prompt_format(settings.model, config, processor, settings.prompt_format)
    options = load_options(settings)
    plan = plan_model(settings.model, config, options)
    if settings.memory_check:  # before a weight is read
        from llavanext_cli.model.memory import check_weights_fit

        check_weights_fit(settings.model, config, plan.device, plan.kwargs.get("device_map"), plan.kwargs["dtype"],
                          options.quant, options.max_memory)
    return Checkpoint(settings.model, config, processor, prompt, plan, settings.offline, on_loaded, generation_config)
