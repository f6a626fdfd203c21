"""Loading a checkpoint: config, processor and model, mapped from the tool's flags onto transformers 5.

Safe on checkpoints the tool did not make: weights load from safetensors only, and no code a checkpoint
carries is ever imported (`trust_remote_code=False`, `auto_map` refused up front).
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from llavanext_cli.errors import SetupError, UsageError

SUPPORTED_ARCHITECTURES = {
    "llava": "LlavaForConditionalGeneration",
    "llava_next": "LlavaNextForConditionalGeneration",
}
# Module-name prefixes kept in full precision under --quant: transformers 5 matches skip patterns from the
# start of the module name, so bare names ("vision_tower") would silently quantize everything.
UNQUANTIZED_MODULES = ("model.vision_tower", "model.multi_modal_projector", "lm_head")
_PICKLE_WEIGHTS = ("pytorch_model.bin", "pytorch_model.bin.index.json", "model.bin", "tf_model.h5", "flax_model.msgpack")


@dataclass(frozen=True)
class LoadOptions:
    """How to build the model: the tool's flags, before they are mapped onto transformers."""

    dtype: str = "auto"
    quant: str = "none"
    quant_type: str = "nf4"
    attn: str = "auto"
    device: str = "auto"
    offline: bool = False
    compile: bool = False
    max_memory: dict[int | str, int] | None = None


def configure_library_logging(verbose: bool) -> None:
    """Silence transformers / Hub logging and progress bars unless verbose (they would go to stderr anyway)."""
    if not verbose:
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
        os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    import transformers
    from huggingface_hub.utils import disable_progress_bars, enable_progress_bars

    if verbose:
        transformers.logging.set_verbosity_info()
        enable_progress_bars()
    else:
        transformers.logging.set_verbosity_error()
        transformers.utils.logging.disable_progress_bar()
        disable_progress_bars()
        for name in ("accelerate", "huggingface_hub", "bitsandbytes"):
            logging.getLogger(name).setLevel(logging.ERROR)


def is_local_checkpoint(model: str) -> bool:
    return Path(model).expanduser().is_dir()


def _looks_like_path(model: str) -> bool:
    # a hub id is "name" or "org/name"; anything else that is not a directory was meant as a path
    return model.startswith((".", "/", "~")) or model.count("/") > 1 or "\\" in model


def check_local_checkpoint(path: Path, need_weights: bool = True) -> None:
    """Refuse a local directory that is not a loadable, safe checkpoint, before anything in it is read as code.
    `need_weights=False` (inspect-config) accepts a directory with a config and no weights."""
    config_path = path / "config.json"
    if not config_path.is_file():
        raise SetupError(f"{path} is not a checkpoint: it has no config.json")
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise SetupError(f"cannot read {config_path}: {exc}") from exc
    if not isinstance(config, dict):
        raise SetupError(f"{config_path} is not a JSON object")
    for name in ("config.json", "processor_config.json", "preprocessor_config.json", "tokenizer_config.json"):
        component = config if name == "config.json" else _read_json(path / name)
        if isinstance(component, dict) and ("auto_map" in component or
                                            "auto_map" in (component.get("image_processor") or {})):
            raise SetupError(
                f"{path} asks to run its own code (auto_map in {name}); llava never runs code from a checkpoint",
                hint="use a checkpoint whose architecture transformers ships (llava, llava_next)",
            )
    has_safetensors = any(path.glob("*.safetensors")) or (path / "model.safetensors.index.json").is_file()
    if not has_safetensors:
        pickles = [name for name in _PICKLE_WEIGHTS if (path / name).exists()] + [p.name for p in path.glob("*.bin")]
        if pickles:  # refused by every command, inspect-config too: such a checkpoint is not one llava runs
            raise SetupError(
                f"{path} has only pickle weights ({pickles[0]}); llava loads safetensors only",
                hint="convert the weights to safetensors with a tool you trust, or use the checkpoint's safetensors revision",
            )
        if need_weights:
            raise SetupError(f"{path} has no weights (no *.safetensors file)")


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None
    except (OSError, ValueError):
        return None  # an unreadable component is reported by transformers when it is loaded


def _hub_error(model: str, offline: bool, exc: Exception) -> SetupError:
    detail = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    if offline:
        return SetupError(
            f"cannot load {model} offline: {detail}",
            hint=f"download it first on a networked machine (hf download {model}), or drop --offline",
        )
    return SetupError(f"cannot load {model}: {detail}", hint="check the model id or path, and the network")


def load_config(model: str, offline: bool = False, need_weights: bool = True) -> Any:
    """The checkpoint's config, without weights; refuses remote code and unsupported architectures."""
    if is_local_checkpoint(model):
        check_local_checkpoint(Path(model).expanduser(), need_weights)
    elif _looks_like_path(model):
        raise SetupError(f"checkpoint directory not found: {model}")
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(model, local_files_only=offline, trust_remote_code=False)
    except (OSError, ValueError, KeyError) as exc:
        raise _hub_error(model, offline, exc) from exc
    if getattr(config, "auto_map", None):
        raise SetupError(f"{model} asks to run its own code (auto_map); llava never runs code from a checkpoint")
    if config.model_type not in SUPPORTED_ARCHITECTURES:
        raise SetupError(
            f"{model} is a {config.model_type!r} checkpoint; llava runs {' and '.join(SUPPORTED_ARCHITECTURES)}"
        )
    return config


def load_generation_config(model: str, config: Any, offline: bool = False) -> Any:
    """The checkpoint's generation_config.json (what `generate` does by default), read before any weight; a checkpoint
    without one gets the defaults transformers derives from its config, as `from_pretrained` does."""
    from transformers import GenerationConfig

    try:
        return GenerationConfig.from_pretrained(model, local_files_only=offline)
    except OSError:
        return GenerationConfig.from_model_config(config)
    except ValueError as exc:  # a key transformers refuses
        raise SetupError(f"cannot read the generation config of {model}: {str(exc).splitlines()[0]}") from exc


def _number_of_additional_image_tokens(config: Any) -> int:
    # CLIP-style towers prepend a CLS token to the patches; SigLIP-style ones add nothing.
    return 1 if "clip" in getattr(config.vision_config, "model_type", "") else 0


def load_processor(model: str, config: Any, offline: bool = False) -> Any:
    """The processor, set for left padding, with attributes that pre-v4.46 processors lack taken from the config."""
    from transformers import AutoProcessor

    try:
        processor = AutoProcessor.from_pretrained(model, local_files_only=offline, trust_remote_code=False)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise _hub_error(model, offline, exc) from exc
    if not hasattr(processor, "tokenizer") or not hasattr(processor, "image_processor"):
        raise SetupError(f"{model} has no image+text processor (found {type(processor).__name__})")
    if getattr(processor, "patch_size", None) is None:
        processor.patch_size = config.vision_config.patch_size
        processor.num_additional_image_tokens = _number_of_additional_image_tokens(config)
    if getattr(processor, "vision_feature_select_strategy", None) is None:
        processor.vision_feature_select_strategy = config.vision_feature_select_strategy
    processor.tokenizer.padding_side = "left"
    if processor.tokenizer.pad_token is None:
        processor.tokenizer.pad_token = processor.tokenizer.eos_token
    return processor


def resolve_device(device: str) -> str:
    """`auto` is the first CUDA GPU, else Apple's MPS, else the CPU; an explicit device must exist."""
    import torch

    if device == "auto":
        if torch.cuda.is_available():
            return "cuda"
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return "mps"
        return "cpu"
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise SetupError(f"--device {device}: no CUDA GPU is available", hint="use --device cpu")
        index = int(device.split(":", 1)[1]) if ":" in device else 0
        if index >= torch.cuda.device_count():
            raise SetupError(f"--device {device}: only {torch.cuda.device_count()} CUDA device(s) are visible")
    if device == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise SetupError("--device mps: Apple's MPS backend is not available", hint="use --device cpu")
    return device


def resolve_dtype(dtype: str, config: Any, device: str) -> Any:
    """`auto`: the checkpoint's own dtype on an accelerator, float32 on the CPU (half precision is slow there)."""
    import torch

    if dtype != "auto":
        return getattr(torch, dtype)
    if device == "cpu":
        return torch.float32
    stored = getattr(config, "dtype", None) or getattr(config.text_config, "dtype", None)
    if isinstance(stored, str):
        stored = getattr(torch, stored, None)
    return stored if isinstance(stored, torch.dtype) else torch.float16


def quantization_config(quant: str, quant_type: str, compute_dtype: Any) -> Any:
    """bitsandbytes settings that quantize the language model and leave the vision side and lm_head alone."""
    if quant == "none":
        return None
    if importlib.util.find_spec("bitsandbytes") is None:
        raise SetupError(f"--quant {quant} needs bitsandbytes", hint="pip install bitsandbytes")
    from transformers import BitsAndBytesConfig

    if quant == "8bit":
        return BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=list(UNQUANTIZED_MODULES))
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=quant_type,
        bnb_4bit_compute_dtype=compute_dtype,
        llm_int8_skip_modules=list(UNQUANTIZED_MODULES),
    )


def attn_implementation(attn: str, device: str) -> str | None:
    if attn == "auto":
        return None
    if attn == "flash_attention_2":
        if importlib.util.find_spec("flash_attn") is None:
            raise SetupError(
                "--attn flash_attention_2 needs the flash-attn package, which is not installed",
                hint="pip install flash-attn --no-build-isolation (CUDA only), or use --attn sdpa",
            )
        if not device.startswith("cuda"):
            raise UsageError(f"--attn flash_attention_2 runs on CUDA GPUs only, not on {device}", hint="use --attn sdpa")
    return attn


@dataclass(frozen=True)
class ModelPlan:
    """Everything decided about a model before its weights load: the device, and the arguments of
    `from_pretrained` (dtype=, attn_implementation=, quantization_config=, device_map=)."""

    model: str
    model_class: str
    device: str
    kwargs: dict[str, Any]
    compile: bool


def plan_model(model: str, config: Any, options: LoadOptions) -> ModelPlan:
    """Check the flags against this machine and map them onto today's API; raises what a load would raise for a
    wrong flag (UsageError / SetupError) without loading anything."""
    device = resolve_device(options.device)
    if options.compile and not device.startswith("cuda"):
        raise UsageError(f"--compile needs a CUDA GPU, not {device}", hint="drop --compile")
    if options.max_memory and not (options.device == "auto" and device == "cuda"):
        raise UsageError("--max-memory applies when --device auto spreads a checkpoint over GPUs",
                         hint="drop --max-memory, or run on a machine with CUDA GPUs")
    dtype = resolve_dtype(options.dtype, config, device)
    kwargs: dict[str, Any] = {
        "config": config,
        "dtype": dtype,
        "use_safetensors": True,
        "trust_remote_code": False,
        "local_files_only": options.offline,
    }
    implementation = attn_implementation(options.attn, device)
    if implementation is not None:
        kwargs["attn_implementation"] = implementation
    quant = quantization_config(options.quant, options.quant_type, dtype)
    if quant is not None:
        kwargs["quantization_config"] = quant
    # accelerate places the weights: "auto" spreads a large checkpoint over every visible GPU, except in a
    # data-parallel run, where each process has its own GPU (LOCAL_RANK).
    from llavanext_cli.io.sharding import data_parallel_from_env

    parallel = data_parallel_from_env()
    if options.device == "auto" and device == "cuda" and parallel is not None:
        kwargs["device_map"] = {"": f"cuda:{parallel.local_rank % max(torch_cuda_count(), 1)}"}
    elif options.device == "auto" and device == "cuda":
        kwargs["device_map"] = "auto"
        if options.max_memory:
            kwargs["max_memory"] = options.max_memory
    else:
        kwargs["device_map"] = {"": device}
    return ModelPlan(model, SUPPORTED_ARCHITECTURES[config.model_type], device, kwargs, options.compile)


def load_planned_model(plan: ModelPlan, offline: bool = False) -> Any:
    """Load the weights as planned; the model comes back in eval mode."""
    import transformers

    from safetensors import SafetensorError

    model_class = getattr(transformers, plan.model_class)
    try:
        loaded = model_class.from_pretrained(plan.model, **plan.kwargs)
    except SafetensorError as exc:
        raise SetupError(f"cannot load {plan.model}: a weights file is damaged ({exc})",
                         hint="download or copy the checkpoint again") from exc
    except (OSError, ValueError) as exc:
        raise _hub_error(plan.model, offline, exc) from exc
    except ImportError as exc:
        raise SetupError(f"cannot load {plan.model}: {exc}") from exc
    loaded.eval()
    if plan.compile:
        compile_language_model(loaded)
    return loaded


def load_model(model: str, config: Any, options: LoadOptions) -> Any:
    """The model in eval mode, with the flags mapped onto today's API."""
    return load_planned_model(plan_model(model, config, options), options.offline)


def torch_cuda_count() -> int:
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def compile_language_model(model: Any) -> None:
    """A compiled language-model forward: faster decoding on CUDA, with the static KV cache (fixed shapes) that the
    execution plan gives plain batches, once the first batch has paid for compilation. The vision tower, whose shapes
    vary with each image, stays eager; so do the calls that continue from a cache of their own (`eager_forward`)."""
    import torch

    language_model = model.model.language_model
    language_model._llava_eager_forward = language_model.forward
    language_model.forward = torch.compile(language_model.forward, mode="reduce-overhead", dynamic=False)


@contextlib.contextmanager
def eager_forward(model: Any) -> Iterator[None]:
    """The language model's own forward for the duration, where it was compiled: a call that continues from a
    dynamic cache (growing shapes) would make the fixed-shape compiled graph recompile at every step."""
    language_model = getattr(getattr(model, "model", None), "language_model", None)
    eager = getattr(language_model, "_llava_eager_forward", None)
    if eager is None:
        yield
        return
    compiled = language_model.forward
    language_model.forward = eager
    try:
        yield
    finally:
        language_model.forward = compiled


def quantized_module_names(model: Any) -> list[str]:
    """Names of the modules that bitsandbytes replaced (for tests and `inspect-config -v`)."""
    try:
        import bitsandbytes as bnb
    except ImportError:
        return []
    kinds = (bnb.nn.Linear8bitLt, bnb.nn.Linear4bit)
    return [name for name, module in model.named_modules() if isinstance(module, kinds)]
