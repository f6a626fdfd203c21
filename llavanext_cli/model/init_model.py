"""`llava init-model`: a randomly initialised checkpoint from a YAML spec, loadable with plain transformers.

This is the seeds' "customizing the model configuration" use case, and how the tests get real checkpoints
without downloading weights: real config, model, image-processor and processor classes, a real tokenizer.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from llavanext_cli.errors import SetupError, UsageError
from llavanext_cli.model.loading import SUPPORTED_ARCHITECTURES
from llavanext_cli.model.prompts import load_registry
from llavanext_cli.io.writers import usual_file_mode
from llavanext_cli.io.yamlfile import read_yaml

SPEC_FIELDS = ("architecture", "seed", "dtype", "tokenizer", "chat_template", "vision", "text", "config",
               "image_processor", "init")
BUILTIN_TOKENIZERS = ("mistral",)
_DEFAULT_VISION_TYPE = "clip_vision_model"
_DEFAULT_TEXT_TYPE = {"llava_next": "mistral", "llava": "llama"}
_IMAGE_PROCESSOR_FIELDS = ("size", "crop_size", "image_grid_pinpoints", "image_mean", "image_std", "do_center_crop",
                           "resample", "do_convert_rgb")
_INIT_FIELDS = ("text_qk_scale",)
IMAGE_TOKEN = "<image>"
PAD_TOKEN = "<pad>"


@dataclass(frozen=True)
class BuiltCheckpoint:
    path: Path
    architecture: str
    parameters: int
    image_token_index: int
    vocab_size: int
    chat_template: str | None


def _field_error(spec_path: Path, field: str, problem: str) -> UsageError:
    return UsageError(f"{spec_path}: field '{field}' {problem}")


def _mapping(spec: dict[str, Any], field: str, spec_path: Path) -> dict[str, Any]:
    value = spec.get(field) or {}
    if not isinstance(value, dict):
        raise _field_error(spec_path, field, f"must be a mapping, not {value!r}")
    return dict(value)


def _check_overrides(defaults: dict[str, Any], overrides: dict[str, Any], prefix: str, spec_path: Path) -> None:
    """Every override names a real config field and has that field's type."""
    for key, value in overrides.items():
        if key not in defaults:
            raise _field_error(spec_path, f"{prefix}.{key}", "is not a field of this config")
        default = defaults[key]
        if default is None or value is None:
            continue
        if isinstance(default, bool) != isinstance(value, bool):
            raise _field_error(spec_path, f"{prefix}.{key}", f"must be {type(default).__name__}, not {value!r}")
        if isinstance(default, (int, float)) and not isinstance(default, bool):
            if not isinstance(value, (int, float)) or (isinstance(default, int) and not isinstance(value, int)):
                raise _field_error(spec_path, f"{prefix}.{key}", f"must be {type(default).__name__}, not {value!r}")
        elif isinstance(default, str) and not isinstance(value, str):
            raise _field_error(spec_path, f"{prefix}.{key}", f"must be a string, not {value!r}")
        elif isinstance(default, (list, tuple)) and not isinstance(value, (list, tuple)):
            raise _field_error(spec_path, f"{prefix}.{key}", f"must be a list, not {value!r}")


def read_spec(spec_path: Path) -> dict[str, Any]:
    """Read a spec and check its top-level fields; deeper fields are checked against the real config classes."""
    spec = read_yaml(spec_path, "spec")
    if not isinstance(spec, dict):
        raise UsageError(f"{spec_path}: expected a mapping of spec fields ({', '.join(SPEC_FIELDS)})")
    for key in spec:
        if key not in SPEC_FIELDS:
            raise _field_error(spec_path, str(key), "is not a spec field (fields: " + ", ".join(SPEC_FIELDS) + ")")
    architecture = spec.get("architecture", "llava_next")
    if architecture not in SUPPORTED_ARCHITECTURES:
        raise _field_error(spec_path, "architecture", f"must be one of {', '.join(SUPPORTED_ARCHITECTURES)}, "
                                                      f"not {architecture!r}")
    spec["architecture"] = architecture
    seed = spec.get("seed", 0)
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise _field_error(spec_path, "seed", f"must be a non-negative integer, not {seed!r}")
    if spec.get("dtype", "float32") not in ("float32", "float16", "bfloat16"):
        raise _field_error(spec_path, "dtype", f"must be float32, float16 or bfloat16, not {spec['dtype']!r}")
    for field in ("vision", "text", "config", "image_processor", "init"):
        spec[field] = _mapping(spec, field, spec_path)
    for key in spec["image_processor"]:
        if key not in _IMAGE_PROCESSOR_FIELDS:
            raise _field_error(spec_path, f"image_processor.{key}",
                               "is not an image-processor setting (" + ", ".join(_IMAGE_PROCESSOR_FIELDS) + ")")
    for key, value in spec["init"].items():
        if key not in _INIT_FIELDS:
            raise _field_error(spec_path, f"init.{key}", "is not an init setting (" + ", ".join(_INIT_FIELDS) + ")")
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
            raise _field_error(spec_path, f"init.{key}", f"must be a positive number, not {value!r}")
    template = spec.get("chat_template")
    if template is not None and not isinstance(template, str):
        raise _field_error(spec_path, "chat_template", "must be a prompt-format name or null")
    tokenizer = spec.get("tokenizer", "mistral")
    if not isinstance(tokenizer, str) or not tokenizer:
        raise _field_error(spec_path, "tokenizer", f"must be {' or '.join(BUILTIN_TOKENIZERS)} or a local path")
    spec["tokenizer"] = tokenizer
    return spec


def _builtin_mistral_tokenizer_dir(workdir: Path) -> Path:
    """The real Mistral-7B sentencepiece model that the `mistral-common` package ships, as a tokenizer folder."""
    try:
        import mistral_common
    except ImportError as exc:
        raise SetupError("the built-in tokenizer 'mistral' needs the mistral-common package",
                         hint="pip install mistral-common, or set 'tokenizer:' to a local tokenizer folder") from exc
    source = Path(mistral_common.__file__).parent / "data" / "tokenizer.model.v1"
    if not source.is_file():
        raise SetupError(f"mistral-common does not ship {source.name} here ({source})")
    folder = workdir / "tokenizer"
    folder.mkdir()
    shutil.copyfile(source, folder / "tokenizer.model")
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "LlamaTokenizer", "add_bos_token": True, "add_eos_token": False, "legacy": False,
        "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>",
    }))
    return folder


def _load_tokenizer(source: str, spec_dir: Path, workdir: Path, spec_path: Path) -> Any:
    from transformers import AutoTokenizer

    if source in BUILTIN_TOKENIZERS:
        folder = _builtin_mistral_tokenizer_dir(workdir)
    else:
        folder = Path(source).expanduser()
        if not folder.is_absolute():
            folder = spec_dir / folder
        if not folder.is_dir():
            raise _field_error(spec_path, "tokenizer", f"names no built-in tokenizer ({', '.join(BUILTIN_TOKENIZERS)}) "
                                                       f"and no directory ({folder})")
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(folder), local_files_only=True, trust_remote_code=False)
    except (OSError, ValueError, ImportError) as exc:
        raise SetupError(f"cannot load the tokenizer from {folder}: {exc}") from exc
    # The image placeholder first, then padding, as the llava-hf checkpoints have them (<image> = 32000 on Mistral).
    if IMAGE_TOKEN not in tokenizer.get_vocab():
        tokenizer.add_special_tokens({"additional_special_tokens": [IMAGE_TOKEN]})
    if tokenizer.pad_token is None:
        tokenizer.add_special_tokens({"pad_token": PAD_TOKEN})
    return tokenizer


def _sub_config(kind: str, overrides: dict[str, Any], default_type: str, prefix: str, spec_path: Path) -> Any:
    from transformers import AutoConfig

    model_type = overrides.pop("model_type", default_type)
    try:
        defaults = AutoConfig.for_model(model_type).to_dict()
    except ValueError as exc:
        raise _field_error(spec_path, f"{prefix}.model_type", f"{model_type!r} is not a {kind} model type "
                                                              "transformers knows") from exc
    if kind == "vision" and not {"image_size", "patch_size", "hidden_size"} <= set(defaults):
        raise _field_error(spec_path, f"{prefix}.model_type", f"{model_type!r} is not a vision-tower config "
                                                              "(e.g. clip_vision_model, siglip_vision_model)")
    _check_overrides(defaults, overrides, prefix, spec_path)
    try:
        config = AutoConfig.for_model(model_type, **overrides)
    except Exception as exc:  # transformers validates configs with several exception types (strict dataclasses)
        raise _field_error(spec_path, prefix, f"is not a valid {model_type} config: {_one_line(exc)}") from exc
    return config


def _default_pinpoints(image_size: int) -> list[list[int]]:
    # The llava-hf LLaVA-NeXT grids: 2x1, 1x2, 2x2, 3x1 and 1x3 tiles.
    s = image_size
    return [[s, 2 * s], [2 * s, s], [2 * s, 2 * s], [3 * s, s], [s, 3 * s]]


def build_checkpoint(spec_path: Path, out_dir: Path, *, seed: int | None = None, force: bool = False) -> BuiltCheckpoint:
    """Build the checkpoint `spec_path` describes into `out_dir` (safetensors, processor, chat template)."""
    spec_path = Path(spec_path)
    out_dir = Path(out_dir)
    spec = read_spec(spec_path)
    if out_dir.exists() and not out_dir.is_dir():
        raise UsageError(f"{out_dir} exists and is not a directory")
    if out_dir.exists() and any(out_dir.iterdir()) and not force:
        raise UsageError(f"{out_dir} already exists and is not empty", hint="choose another directory, or pass --force")
    registry = load_registry()
    template_name = spec.get("chat_template")
    if template_name is not None and template_name not in registry:
        raise _field_error(spec_path, "chat_template", f"{template_name!r} is not a prompt format "
                                                       f"({', '.join(sorted(registry))})")
    architecture = spec["architecture"]
    seed = spec.get("seed", 0) if seed is None else seed

    import torch
    import transformers

    with tempfile.TemporaryDirectory(prefix="llava-init-") as workdir:
        tokenizer = _load_tokenizer(spec["tokenizer"], spec_path.parent, Path(workdir), spec_path)
        vision_config = _sub_config("vision", spec["vision"], _DEFAULT_VISION_TYPE, "vision", spec_path)
        text_overrides = spec["text"]
        vocab_needed = len(tokenizer)
        text_overrides.setdefault("vocab_size", -(-vocab_needed // 64) * 64)
        text_overrides.setdefault("pad_token_id", tokenizer.pad_token_id)
        text_overrides.setdefault("bos_token_id", tokenizer.bos_token_id)
        text_overrides.setdefault("eos_token_id", tokenizer.eos_token_id)
        text_config = _sub_config("text", text_overrides, _DEFAULT_TEXT_TYPE[architecture], "text", spec_path)
        if text_config.vocab_size < vocab_needed:
            raise _field_error(spec_path, "text.vocab_size", f"is {text_config.vocab_size} but the tokenizer has "
                                                             f"{vocab_needed} tokens")

        config_class = getattr(transformers, {"llava": "LlavaConfig", "llava_next": "LlavaNextConfig"}[architecture])
        top = dict(spec["config"])
        _check_overrides(config_class().to_dict(), top, "config", spec_path)
        for key in ("vision_config", "text_config", "image_token_index"):
            if key in top:
                raise _field_error(spec_path, f"config.{key}", "is set by the tool (use 'vision:' / 'text:')")
        image_size = vision_config.image_size
        patch_size = vision_config.patch_size
        if image_size % patch_size:
            raise _field_error(spec_path, "vision.image_size", f"{image_size} is not a multiple of the patch size "
                                                               f"{patch_size}")
        if architecture == "llava_next":
            top.setdefault("image_grid_pinpoints", _default_pinpoints(image_size))
        else:
            top.setdefault("image_seq_length", (image_size // patch_size) ** 2)
        image_token_index = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
        try:
            config = config_class(vision_config=vision_config, text_config=text_config,
                                  image_token_index=image_token_index, **top)
        except Exception as exc:  # transformers validates configs with several exception types (strict dataclasses)
            raise _field_error(spec_path, "config", f"is not valid: {_one_line(exc)}") from exc
        _check_consistency(config, architecture, spec_path)
        _check_size(config, spec_path, spec.get("dtype", "float32"))

        processor = _build_processor(architecture, config, tokenizer, spec["image_processor"], spec_path,
                                     registry[template_name].to_chat_template() if template_name else None)

        torch.manual_seed(seed)
        model_class = getattr(transformers, SUPPORTED_ARCHITECTURES[architecture])
        model = model_class(config).eval()
        qk_scale = spec["init"].get("text_qk_scale")
        if qk_scale:
            # Sharper attention in the text model, so a random checkpoint still responds to the prompt rather
            # than to ~2,000 image tokens alone (what makes tiny checkpoints useful for testing prompt formats).
            with torch.no_grad():
                for name, module in model.named_modules():
                    if name.startswith("model.language_model") and name.endswith(("q_proj", "k_proj")):
                        module.weight.mul_(qk_scale)
        _smoke_test(model, processor, spec_path)
        model.to(getattr(torch, spec.get("dtype", "float32")))
        model.generation_config.pad_token_id = tokenizer.pad_token_id
        out_dir.mkdir(parents=True, exist_ok=True)
        model.save_pretrained(out_dir)
        processor.save_pretrained(out_dir)
        # safetensors files are written through a private temporary file (0600): give every file the permissions
        # a plain `open` gives, so that the checkpoint is readable like the rest of the folder.
        mode = usual_file_mode()
        for written in out_dir.iterdir():
            if written.is_file() and written.stat().st_mode & 0o777 != mode:
                written.chmod(mode)
    (out_dir / "llava-init-spec.yaml").write_text(
        f"# built by `llava init-model` with seed {seed}\n" + yaml.safe_dump(read_spec(spec_path), sort_keys=False)
    )
    return BuiltCheckpoint(
        path=out_dir,
        architecture=architecture,
        parameters=sum(p.numel() for p in model.parameters()),
        image_token_index=image_token_index,
        vocab_size=config.text_config.vocab_size,
        chat_template=template_name,
    )


def _one_line(exc: Exception) -> str:
    text = " ".join(line.strip() for line in str(exc).splitlines() if line.strip())
    return (text[:300] + "...") if len(text) > 300 else (text or type(exc).__name__)


def _check_consistency(config: Any, architecture: str, spec_path: Path) -> None:
    """The mistakes transformers only reports when the model first runs, named by field."""
    text, vision = config.text_config, config.vision_config
    heads = getattr(text, "num_attention_heads", None)
    if heads and text.hidden_size % heads and getattr(text, "head_dim", None) is None:
        raise _field_error(spec_path, "text.num_attention_heads", f"{heads} does not divide hidden_size "
                                                                  f"{text.hidden_size}")
    kv_heads = getattr(text, "num_key_value_heads", None)
    if heads and kv_heads and heads % kv_heads:
        raise _field_error(spec_path, "text.num_key_value_heads", f"{kv_heads} does not divide num_attention_heads "
                                                                  f"{heads}")
    if vision.hidden_size % vision.num_attention_heads:
        raise _field_error(spec_path, "vision.num_attention_heads", f"{vision.num_attention_heads} does not divide "
                                                                    f"hidden_size {vision.hidden_size}")
    layers = vision.num_hidden_layers
    feature_layers = config.vision_feature_layer
    for layer in feature_layers if isinstance(feature_layers, (list, tuple)) else [feature_layers]:
        if not -(layers + 1) <= layer <= layers:
            raise _field_error(spec_path, "config.vision_feature_layer", f"{layer} is outside the vision tower's "
                                                                         f"{layers} layers")
    if architecture == "llava_next":
        size = vision.image_size
        pinpoints = config.image_grid_pinpoints
        if not pinpoints or any(len(p) != 2 or p[0] % size or p[1] % size or p[0] <= 0 or p[1] <= 0
                                for p in pinpoints):
            raise _field_error(spec_path, "config.image_grid_pinpoints", f"must be [height, width] pairs that are "
                                                                         f"multiples of the image size {size}")


def _check_size(config: Any, spec_path: Path, dtype: str) -> None:
    """Refuse a spec that could not fit in this machine's memory, before allocating it."""
    import os

    from accelerate import init_empty_weights
    from transformers import AutoModelForImageTextToText

    with init_empty_weights():
        parameters = sum(p.numel() for p in AutoModelForImageTextToText.from_config(config).parameters())
    needed = parameters * (4 if dtype == "float32" else 2)
    try:
        memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return
    if needed > memory // 2:
        raise UsageError(f"{spec_path} describes a model of {parameters:,} parameters ({needed / 2**30:.1f} GiB), "
                         f"more than half this machine's memory",
                         hint="set the sizes under 'vision:' and 'text:' (see configs/tiny-llava-next.yaml)")


def _smoke_test(model: Any, processor: Any, spec_path: Path) -> None:
    """Run one small image through the new model, so that a spec that cannot run fails here, not in caption."""
    import torch
    from PIL import Image

    image = Image.new("RGB", (64, 48), (120, 80, 40))
    try:
        inputs = processor(images=image, text=processor.image_token + "\nsmoke test", return_tensors="pt")
        with torch.inference_mode():
            model(**inputs)
    except Exception as exc:  # any failure means the spec describes a model that does not run
        raise UsageError(f"{spec_path} builds a model that does not run: {_one_line(exc)}") from exc


def _build_processor(architecture: str, config: Any, tokenizer: Any, settings: dict[str, Any], spec_path: Path,
                     chat_template: str | None) -> Any:
    import transformers

    image_size = config.vision_config.image_size
    kwargs: dict[str, Any] = {
        "size": {"shortest_edge": image_size},
        "crop_size": {"height": image_size, "width": image_size},
    }
    if architecture == "llava_next":
        kwargs["image_grid_pinpoints"] = config.image_grid_pinpoints
    kwargs.update(settings)
    image_class = "LlavaNextImageProcessor" if architecture == "llava_next" else "CLIPImageProcessor"
    try:
        image_processor = getattr(transformers, image_class)(**kwargs)
    except (ValueError, TypeError) as exc:
        raise _field_error(spec_path, "image_processor", f"is not valid: {exc}") from exc
    processor_class = getattr(transformers, "LlavaNextProcessor" if architecture == "llava_next" else "LlavaProcessor")
    return processor_class(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=config.vision_config.patch_size,
        vision_feature_select_strategy=config.vision_feature_select_strategy,
        num_additional_image_tokens=1 if "clip" in config.vision_config.model_type else 0,
        chat_template=chat_template,
    )
