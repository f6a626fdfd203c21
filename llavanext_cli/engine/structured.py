"""Structured answers (`--schema`): decoding constrained token by token so that every answer is JSON valid against
a JSON Schema, with llguidance (a grammar engine that compiles JSON Schema against the tokenizer's vocabulary).

- A schema comes as a file, as inline JSON (starts with `{`), or in a concise form
  (`count int, kind: person|animal|object, outdoor bool, tags list`, see `parse_concise`).
- It is checked before anything loads: valid JSON Schema (jsonschema), and only keywords the decoder enforces
  while decoding (an allowlist: llguidance raises on some keywords it cannot enforce, and silently ignores the
  ones it does not know, typos included). Objects that do not say `additionalProperties` get no other properties
  (the answers are a subset of what the schema allows: always valid, never padded with invented keys).
- It is compiled once per schema and tokenizer, against the tokenizer, before the weights load; decoding is
  compact JSON (no free whitespace), one matcher per row of a batch.
- The schema also goes to the model as text, after the question, so that it knows what is wanted.
- An answer cut at --max-new-tokens before its JSON is complete is an error for that input; an answer that is
  complete is parsed and validated again with jsonschema before it becomes a record's `data`.
"""

from __future__ import annotations

import functools
import json
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from llavanext_cli.errors import SetupError, UsageError
from llavanext_cli.io.textfiles import read_text

# Keywords enforced while decoding (each checked by generating under it and validating every answer), and
# annotations, which constrain nothing.
ENFORCED_KEYWORDS = frozenset({
    "type", "enum", "const",
    "properties", "required", "additionalProperties", "patternProperties", "minProperties", "maxProperties",
    "items", "prefixItems", "minItems", "maxItems",
    "minLength", "maxLength", "pattern", "format",
    "minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum", "multipleOf",
    "anyOf", "oneOf", "allOf", "$ref", "$defs", "definitions",
})
ANNOTATIONS = frozenset({"title", "description", "default", "examples", "$schema", "$id", "$comment", "deprecated",
                         "readOnly", "writeOnly"})
FORMATS = frozenset({"date", "date-time", "time", "email", "uuid", "ipv4", "ipv6", "hostname", "uri"})
_SUBSCHEMA_MAPS = ("properties", "patternProperties", "$defs", "definitions")
_SUBSCHEMA_LISTS = ("anyOf", "oneOf", "allOf", "prefixItems")
_SUBSCHEMA_ONE = ("items", "additionalProperties")
# Compact JSON: no free whitespace between tokens, "," and ":" as separators. Overrides, so that a schema's own
# "x-guidance" options cannot turn free whitespace back on.
_JSON_OPTIONS = {"whitespace_flexible": False, "item_separator": ",", "key_separator": ":"}

CUT_SHORT = "answer cut at {tokens} tokens before the JSON was complete; raise --max-new-tokens"


# --- reading a schema -----------------------------------------------------------------------------------------


_CONCISE_TYPES = {"str": "string", "string": "string", "text": "string", "int": "integer", "integer": "integer",
                  "float": "number", "number": "number", "bool": "boolean", "boolean": "boolean"}
_FIELD = re.compile(r"^\s*(?P<name>[A-Za-z_][\w-]*)\s*(?P<type>[A-Za-z]+(?:\[[A-Za-z]+\])?)?"
                    r"\s*(?P<range>-?\d+(?:\.\d+)?\s*\.\.\s*-?\d+(?:\.\d+)?)?\s*(?::(?P<after>.*))?$")


def parse_concise(text: str) -> dict[str, Any]:
    """The concise form: comma-separated fields `NAME [TYPE] [MIN..MAX] [: DESCRIPTION | : CHOICE|CHOICE...]`.

    TYPE is str (the default), int, float, bool, list (of strings) or list[TYPE]; MIN..MAX bounds an int or a float;
    after a colon, choices separated by `|` make the field one of them (strings), anything else describes it to
    the model. Every field is required and no other is allowed:

        count int 0..100, kind: person|animal|object, outdoor bool, tags list, caption: one sentence
    """
    properties: dict[str, Any] = {}
    for part in _split_fields(text):
        match = _FIELD.match(part)
        if not match:
            raise UsageError(f"--schema: cannot read the field {part.strip()!r}",
                             hint="fields are 'NAME [TYPE] [MIN..MAX] [: DESCRIPTION or a|b|c]', comma-separated, "
                                  "e.g. 'count int, kind: person|animal, outdoor bool, tags list'")
        name = match["name"]
        if name in properties:
            raise UsageError(f"--schema: field {name!r} is given twice")
        schema = _concise_type(match["type"] or "str", name)
        if match["range"]:
            if schema.get("type") not in ("integer", "number"):
                raise UsageError(f"--schema: field {name!r}: a range MIN..MAX applies to int and float fields")
            low, high = (float(v) for v in match["range"].split(".."))
            if low > high:
                raise UsageError(f"--schema: field {name!r}: the range {match['range']} is empty")
            cast = int if schema["type"] == "integer" else float
            if cast is int and (low != int(low) or high != int(high)):
                raise UsageError(f"--schema: field {name!r}: an int range takes whole numbers")
            schema.update(minimum=cast(low), maximum=cast(high))
        after = (match["after"] or "").strip()
        if "|" in after:
            if match["type"] or match["range"]:
                raise UsageError(f"--schema: field {name!r}: choices ({after}) come without a type")
            choices = [choice.strip() for choice in after.split("|")]
            if any(not choice for choice in choices) or len(set(choices)) != len(choices):
                raise UsageError(f"--schema: field {name!r}: empty or repeated choice in {after!r}")
            schema = {"enum": choices}
        elif after:
            schema["description"] = after
        properties[name] = schema
    if not properties:
        raise UsageError("--schema: no fields", hint="e.g. --schema 'count int, kind: person|animal, outdoor bool'")
    return {"type": "object", "properties": properties, "required": list(properties), "additionalProperties": False}


def _split_fields(text: str) -> list[str]:
    return [part for part in text.split(",") if part.strip()] if text.strip() else []


def _concise_type(word: str, name: str) -> dict[str, Any]:
    lowered = word.lower()
    if lowered == "list":
        return {"type": "array", "items": {"type": "string"}}
    if lowered.startswith("list[") and lowered.endswith("]"):
        return {"type": "array", "items": _concise_type(lowered[5:-1], name)}
    if lowered in _CONCISE_TYPES:
        return {"type": _CONCISE_TYPES[lowered]}
    raise UsageError(f"--schema: field {name!r}: unknown type {word!r}",
                     hint="types: str, int, float, bool, list, list[int] (or choices after a colon: a|b|c)")


def read_schema_text(text: str) -> tuple[Any, str]:
    """The schema `--schema` names, and where it came from: inline JSON (starts with `{`), a file, or the concise
    form."""
    stripped = text.strip()
    if not stripped:
        raise UsageError("--schema is empty", hint="a JSON Schema file, inline JSON, or fields: 'count int, ok bool'")
    if stripped.startswith("{"):
        return _json(stripped, "--schema"), "inline JSON"
    path = Path(text).expanduser()
    if path.is_file():
        return _json(read_text(path, "--schema file"), f"--schema {path}"), str(path)
    if path.is_dir():
        raise UsageError(f"--schema: {text} is a directory, not a JSON Schema file")
    if _looks_like_a_path(stripped):
        raise UsageError(f"--schema: no such file: {text}")
    return parse_concise(text), "concise form"


def _looks_like_a_path(text: str) -> bool:
    """A file name the user meant (and mistyped), not the concise form: a .json name, or a path with a separator
    and none of the concise form's commas, colons or spaces ('kind: indoor/outdoor' is the concise form)."""
    if text.lower().endswith(".json"):
        return True
    return any(separator in text for separator in {"/", os.sep}) and not any(c in text for c in ",: \t")


def _json(text: str, where: str) -> Any:
    try:
        return json.loads(text)
    except ValueError as exc:
        raise UsageError(f"{where}: not JSON ({exc})") from exc


def check_enforceable(schema: Any, path: str = "$") -> None:
    """Refuse what the decoder could not enforce while decoding (UsageError naming the JSON path)."""
    if isinstance(schema, bool):
        return
    if not isinstance(schema, dict):
        raise UsageError(f"--schema: {path} must be a schema (an object), not {json.dumps(schema)[:40]}")
    for key, value in schema.items():
        if key in ANNOTATIONS or key.startswith("x-"):
            continue
        if key not in ENFORCED_KEYWORDS:
            raise UsageError(f"--schema: {path}: the keyword {key!r} cannot be enforced while decoding",
                             hint="enforced: " + ", ".join(sorted(ENFORCED_KEYWORDS)))
        if key == "format" and value not in FORMATS:
            raise UsageError(f"--schema: {path}: the format {value!r} cannot be enforced",
                             hint="formats: " + ", ".join(sorted(FORMATS)))
        if key == "$ref" and not (isinstance(value, str) and value.startswith("#")):
            raise UsageError(f"--schema: {path}: only references within the schema (#/...) are followed")
        if key in _SUBSCHEMA_MAPS and isinstance(value, dict):
            for name, sub in value.items():
                check_enforceable(sub, f"{path}.{key}.{name}")
        elif key in _SUBSCHEMA_LISTS and isinstance(value, list):
            for index, sub in enumerate(value):
                check_enforceable(sub, f"{path}.{key}[{index}]")
        elif key in _SUBSCHEMA_ONE:
            for sub in value if isinstance(value, list) else [value]:
                check_enforceable(sub, f"{path}.{key}")


def closed_objects(schema: Any) -> Any:
    """The schema for decoding: an object schema that names its properties and does not say
    `additionalProperties` allows no other property (a subset of what the schema allows, so every answer still
    validates against the schema as given; objects built from allOf / anyOf / oneOf / $ref are left as they are)."""
    if not isinstance(schema, dict):
        return schema
    closed = dict(schema)
    for key in _SUBSCHEMA_MAPS:
        if isinstance(schema.get(key), dict):
            closed[key] = {name: closed_objects(sub) for name, sub in schema[key].items()}
    for key in (*_SUBSCHEMA_LISTS, *_SUBSCHEMA_ONE):
        value = schema.get(key)
        if isinstance(value, list):
            closed[key] = [closed_objects(sub) for sub in value]
        elif isinstance(value, dict):
            closed[key] = closed_objects(value)
    combined = any(key in schema for key in ("allOf", "anyOf", "oneOf", "$ref"))
    if "properties" in schema and "additionalProperties" not in schema and not combined:
        closed["additionalProperties"] = False
        # a required property the schema does not describe may hold any value: it stays allowed
        unlisted = [name for name in schema.get("required", []) if isinstance(name, str)
                    and isinstance(closed.get("properties"), dict) and name not in closed["properties"]]
        if unlisted:
            closed["properties"] = {**closed["properties"], **{name: {} for name in unlisted}}
    return closed


@dataclass(frozen=True)
class AnswerSchema:
    """A checked JSON Schema for answers."""

    schema: Any
    source: str

    def instruction(self) -> str:
        """What the model is told, after the question."""
        kind = "a JSON object" if isinstance(self.schema, dict) and self.schema.get("type") == "object" else "JSON"
        schema = json.dumps(self.schema, ensure_ascii=False, separators=(",", ":"))
        return f"Answer with {kind} that matches this JSON Schema: {schema}"

    def prompt(self, question: str) -> str:
        """The text of the user's turn: the question, then the instruction."""
        return f"{question}\n{self.instruction()}"

    def validator(self) -> Any:
        import jsonschema

        kind = jsonschema.validators.validator_for(self.schema)
        return kind(self.schema, format_checker=kind.FORMAT_CHECKER)

    def compile(self, checkpoint: Any) -> Constraint:
        """The decoder's grammar for this schema and the checkpoint's tokenizer (no weights needed)."""
        tokenizer = checkpoint.processor.tokenizer
        vocab = checkpoint.config.get_text_config().vocab_size
        stops = _stop_ids(checkpoint)
        engine = _engine_tokenizer(tokenizer, vocab, tuple(stops))
        return Constraint(self, _grammar(json.dumps(closed_objects(self.schema), ensure_ascii=False), engine),
                          engine, stops, self.validator())


def load_schema(text: str) -> AnswerSchema:
    """--schema: read, valid JSON Schema, enforceable while decoding; UsageError (exit 2) otherwise."""
    import jsonschema

    schema, source = read_schema_text(text)
    try:
        jsonschema.validators.validator_for(schema).check_schema(schema)
    except jsonschema.SchemaError as exc:
        where = "".join(f"[{part!r}]" for part in exc.path)
        raise UsageError(f"--schema is not a valid JSON Schema: {exc.message}" + (f" (at {where})" if where else ""))
    check_enforceable(schema)
    return AnswerSchema(schema, source)


# --- compiling ------------------------------------------------------------------------------------------------


def _stop_ids(checkpoint: Any) -> list[int]:
    tokenizer = checkpoint.processor.tokenizer
    eos = getattr(checkpoint.config.get_text_config(), "eos_token_id", None)
    ids = set(eos if isinstance(eos, (list, tuple)) else [eos] if eos is not None else [])
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    return sorted(ids)


@functools.lru_cache(maxsize=8)
def _engine_tokenizer(tokenizer: Any, vocab: int, stops: tuple[int, ...]) -> Any:
    """llguidance's view of the tokenizer (about half a second to build: once per tokenizer). `vocab` is the width
    of the model's logits, which the tokenizer's vocabulary may not fill: ids past it are never allowed."""
    try:
        import llguidance.hf
    except ImportError as exc:
        raise SetupError(f"--schema needs the llguidance package ({exc})", hint="pip install llguidance") from exc
    try:
        return llguidance.hf.from_tokenizer(tokenizer, n_vocab=vocab, eos_token=list(stops))
    except ValueError as exc:  # "Only fast tokenizers are supported"
        raise SetupError(f"--schema cannot use this checkpoint's tokenizer: {exc}",
                         hint="it needs a fast (tokenizers-backed) tokenizer, a tokenizer.json") from exc


@functools.lru_cache(maxsize=64)
def _grammar(schema_text: str, engine: Any) -> str:
    """The compiled grammar, once per schema text (its property order matters: answers follow it) and tokenizer."""
    from llguidance import LLMatcher

    try:
        grammar = LLMatcher.grammar_from_json_schema(schema_text, overrides=_JSON_OPTIONS)
    except ValueError as exc:
        raise UsageError(f"--schema cannot be enforced: {str(exc).splitlines()[0]}") from exc
    failed, messages = LLMatcher.validate_grammar_with_warnings(grammar, engine)
    if failed:  # "Unimplemented keys", "Unsatisfiable schema", ...
        raise UsageError(f"--schema cannot be enforced: {messages[0].splitlines()[0]}")
    return grammar


# --- decoding -------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RowOutcome:
    """How a row's answer ended: `data` (valid against the schema), or `error`."""

    data: Any = None
    error: str | None = None


@dataclass
class Constraint:
    """A schema compiled for one checkpoint: makes the logits processor of each generate() call, and judges what
    each row generated."""

    schema: AnswerSchema
    grammar: str
    engine: Any
    stop_ids: list[int]
    validator: Any

    def logits_processor(self, rows: int) -> Any:
        """A transformers logits processor with one matcher per row (single use: one per generate() call)."""
        return _processor_class()(self.engine, self.grammar, rows, self.stop_ids)

    def outcomes(self, processor: Any, new_tokens: Any, texts: Sequence[str]) -> list[RowOutcome]:
        """Each row's end: complete JSON (parsed, validated again), or cut short, or (an engine error) failed."""
        results = []
        for status, tokens, text in zip(processor.finish(new_tokens), processor.consumed, texts):
            if status == "truncated":
                results.append(RowOutcome(error=CUT_SHORT.format(tokens=tokens)))
                continue
            if status == "error":
                results.append(RowOutcome(error="the decoder could not continue the JSON"))
                continue
            try:
                data = json.loads(text)
            except ValueError as exc:  # the grammar makes this impossible: say so rather than write bad data
                results.append(RowOutcome(error=f"the answer is not JSON ({exc})"))
                continue
            problem = next(iter(self.validator.iter_errors(data)), None)
            if problem is not None:
                results.append(RowOutcome(error=f"the answer does not satisfy the schema ({problem.message})"))
                continue
            results.append(RowOutcome(data=data))
        return results


@functools.cache
def _processor_class() -> type:
    """The logits processor class, made once (transformers is imported on the --schema path only)."""
    import torch
    from llguidance import LLMatcher
    from transformers import LogitsProcessor

    class JsonSchemaLogitsProcessor(LogitsProcessor):
        """Each row of a generate() batch constrained by its own matcher.

        generate() calls a logits processor once a step with the whole sequences so far (prompt, left padding
        included, and the tokens generated), of one length for every row: from the second call on, a row's last
        token is the one it sampled at the previous step, whatever its padding. It is fed to the row's matcher,
        then the row's logits are masked with what the matcher allows next. A row that has produced its stop token
        is left alone (generate() pads it); a row whose matcher failed may only stop. The last token generated is
        never shown to a processor: `finish` feeds the rest and tells how each row ended.

        The matchers write llguidance's packed bitmask (one bit a token, 32 tokens an int32 word) into a host
        tensor; it goes to the logits' device as it is (a 32nd of a boolean mask), and is unpacked and applied there,
        in place. (llguidance.torch's own `apply_token_bitmask_inplace` is the same arithmetic under torch.compile,
        whose first call takes about 30 s on a CPU: too much for a command-line tool that starts every run.)"""

        def __init__(self, engine: Any, grammar: str, rows: int, stop_ids: Sequence[int]):
            self.matchers = [LLMatcher(engine, grammar, log_level=0) for _ in range(rows)]
            self.vocab = engine.vocab_size
            self.stop_ids = set(stop_ids)
            words = (self.vocab + 31) // 32
            self.bitmask = torch.full((rows, words), -1, dtype=torch.int32,
                                      pin_memory=torch.cuda.is_available())
            stop_only = torch.zeros(words, dtype=torch.int64)
            for token in stop_ids:
                stop_only[token // 32] |= 1 << (token % 32)
            self.stop_only = stop_only.to(torch.int32)  # two's complement wrap of bit 31, as llguidance's words
            self.consumed = [0] * rows
            self.ended = [False] * rows
            self.failed = [False] * rows
            self.started = False
            self._bits: dict[Any, Any] = {}

        def _consume(self, row: int, token: int) -> None:
            if self.matchers[row].consume_token(token):
                self.consumed[row] += 1
                self.ended[row] = token in self.stop_ids
            else:
                self.failed[row] = True

        def __call__(self, input_ids: Any, scores: Any) -> Any:
            rows = len(self.matchers)
            if input_ids.shape[0] != rows:
                raise RuntimeError(f"a schema processor made for {rows} rows got {input_ids.shape[0]}")
            active = self._advance(input_ids[:, -1].tolist() if self.started else None)
            self.started = True
            if active:
                self._mask(scores, active)
            return scores

        def _advance(self, tokens: list[int] | None) -> list[int]:
            """Feed each row the token it chose at the last step (None: the first step), then compute what each
            row allows next; the rows still constrained."""
            if tokens is not None:
                for row, token in enumerate(tokens):
                    if not (self.ended[row] or self.failed[row]):
                        self._consume(row, token)
            active = []
            for row, matcher in enumerate(self.matchers):
                if self.ended[row]:
                    continue
                if self.failed[row]:
                    self.bitmask[row] = self.stop_only
                else:
                    words = self.bitmask[row]
                    matcher.unsafe_compute_mask_ptr(words.data_ptr(), words.numel() * words.element_size())
                active.append(row)
            return active

        def _mask(self, scores: Any, active: list[int]) -> None:
            """scores[row, token] = -inf where the row's bit for the token is 0 (token t is bit t % 32 of the
            little-endian word t // 32), on the scores' device; columns past the tokenizer's vocabulary always."""
            if scores.device.type == "cpu" and scores.is_contiguous() and scores.dtype == torch.float32:
                self._mask_on_the_host(scores, active)
                return
            device = scores.device
            if device not in self._bits:
                self._bits[device] = torch.arange(32, dtype=torch.int32, device=device)
            every = len(active) == scores.shape[0]
            packed = (self.bitmask if every else self.bitmask[active]).to(device, non_blocking=True)
            allowed = ((packed.unsqueeze(-1) >> self._bits[device]) & 1).flatten(1).bool()
            width = scores.shape[1]
            if allowed.shape[1] < width:  # logits wider than the vocabulary: those columns are never allowed
                allowed = torch.nn.functional.pad(allowed, (0, width - allowed.shape[1]))
            blocked = ~allowed[:, :width]
            if every:
                scores.masked_fill_(blocked, float("-inf"))
            else:
                index = torch.tensor(active, device=device)
                scores[index] = scores[index].masked_fill(blocked, float("-inf"))

        def _mask_on_the_host(self, scores: Any, active: list[int]) -> None:
            """The same where the logits are on the CPU already: numpy unpacks and masks in place, in a third of the
            time torch's element-wise operations take on one row of 32k."""
            import numpy as np

            view = scores.numpy()  # the same memory
            packed = self.bitmask.numpy()
            width = view.shape[1]
            for row in active:
                allowed = np.unpackbits(packed[row].view(np.uint8), bitorder="little")
                if allowed.shape[0] < width:
                    allowed = np.pad(allowed, (0, width - allowed.shape[0]))
                np.putmask(view[row], allowed[:width] == 0, -np.inf)

        def finish(self, new_tokens: Any) -> list[str]:
            """Feed each row the tokens it generated that its matcher has not seen; how each row ended: "complete"
            (the JSON closed), "truncated" (it did not), or "error"."""
            statuses = []
            for row, matcher in enumerate(self.matchers):
                for token in new_tokens[row].tolist()[self.consumed[row]:]:
                    if self.ended[row] or self.failed[row]:
                        break
                    self._consume(row, token)
                if self.failed[row]:
                    statuses.append("error")
                elif self.ended[row] or matcher.is_accepting():
                    statuses.append("complete")
                else:
                    statuses.append("truncated")
            return statuses

    return JsonSchemaLogitsProcessor
