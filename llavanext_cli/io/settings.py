"""Layered settings: flag > LLAVA_* environment variable > --config file > user config file > configs/default.yaml.

Every layer goes through the same validation, so a bad value reads the same whether it came from a flag, the
environment or a file, and names where it came from.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from llavanext_cli.errors import SetupError, UsageError
from llavanext_cli.io.formats import FORMATS
from llavanext_cli.io.resources import configs_dir
from llavanext_cli.io.yamlfile import read_yaml

DTYPES = ("auto", "float16", "bfloat16", "float32")
QUANTS = ("none", "4bit", "8bit")
QUANT_TYPES = ("nf4", "fp4")
ATTN_IMPLEMENTATIONS = ("auto", "sdpa", "eager", "flash_attention_2")
NORMALIZATIONS = ("sum", "mean")
_DEVICE_PATTERN = re.compile(r"^(auto|cpu|mps|cuda(:\d+)?)$")


@dataclass(frozen=True)
class _Spec:
    kind: type
    nullable: bool = False
    choices: tuple[str, ...] | None = None
    minimum: float | None = None
    maximum: float | None = None
    pattern: re.Pattern[str] | None = None
    describe: str = ""
    check: Callable[[Any, str], None] | None = None  # a deeper check of the value (raises UsageError)


_SPECS: dict[str, _Spec] = {
    "model": _Spec(str),
    "prompt_format": _Spec(str, nullable=True),
    "dtype": _Spec(str, choices=DTYPES),
    "quant": _Spec(str, choices=QUANTS),
    "quant_type": _Spec(str, choices=QUANT_TYPES),
    "attn": _Spec(str, choices=ATTN_IMPLEMENTATIONS),
    "device": _Spec(str, pattern=_DEVICE_PATTERN, describe="auto, cpu, cuda, cuda:N or mps"),
    "batch_size": _Spec(int, minimum=1),
    "workers": _Spec(int, minimum=0),
    "max_new_tokens": _Spec(int, minimum=1),
    "temperature": _Spec(float, minimum=0.0),
    "top_p": _Spec(float, minimum=0.0, maximum=1.0),
    "num_beams": _Spec(int, minimum=1),
    "seed": _Spec(int, nullable=True, minimum=0),
    "format": _Spec(str, nullable=True, choices=tuple(FORMATS)),
    "offline": _Spec(bool),
    "url_timeout": _Spec(float, minimum=0.001),
    "url_max_bytes": _Spec(int, minimum=1),
    "caption_prompt": _Spec(str),
    "classify_prompt": _Spec(str),
    "normalize": _Spec(str, choices=NORMALIZATIONS),
    "fast_decode": _Spec(bool),
    "compile": _Spec(bool),
    "max_memory": _Spec(str, nullable=True, check=lambda value, source: parse_max_memory(value, source)),
    "memory_check": _Spec(bool),
}

SETTING_NAMES: tuple[str, ...] = tuple(_SPECS)


# --- amounts of memory (--max-memory, inspect-config --gpu-memory) ------------------------------------------------

_UNIT_SPELLING = {unit.lower(): unit for unit in ("KB", "MB", "GB", "KiB", "MiB", "GiB")}


def memory_size(text: str, source: str) -> int:
    """'70GiB' or '141GB' -> bytes, read by accelerate's `convert_file_size_to_int` (units KB, MB, GB and KiB, MiB,
    GiB, in any case: accelerate reads a lower-case 'b' as bits, which nobody means here)."""
    from accelerate.utils import convert_file_size_to_int

    compact = text.strip().replace(" ", "")
    number, unit = compact.rstrip("KMGiBkmgib"), compact[len(compact.rstrip("KMGiBkmgib")):]
    size = -1
    if unit.lower() in _UNIT_SPELLING and number:
        try:
            size = convert_file_size_to_int(number + _UNIT_SPELLING[unit.lower()])
        except ValueError:
            size = -1
    if size <= 0:
        raise UsageError(f"{source}: {text!r} is not an amount of memory such as 70GiB or 141GB")
    return size


def parse_max_memory(text: str, source: str = "--max-memory") -> dict[int | str, int]:
    """'0=70GiB,1=70GiB,cpu=200GiB' -> {0: bytes, 1: bytes, 'cpu': bytes} (accelerate's max_memory)."""
    limits: dict[int | str, int] = {}
    for part in text.split(","):
        device, separator, amount = part.strip().partition("=")
        device = device.strip()
        if not device or not separator:
            raise UsageError(f"{source} {text!r}: expected DEVICE=AMOUNT pairs such as 0=70GiB,1=70GiB,cpu=200GiB")
        if device.isdigit():
            key: int | str = int(device)
        elif device in ("cpu", "disk", "mps"):
            key = device
        else:
            raise UsageError(f"{source}: unknown device {device!r} (a GPU number, cpu or disk)")
        try:
            limits[key] = memory_size(amount, source)
        except UsageError as exc:
            raise UsageError(f"{source} {text!r}: expected DEVICE=AMOUNT pairs such as 0=70GiB,1=70GiB,cpu=200GiB "
                             f"({amount.strip()!r} is not an amount of memory)") from exc
    return limits



def env_var_name(key: str) -> str:
    """The environment variable of a setting: `max_new_tokens` -> `LLAVA_MAX_NEW_TOKENS`."""
    return "LLAVA_" + key.upper()


@dataclass(frozen=True)
class Settings:
    """The resolved settings of one run, and where each value came from."""

    model: str
    prompt_format: str | None
    dtype: str
    quant: str
    quant_type: str
    attn: str
    device: str
    batch_size: int
    workers: int
    max_new_tokens: int
    temperature: float
    top_p: float
    num_beams: int
    seed: int | None
    format: str | None
    offline: bool
    url_timeout: float
    url_max_bytes: int
    caption_prompt: str
    classify_prompt: str
    normalize: str
    fast_decode: bool
    compile: bool
    max_memory: str | None
    memory_check: bool
    sources: dict[str, str] = field(default_factory=dict, compare=False)

    def as_dict(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in SETTING_NAMES}


def validate_value(key: str, value: Any, source: str) -> Any:
    """Check and normalise one setting; `source` names where it came from for the error message."""
    spec = _SPECS.get(key)
    if spec is None:
        raise UsageError(f"{source}: unknown setting '{key}'", hint="Known settings: " + ", ".join(SETTING_NAMES))
    if value is None:
        if spec.nullable:
            return None
        raise UsageError(f"{source}: '{key}' must not be empty")
    if spec.kind is bool:
        if not isinstance(value, bool):
            raise UsageError(f"{source}: '{key}' must be true or false, not {value!r}")
    elif spec.kind is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise UsageError(f"{source}: '{key}' must be an integer, not {value!r}")
    elif spec.kind is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise UsageError(f"{source}: '{key}' must be a number, not {value!r}")
        value = float(value)
        if value != value or value in (float("inf"), float("-inf")):
            raise UsageError(f"{source}: '{key}' must be a finite number, not {value!r}")
    elif not isinstance(value, str):
        raise UsageError(f"{source}: '{key}' must be a string, not {value!r}")
    if spec.choices is not None and value not in spec.choices:
        raise UsageError(f"{source}: '{key}' must be one of {', '.join(spec.choices)}, not {value!r}")
    if spec.pattern is not None and not spec.pattern.match(value):
        raise UsageError(f"{source}: '{key}' must be {spec.describe}, not {value!r}")
    if spec.minimum is not None and value < spec.minimum:
        raise UsageError(f"{source}: '{key}' must be at least {spec.minimum:g}, not {value!r}")
    if spec.maximum is not None and value > spec.maximum:
        raise UsageError(f"{source}: '{key}' must be at most {spec.maximum:g}, not {value!r}")
    if spec.kind is str and key in ("model",) and not value.strip():
        raise UsageError(f"{source}: '{key}' must not be empty")
    if spec.check is not None:
        spec.check(value, source)
    return value


def _parse_env_value(key: str, raw: str, source: str) -> Any:
    """Environment variables are strings: read them as the setting's type."""
    spec = _SPECS[key]
    if spec.nullable and raw.strip().lower() in ("", "null", "none"):
        return None
    try:
        if spec.kind is bool:
            lowered = raw.strip().lower()
            if lowered in ("1", "true", "yes", "on"):
                return True
            if lowered in ("0", "false", "no", "off"):
                return False
            raise ValueError
        if spec.kind is int:
            return int(raw)
        if spec.kind is float:
            return float(raw)
    except ValueError as exc:
        kind = {bool: "true or false", int: "an integer", float: "a number"}[spec.kind]
        raise UsageError(f"{source}: must be {kind}, not {raw!r}") from exc
    return raw


def read_config_file(path: Path, *, required: bool) -> dict[str, Any]:
    """Read and validate one settings file; {} when it does not exist and is not required."""
    if not path.exists() and not required:
        return {}
    data = read_yaml(path, "config file")
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise UsageError(f"{path}: expected a mapping of settings, got {type(data).__name__}")
    return {key: validate_value(str(key), value, str(path)) for key, value in data.items()}


def user_config_path() -> Path:
    """`$LLAVA_HOME/config.yaml`, else config.yaml in the platform's per-user config directory (~/.config/llava on
    Linux, as click's get_app_dir names it: ~/Library/Application Support/llava on macOS, %APPDATA%\\llava on
    Windows)."""
    import sys

    home = os.environ.get("LLAVA_HOME")
    if home:
        return Path(home).expanduser() / "config.yaml"
    if sys.platform.startswith("win"):
        base = Path(os.environ.get("APPDATA") or Path.home())
    elif sys.platform == "darwin":
        base = Path.home() / "Library" / "Application Support"
    else:
        base = Path(os.environ.get("XDG_CONFIG_HOME") or Path.home() / ".config")
    return base / "llava" / "config.yaml"


def resolve_settings(flags: Mapping[str, Any] | None = None, config_file: Path | None = None) -> Settings:
    """A run's settings through every layer (the user's config file included), and the combinations no layer can
    check alone: what the CLI and the Python API both use."""
    settings = load_settings(flags, config_file, user_config=user_config_path())
    if settings.quant_type != "nf4" and settings.quant != "4bit":
        raise UsageError(f"quant_type {settings.quant_type} (from {settings.sources.get('quant_type')}) applies to "
                         f"--quant 4bit only, and quant is {settings.quant}")
    return settings


def project_defaults() -> dict[str, Any]:
    """configs/default.yaml: the lowest layer (what `--help` shows as each setting's default)."""
    return read_config_file(configs_dir() / "default.yaml", required=True)


def load_settings(
    flags: Mapping[str, Any] | None = None,
    config_file: Path | None = None,
    env: Mapping[str, str] | None = None,
    user_config: Path | None = None,
) -> Settings:
    """Resolve every setting through the layers. `flags` holds only the flags the user gave (None = not given);
    `user_config` is the user's own settings file (read when it exists)."""
    env = os.environ if env is None else env
    default_path = configs_dir() / "default.yaml"
    values = read_config_file(default_path, required=True)
    missing = [key for key in SETTING_NAMES if key not in values]
    if missing:
        raise SetupError(f"{default_path}: missing settings {', '.join(missing)}")
    sources = {key: "default" for key in values}

    layers: list[tuple[str, dict[str, Any]]] = []
    if user_config is not None:
        layers.append((str(user_config), read_config_file(user_config, required=False)))
    if config_file is not None:
        layers.append((str(config_file), read_config_file(Path(config_file), required=True)))
    for source, layer in layers:
        for key, value in layer.items():
            values[key] = value
            sources[key] = source

    for key in SETTING_NAMES:
        name = env_var_name(key)
        if name in env:
            values[key] = validate_value(key, _parse_env_value(key, env[name], name), name)
            sources[key] = name

    for key, value in (flags or {}).items():
        if value is None:
            continue
        option = "--" + key.replace("_", "-")
        values[key] = validate_value(key, value, option)
        sources[key] = option

    return Settings(**values, sources=sources)
