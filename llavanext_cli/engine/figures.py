"""A run's figures, for `-v` (as `ollama run --verbose` gives them): how long the weights took to load, how many
prompt and generated tokens went through the model and how fast, and the peak memory."""

from __future__ import annotations

import resource
import sys
from dataclasses import dataclass
from typing import Any


@dataclass
class RunFigures:
    """Summed from the records as they are written (an answer carries its prompt tokens, its new tokens and its
    share of the generation time)."""

    records: int = 0
    noun: str = "record"  # what is counted: records, or a chat's turns
    prompt_tokens: int = 0
    new_tokens: int = 0
    seconds: float = 0.0

    def add(self, record: Any) -> None:
        self.records += 1
        self.prompt_tokens += getattr(record, "prompt_tokens", 0) or 0
        self.new_tokens += getattr(record, "new_tokens", 0) or 0
        self.seconds += getattr(record, "seconds", 0.0) or 0.0

    def summary(self, load_seconds: float | None, device_type: str) -> str:
        parts = [f"{self.records} {self.noun}{'s' if self.records != 1 else ''}"]
        if load_seconds is not None:
            parts.append(f"weights loaded in {load_seconds:.2f} s")
        if self.seconds > 0 and (self.prompt_tokens or self.new_tokens):
            parts.append(f"{self.prompt_tokens:,} prompt tokens and {self.new_tokens:,} generated in {self.seconds:.2f} s "
                         f"({self.new_tokens / self.seconds:.1f} generated tokens/s, "
                         f"{(self.prompt_tokens + self.new_tokens) / self.seconds:.0f} tokens/s in all)")
        parts.append("peak memory " + peak_memory(device_type))
        return "; ".join(parts)


def peak_memory(device_type: str) -> str:
    """The process's peak resident memory, and on a CUDA device the peak it allocated there."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    peak *= 1 if sys.platform == "darwin" else 1024  # bytes on macOS, KiB on Linux
    text = f"{peak / 2**30:.2f} GiB in RAM"
    if device_type == "cuda":
        import torch

        text += f", {torch.cuda.max_memory_allocated() / 2**30:.2f} GiB on the GPU"
    return text
