"""Data-parallel runs under `accelerate launch` / `torchrun`: each process takes every N-th input, writes its
records to its own shard file as it goes, and the main process merges the shards into the output, in input
order, once every process is done. A run that was not launched that way is untouched by this module.

Whether a run is one of several is read from the launcher's environment (cheap, before anything loads); the
process group itself (rank, world size, the barrier) is accelerate's `PartialState`."""

from __future__ import annotations

import glob
import json
import os
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from llavanext_cli.errors import UsageError
from llavanext_cli.io.writers import AppendedLines

INDEX_KEY = "_index"  # a shard record's position among the run's inputs; removed when merged


@dataclass(frozen=True)
class DataParallel:
    """This process's place among the launcher's processes, as the launcher's environment states it."""

    rank: int
    world_size: int
    local_rank: int


def data_parallel_from_env(env: dict[str, str] | None = None) -> DataParallel | None:
    """The launcher's RANK / WORLD_SIZE / LOCAL_RANK, when there is more than one process."""
    env = dict(os.environ) if env is None else env
    try:
        world_size = int(env.get("WORLD_SIZE", "1"))
        rank = int(env.get("RANK", "0"))
        local_rank = int(env.get("LOCAL_RANK", str(rank)))
    except ValueError:
        return None
    if world_size <= 1:
        return None
    return DataParallel(rank, world_size, local_rank)


def shard_path(output: Path, rank: int) -> Path:
    return output.with_name(f"{output.name}.rank{rank}.part")


def existing_shards(output: Path) -> list[Path]:
    """Every shard file next to the output, from this run or from an interrupted one (any world size)."""
    return sorted(output.parent.glob(f"{glob.escape(output.name)}.rank*.part"))


def my_share(jobs: Sequence[Any], parallel: Any) -> list[tuple[int, Any]]:
    """This process's jobs, with their positions among the whole command's jobs: every world_size-th subject (an
    image, with all the questions about it, so that it is encoded once), counted in order of first appearance."""
    ordinals: dict[Any, int] = {}
    mine = []
    for index, job in enumerate(jobs):
        ordinal = ordinals.setdefault(job.subject, len(ordinals))
        if ordinal % parallel.world_size == parallel.rank:
            mine.append((index, job))
    return mine


class ShardSink(AppendedLines):
    """A data-parallel process's records, appended to its shard as they come (in the order of `positions`): each
    carries its input's position among the whole run's inputs, for the merge."""

    def __init__(self, path: Path, positions: Iterable[int]):
        super().__init__(path)
        self._positions = iter(positions)

    def line(self, record: Any) -> dict[str, Any]:
        return {INDEX_KEY: next(self._positions), **record.to_json()}


def read_shard_records(path: Path) -> list[dict[str, Any]]:
    """A shard's whole records (a line cut off by a crash is dropped: its input will be redone)."""
    records = []
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict):
            records.append(record)
    return records


def merge_shards(output: Path, line: Callable[[dict[str, Any]], dict[str, Any] | None] = lambda record: record
                 ) -> list[dict[str, Any]]:
    """Append every shard's records to the output in input order, each as the JSON line `line` makes of it (None:
    no line; an imagefolder writes successes only), then remove the shards. The index is the input's position in
    the whole command's inputs, so shards left by an interrupted run of the same command merge in the same order.
    Returns the records merged (without their index)."""
    shards = existing_shards(output)
    records = sorted((record for path in shards for record in read_shard_records(path)),
                     key=lambda record: record.get(INDEX_KEY, 0))
    merged = [{key: value for key, value in record.items() if key != INDEX_KEY} for record in records]
    with open(output, "a", encoding="utf-8") as handle:
        for record in merged:
            made = line(record)
            if made is not None:
                handle.write(json.dumps(made, ensure_ascii=False) + "\n")
        handle.flush()
        os.fsync(handle.fileno())
    for path in shards:
        path.unlink()
    return merged


def require_jsonl_output(output: Path | None, fmt: str) -> Path:
    if output is None or fmt != "jsonl":
        raise UsageError("a data-parallel run writes -o FILE.jsonl (each process appends to its own shard, "
                         "merged into FILE at the end)", hint="add -o out.jsonl")
    return output


class ProcessGroup:
    """The launcher's processes joined in one group (accelerate's PartialState: gloo on CPUs, nccl on GPUs), for
    the rank, the world size and waiting on each other."""

    def __init__(self) -> None:
        import torch
        from accelerate import PartialState

        # Without CUDA, PartialState must be told it is a CPU run, or it would take the launch for a single process.
        self._state = PartialState(cpu=not torch.cuda.is_available())

    @property
    def rank(self) -> int:
        return self._state.process_index

    @property
    def world_size(self) -> int:
        return self._state.num_processes

    @property
    def is_main(self) -> bool:
        return self._state.is_main_process

    def wait_for_everyone(self) -> None:
        self._state.wait_for_everyone()

    def close(self) -> None:
        self._state.destroy_process_group()
