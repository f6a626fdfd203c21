"""What runs together: one plan, decided from the settings and the checkpoint's own generation config before any
weight loads, so that every combination either works or is one usage error (exit 2) up front.

The plan decides:
- how `generate` is called: the tool's documented defaults win where the contract fixes them (greedy unless a
  temperature is given, --max-new-tokens, --num-beams, one answer per prompt, a plain tensor back), and every other
  key of the checkpoint's generation_config.json is honoured (top_k when sampling, repetition_penalty, several
  eos_token_ids, stop_strings, a cache implementation, ...);
- which cache a call uses: the paths that continue from a cache of their own (several questions about one image,
  a chat's turns, classify's labels) hand over a dynamic cache they can cut back and reuse, whatever cache the
  checkpoint's config (or --compile) asks for; plain batches use what the checkpoint asks for (--compile: a static
  cache and the compiled forward, which the reusing paths leave for the eager one);
- what may share: prompts share their encoded beginning in greedy and sampled decoding (beam search keeps a
  cache per beam); --schema does not combine with beams (its matcher follows one sequence a row), nor several
  workers with --compile (one compiled graph) or with seeded sampling (one random generator);
- how many batches run at once (workers), and how a seed is used: each input draws from a random stream of its
  own, seeded from --seed and the input, so that a rerun, and an interrupted run finished with --resume, give the
  same records (where a batch holds several inputs, they share the stream of its first).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any

from llavanext_cli.errors import UsageError

# Keys that only sampling reads: cleared for greedy decoding, whatever the checkpoint's config says.
SAMPLING_KEYS = ("temperature", "top_p", "top_k", "min_p", "typical_p", "epsilon_cutoff", "eta_cutoff")


@dataclass(frozen=True)
class GenerationOptions:
    """The generation settings a user gives (flags, settings, or an API call)."""

    max_new_tokens: int = 256
    temperature: float = 0.0
    top_p: float = 1.0
    num_beams: int = 1
    seed: int | None = None
    stop: tuple[str, ...] = ()  # texts an answer ends before (a server's "stop"): not part of the answer

    @classmethod
    def from_settings(cls, settings: Any) -> GenerationOptions:
        return cls(max_new_tokens=settings.max_new_tokens, temperature=settings.temperature, top_p=settings.top_p,
                   num_beams=settings.num_beams, seed=settings.seed)

    @property
    def sampling(self) -> bool:
        return self.temperature > 0

    @property
    def seeded_sampling(self) -> bool:
        return self.sampling and self.seed is not None


@dataclass(frozen=True)
class ExecutionPlan:
    """One run's decisions (see the module's docstring). Built by `plan_execution`; read by the engine."""

    options: GenerationOptions
    stop_ids: tuple[int, ...]           # where an answer ends: the checkpoint's eos_token_id(s), else the tokenizer's
    pad_token_id: int | None
    plain_cache: str | None             # the cache implementation of a plain batch (None: transformers' default)
    compiled: bool                      # --compile: the language model's forward is compiled (plain batches only)
    share_prefixes: bool                # several prompts about the same images share their encoded beginning
    keep_chat_cache: bool               # a conversation keeps its key/value cache between turns
    workers: int = 1                    # batches generated at once
    tokenizer: Any = None               # for a checkpoint's stop_strings

    def generate_kwargs(self, reuses_cache: bool) -> dict[str, Any]:
        """The arguments of one `generate` call; `reuses_cache`: the call hands over a cache of its own."""
        options = self.options
        kwargs: dict[str, Any] = {
            "max_new_tokens": options.max_new_tokens, "num_beams": options.num_beams, "num_return_sequences": 1,
            "use_cache": True, "return_dict_in_generate": False, "output_scores": False, "output_logits": False,
            "eos_token_id": list(self.stop_ids), "pad_token_id": self.pad_token_id,
            "cache_implementation": None if reuses_cache else self.plain_cache,
        }
        if options.sampling:
            kwargs.update(do_sample=True, temperature=options.temperature, top_p=options.top_p)
        else:
            kwargs.update(do_sample=False, **dict.fromkeys(SAMPLING_KEYS))
        if options.stop:
            kwargs["stop_strings"] = list(options.stop)
        if self.tokenizer is not None:
            kwargs["tokenizer"] = self.tokenizer
        return kwargs

    def trimmed(self, text: str) -> str:
        """An answer without what follows a stop text (the stop text included)."""
        for stop in self.options.stop:
            where = text.find(stop)
            if where >= 0:
                text = text[:where]
        return text.strip() if self.options.stop else text

    def seed_for(self, *identity: Any) -> int | None:
        """The seed of the random stream of the input `identity` names (None unless sampling with --seed): derived
        from --seed and the input alone, so that it does not depend on what ran before it."""
        if not self.options.seeded_sampling:
            return None
        digest = hashlib.sha256(repr((self.options.seed, *identity)).encode("utf-8")).digest()
        return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def checkpoint_stop_ids(generation_config: Any, tokenizer: Any) -> tuple[int, ...]:
    """The ids an answer ends on: the checkpoint's generation config's eos_token_id (one or several), else the
    tokenizer's end-of-sequence token."""
    eos = getattr(generation_config, "eos_token_id", None)
    if eos is None:
        eos = tokenizer.eos_token_id
    ids = eos if isinstance(eos, (list, tuple)) else [eos]
    return tuple(dict.fromkeys(int(token) for token in ids if token is not None))


def check_combinations(options: GenerationOptions, *, compile: bool = False, workers: int = 1,
                       schema: Any = None, source: str = "--workers") -> None:
    """Refuse, from the settings alone (before the checkpoint is even opened), what cannot run together."""
    if schema is not None and options.num_beams > 1:
        raise UsageError("--schema cannot be combined with --num-beams (each beam would need its own matcher)",
                         hint="drop --num-beams; greedy decoding or sampling works with --schema")
    if workers > 1 and compile:
        raise UsageError(f"{source} {workers} cannot be combined with --compile (one compiled graph runs one batch "
                         "at a time)", hint="drop --workers, or raise --batch-size instead")
    if workers > 1 and options.seeded_sampling:
        raise UsageError(f"{source} {workers} with --seed and sampling: the workers would draw from one random "
                         "generator in an unpredictable order, so the seed could not reproduce the answers",
                         hint="use --workers 1 for reproducible sampling")


def plan_execution(checkpoint: Any, options: GenerationOptions, *, compile: bool = False, workers: int = 1,
                   schema: Any = None) -> ExecutionPlan:
    """Decide how a run generates on this opened checkpoint (its config, generation config and processor: no
    weights needed); a combination that cannot work is a UsageError. `workers`: the batches generated at once, as
    resolved for the run."""
    check_combinations(options, compile=compile, workers=workers, schema=schema)
    generation_config = checkpoint.generation_config
    plain_cache = getattr(generation_config, "cache_implementation", None)
    if plain_cache == "quantized":
        _check_quantized_cache_backend(generation_config)
    if compile:
        plain_cache = "static"  # fixed shapes, for the compiled forward
    tokenizer = checkpoint.processor.tokenizer
    one_sequence_a_row = options.num_beams == 1  # beam search keeps a cache per beam
    return ExecutionPlan(
        options=options,
        stop_ids=checkpoint_stop_ids(generation_config, tokenizer),
        pad_token_id=tokenizer.pad_token_id,
        plain_cache=plain_cache,
        compiled=compile,
        share_prefixes=one_sequence_a_row,
        keep_chat_cache=one_sequence_a_row,
        workers=workers,
        tokenizer=tokenizer if getattr(generation_config, "stop_strings", None) or options.stop else None,
    )


def _check_quantized_cache_backend(generation_config: Any) -> None:
    import importlib.util

    cache_config = getattr(generation_config, "cache_config", None)
    backend = cache_config.get("backend", "quanto") if isinstance(cache_config, dict) else "quanto"
    module = {"quanto": "optimum.quanto", "HQQ": "hqq"}.get(backend, backend)
    try:
        found = importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:
        found = False
    if not found:
        raise UsageError(f"the checkpoint's generation config asks for a quantized KV cache ({backend}), whose "
                         f"package is not installed", hint=f"pip install {module.split('.')[0]}, or remove "
                                                           "cache_implementation from its generation_config.json")
