"""Prompt formats: the registry in `prompts/`, rendering conversations, and choosing a checkpoint's format.

A conversation is a list of Hugging Face chat messages: `{"role": "user" | "assistant" | "system",
"content": str | [{"type": "image", ...} | {"type": "text", "text": ...}]}`.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from llavanext_cli.errors import SetupError, UsageError
from llavanext_cli.io.resources import prompts_dir
from llavanext_cli.io.yamlfile import read_yaml

Message = dict[str, Any]

_STRING_FIELDS = ("system", "user", "assistant", "generation_prompt", "image")
_ALL_FIELDS = ("name", "description", "match", "default_system", *_STRING_FIELDS)


class RenderablePromptFormat(Protocol):
    name: str

    def render(self, messages: Sequence[Message], add_generation_prompt: bool = True) -> str: ...


def content_items(message: Message) -> list[dict[str, Any]]:
    """A message's content as a list of typed items (a plain string is one text item)."""
    content = message.get("content", "")
    if isinstance(content, str):
        return [{"type": "text", "text": content}]
    return list(content)


def _text_of(message: Message) -> str:
    return "".join(item.get("text", "") for item in content_items(message) if item.get("type") == "text")


@dataclass(frozen=True)
class PromptFormat:
    """A checkpoint family's prompt format, declared as data (one YAML file in `prompts/`)."""

    name: str
    description: str
    model_ids: tuple[str, ...]
    text_model_types: tuple[str, ...]
    default_system: str | None
    system: str
    user: str
    assistant: str
    generation_prompt: str
    image: str
    source: str = ""

    def render(self, messages: Sequence[Message], add_generation_prompt: bool = True) -> str:
        """Render a conversation as the checkpoint expects it (the model's reply follows the result)."""
        system = self.default_system
        if messages and messages[0].get("role") == "system":
            system = _text_of(messages[0])
        parts = [self.system.replace("{system}", system)] if system is not None else []
        for message in messages:
            role = message.get("role")
            if role == "system":
                continue
            if role not in ("user", "assistant"):
                raise UsageError(f"unknown message role {role!r}: expected user, assistant or system")
            content = "".join(
                self.image if item.get("type") == "image" else item.get("text", "")
                for item in content_items(message)
                if item.get("type") in ("image", "text")
            )
            parts.append((self.user if role == "user" else self.assistant).replace("{content}", content))
        if add_generation_prompt:
            parts.append(self.generation_prompt)
        return "".join(parts)

    def to_chat_template(self) -> str:
        """The same format as a Jinja chat template, for checkpoints to carry (`apply_chat_template`)."""

        def lit(text: str | None) -> str:
            return "none" if text is None else json.dumps(text, ensure_ascii=False)

        def split(template: str, field: str) -> tuple[str, str]:
            before, _, after = template.partition(field)
            return lit(before), lit(after)

        sys_pre, sys_post = split(self.system, "{system}")
        user_pre, user_post = split(self.user, "{content}")
        asst_pre, asst_post = split(self.assistant, "{content}")
        content = (
            "{%- if message['content'] is string -%}{{ message['content'] }}{%- else -%}"
            "{%- for item in message['content'] -%}"
            "{%- if item['type'] == 'image' -%}{{ " + lit(self.image) + " }}"
            "{%- elif item['type'] == 'text' -%}{{ item['text'] }}{%- endif -%}"
            "{%- endfor -%}{%- endif -%}"
        )
        return (
            "{%- set ns = namespace(system=" + lit(self.default_system) + ") -%}"
            "{%- if messages and messages[0]['role'] == 'system' -%}"
            "{%- if messages[0]['content'] is string -%}{%- set ns.system = messages[0]['content'] -%}"
            "{%- else -%}{%- set ns.system = messages[0]['content'] | selectattr('type', 'equalto', 'text')"
            " | map(attribute='text') | join('') -%}{%- endif -%}{%- endif -%}"
            "{%- if ns.system is not none -%}{{ " + sys_pre + " }}{{ ns.system }}{{ " + sys_post + " }}{%- endif -%}"
            "{%- for message in messages -%}"
            "{%- if message['role'] == 'user' -%}{{ " + user_pre + " }}" + content + "{{ " + user_post + " }}"
            "{%- elif message['role'] == 'assistant' -%}{{ " + asst_pre + " }}" + content + "{{ " + asst_post + " }}"
            "{%- elif message['role'] != 'system' -%}"
            "{{ raise_exception('Only user, assistant and system roles are supported') }}{%- endif -%}"
            "{%- endfor -%}"
            "{%- if add_generation_prompt -%}{{ " + lit(self.generation_prompt) + " }}{%- endif -%}"
        )


class ChatTemplateFormat:
    """The checkpoint's own chat template, rendered by transformers exactly as `apply_chat_template` does."""

    name = "chat-template"
    description = "the checkpoint's own chat template"

    def __init__(self, apply_chat_template: Callable[..., str]):
        self._apply = apply_chat_template

    def render(self, messages: Sequence[Message], add_generation_prompt: bool = True) -> str:
        return self._apply(list(messages), add_generation_prompt=add_generation_prompt, tokenize=False)


def _fail(path: Path, field: str, problem: str) -> UsageError:
    return UsageError(f"{path}: field '{field}' {problem}")


def load_prompt_format(path: Path) -> PromptFormat:
    """Read and validate one format file; errors name the file and the field."""
    data = read_yaml(path, "prompt format")
    if not isinstance(data, dict):
        raise UsageError(f"{path}: expected a mapping of prompt-format fields")
    unknown = sorted(set(map(str, data)) - set(_ALL_FIELDS))
    if unknown:
        raise _fail(path, unknown[0], "is not a prompt-format field (fields: " + ", ".join(_ALL_FIELDS) + ")")
    for field in ("name", "user", "assistant", "generation_prompt", "image"):
        if field not in data:
            raise _fail(path, field, "is missing")
    for field in (*_STRING_FIELDS, "name", "description"):
        if field in data and not isinstance(data[field], str):
            raise _fail(path, field, f"must be a string, not {data[field]!r}")
    if not data["name"].strip():
        raise _fail(path, "name", "must not be empty")
    if data.get("default_system") is not None and not isinstance(data["default_system"], str):
        raise _fail(path, "default_system", "must be a string or null")
    for field, placeholder in (("user", "{content}"), ("assistant", "{content}"), ("system", "{system}")):
        if field in data and data[field].count(placeholder) != 1:
            raise _fail(path, field, f"must contain {placeholder} exactly once")
    match = data.get("match") or {}
    if not isinstance(match, dict) or set(match) - {"model_ids", "text_model_types"}:
        raise _fail(path, "match", "must be a mapping with model_ids and text_model_types")
    lists: dict[str, tuple[str, ...]] = {}
    for key in ("model_ids", "text_model_types"):
        value = match.get(key) or []
        if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
            raise _fail(path, f"match.{key}", "must be a list of non-empty strings")
        lists[key] = tuple(v.lower() for v in value)
    return PromptFormat(
        name=data["name"],
        description=data.get("description", ""),
        model_ids=lists["model_ids"],
        text_model_types=lists["text_model_types"],
        default_system=data.get("default_system"),
        system=data.get("system", "{system}"),
        user=data["user"],
        assistant=data["assistant"],
        generation_prompt=data["generation_prompt"],
        image=data["image"],
        source=str(path),
    )


def load_registry(directory: Path | None = None) -> dict[str, PromptFormat]:
    """Every format in the registry directory, by name."""
    directory = prompts_dir() if directory is None else directory
    registry: dict[str, PromptFormat] = {}
    for path in sorted(directory.glob("*.yaml")):
        fmt = load_prompt_format(path)
        if fmt.name in registry:
            raise UsageError(f"{path}: field 'name' {fmt.name!r} is already used by {registry[fmt.name].source}")
        registry[fmt.name] = fmt
    if not registry:
        raise SetupError(f"no prompt formats found in {directory}")
    return registry


def match_model_id(model: str, registry: dict[str, PromptFormat]) -> PromptFormat | None:
    """The format whose model-id pattern is the longest substring of the model id or directory name."""
    names = {model.lower(), Path(model.rstrip("/\\")).name.lower()}
    best: tuple[int, PromptFormat] | None = None
    for fmt in registry.values():
        for pattern in fmt.model_ids:
            if any(pattern in name for name in names) and (best is None or len(pattern) > best[0]):
                best = (len(pattern), fmt)
    return best[1] if best else None


def match_text_model_type(
    architecture: str | None, text_model_type: str | None, registry: dict[str, PromptFormat]
) -> PromptFormat | None:
    """The format declared for this architecture / text model type, the qualified form first."""
    if not text_model_type:
        return None
    for wanted in (f"{architecture}/{text_model_type}", text_model_type):
        for fmt in registry.values():
            if wanted.lower() in fmt.text_model_types:
                return fmt
    return None


@dataclass(frozen=True)
class PromptFormatChoice:
    """Which format a run uses, why, and what to warn about."""

    format: RenderablePromptFormat
    reason: str
    warning: str | None = None


def resolve_prompt_format(
    model: str,
    *,
    requested: str | None = None,
    chat_template: Callable[..., str] | None = None,
    architecture: str | None = None,
    text_model_type: str | None = None,
    registry: dict[str, PromptFormat] | None = None,
) -> PromptFormatChoice:
    """--prompt-format (a registry name or a YAML file), the checkpoint's chat template, the registry matched on
    the model id or directory name, then the registry matched on the config's text model type (with a warning)."""
    registry = load_registry() if registry is None else registry
    if requested:
        if requested in registry:
            return PromptFormatChoice(registry[requested], "--prompt-format")
        if requested.endswith((".yaml", ".yml")) and Path(requested).is_file():
            return PromptFormatChoice(load_prompt_format(Path(requested)), f"--prompt-format file {requested}")
        raise UsageError(
            f"unknown prompt format {requested!r}",
            hint="known formats: " + ", ".join(sorted(registry)) + " (or a path to a format .yaml file)",
        )
    if chat_template is not None:
        return PromptFormatChoice(ChatTemplateFormat(chat_template), "the checkpoint's chat template")
    by_id = match_model_id(model, registry)
    if by_id is not None:
        return PromptFormatChoice(by_id, "registry, matched on the model name")
    by_type = match_text_model_type(architecture, text_model_type, registry)
    if by_type is not None:
        return PromptFormatChoice(
            by_type,
            "registry, matched on the text model type",
            warning=(
                f"{model} has no chat template and its name matches no known format; using {by_type.name!r}, "
                f"guessed from its text model type {text_model_type!r} (set --prompt-format to be sure)"
            ),
        )
    raise UsageError(
        f"cannot tell which prompt format {model} uses: it has no chat template and matches no known format",
        hint="pass --prompt-format NAME, one of: " + ", ".join(sorted(registry)),
    )


def single_image_conversation(prompt: str, num_images: int = 1) -> list[Message]:
    """The one-turn conversation of caption / ask: the images, then the question."""
    content: list[dict[str, Any]] = [{"type": "image"} for _ in range(num_images)]
    content.append({"type": "text", "text": prompt})
    return [{"role": "user", "content": content}]
