"""`inspect-config`: what a checkpoint is and how the tool will run it, from its config alone (no weights)."""

from __future__ import annotations

from typing import Any

from llavanext_cli.errors import LlavaError, SetupError
from llavanext_cli.model.loading import is_local_checkpoint, load_config, load_processor
from llavanext_cli.model.memory import count_parameters, memory_bytes
from llavanext_cli.model.prompts import load_registry, match_model_id, resolve_prompt_format, single_image_conversation
from llavanext_cli.model.checkpoint import choose_prompt_format

DEFAULT_INSPECT_PROMPT = "What is shown in this image?"
_VISION_KEYS = ("model_type", "image_size", "patch_size", "hidden_size", "num_hidden_layers", "num_attention_heads")
_TEXT_KEYS = ("model_type", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
              "vocab_size", "max_position_embeddings")


# Room left on each GPU beyond the weights: activations, the KV cache of a few 2,000-token prompts, the CUDA
# context. A rule of thumb for planning, not a guarantee.
GPU_HEADROOM = 1.2


def parse_memory(text: str) -> int:
    """'80GiB' -> bytes."""
    from llavanext_cli.io.settings import memory_size

    return memory_size(text, "--gpu-memory")


def gpus_needed(memory: dict[str, int], gpu_bytes: int) -> dict[str, int]:
    """GPUs of `gpu_bytes` each that hold the weights at each dtype / quantization, with GPU_HEADROOM."""
    import math

    return {key: max(1, math.ceil(value * GPU_HEADROOM / gpu_bytes)) for key, value in memory.items()}


def parse_image_size(text: str) -> tuple[int, int]:
    """'640x480' -> (width, height)."""
    from llavanext_cli.errors import UsageError

    try:
        width, height = (int(part) for part in text.lower().split("x"))
    except ValueError as exc:
        raise UsageError(f"--image-size must be WIDTHxHEIGHT (e.g. 640x480), not {text!r}") from exc
    if width <= 0 or height <= 0:
        raise UsageError(f"--image-size must be positive, not {text!r}")
    return width, height


def _pick(config: Any, keys: tuple[str, ...]) -> dict[str, Any]:
    return {key: getattr(config, key, None) for key in keys}


def image_layout(processor: Any, config: Any, width: int, height: int) -> dict[str, Any]:
    """How many image tokens the processor inserts for an image of this size, and into how many tiles it is cut."""
    from transformers.image_processing_utils import select_best_resolution

    tokens = processor._get_num_multimodal_tokens(image_sizes=[(height, width)])["num_image_tokens"][0]
    if config.model_type != "llava_next":
        return {"image_tokens": int(tokens), "tiles": 1, "grid": [1, 1]}
    crop = processor.image_processor.crop_size
    tile = crop["height"] if isinstance(crop, dict) else crop.height
    best_height, best_width = select_best_resolution((height, width), processor.image_processor.image_grid_pinpoints)
    grid = [best_height // tile, best_width // tile]
    # The anyres tiles plus one downscaled view of the whole image.
    return {"image_tokens": int(tokens), "tiles": grid[0] * grid[1] + 1, "grid": grid}


def inspect_checkpoint(model: str, *, prompt: str = DEFAULT_INSPECT_PROMPT, image_size: tuple[int, int] | None = None,
                       requested_format: str | None = None, offline: bool = False,
                       gpu_memory: str = "80GiB") -> dict[str, Any]:
    """Everything inspect-config reports. A hub id whose config cannot be fetched still gets the registry's prompt
    keys, with the config keys null and `config_error` saying why."""
    report: dict[str, Any] = {
        "model": model, "architecture": None, "prompt_format": None, "prompt_format_source": None, "prompt": None,
        "vision": None, "text": None, "image_token_index": None, "image_grid_pinpoints": None,
        "vision_feature_layer": None, "vision_feature_select_strategy": None, "parameters": None,
        "memory_bytes": None,
    }
    if image_size is not None:
        report.update(image_size=list(image_size), image_tokens=None, tiles=None, grid=None)
    conversation = single_image_conversation(prompt)
    try:
        config = load_config(model, offline=offline, need_weights=False)
    except SetupError as exc:
        if is_local_checkpoint(model) or model.startswith((".", "/", "~")):
            raise
        registry = load_registry()
        if requested_format:
            choice_format = resolve_prompt_format(model, requested=requested_format, registry=registry).format
        else:
            choice_format = match_model_id(model, registry)
        if choice_format is None:
            raise
        report.update(prompt_format=choice_format.name, prompt_format_source="registry",
                      prompt=choice_format.render(conversation), config_error=exc.message)
        return report

    processor = None
    try:
        processor = load_processor(model, config, offline=offline)
    except LlavaError as exc:
        report["processor_error"] = exc.message
    choice = choose_prompt_format(model, config, processor, requested_format)
    counts = count_parameters(config)
    report.update(
        architecture=config.architectures[0] if getattr(config, "architectures", None) else config.model_type,
        prompt_format=choice.format.name,
        prompt_format_source=choice.reason,
        prompt=choice.format.render(conversation),
        vision=_pick(config.vision_config, _VISION_KEYS),
        text=_pick(config.text_config, _TEXT_KEYS),
        image_token_index=config.image_token_index,
        image_grid_pinpoints=getattr(config, "image_grid_pinpoints", None),
        vision_feature_layer=config.vision_feature_layer,
        vision_feature_select_strategy=config.vision_feature_select_strategy,
        parameters=counts["total"],
        memory_bytes=memory_bytes(counts),
        gpu_memory=gpu_memory,
    )
    report["gpus_needed"] = gpus_needed(report["memory_bytes"], parse_memory(gpu_memory))
    if choice.warning:
        report["warning"] = choice.warning
    if image_size is not None and processor is not None:
        report.update(image_layout(processor, config, *image_size))
    return report
