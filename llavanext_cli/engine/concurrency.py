"""How many batches the model works on at once (workers), and how a CPU's cores are shared between those workers
and the thread that prepares the next inputs.

On a CPU, a small or medium model does not keep many cores busy with one sequence (each step is a chain of
modest matrix products), so two batches generated side by side, each on its share of the cores, finish sooner
than the same two one after the other on all of them. On a GPU the device runs one batch at a time anyway: more
work at once means a larger --batch-size, not more workers.
"""

from __future__ import annotations

import os

from llavanext_cli.errors import UsageError

AUTO = 0
CPU_AUTO_WORKERS = 2


def cpu_cores() -> int:
    """The cores this process may run on (its affinity mask, which containers and taskset narrow)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def threads_per_worker(workers: int, cores: int) -> int:
    """One core is left to the input pipeline (decoding, resizing, tokenizing the next images); the rest are
    split between the workers."""
    if cores <= 1:
        return 1
    return max(1, (cores - 1) // max(workers, 1))


def thread_count_chosen_by_user() -> bool:
    return bool(os.environ.get("OMP_NUM_THREADS") or os.environ.get("MKL_NUM_THREADS"))


def use_cpu_cores(workers: int) -> None:
    """Give torch each worker's share of the cores, unless the user chose a thread count with OMP_NUM_THREADS /
    MKL_NUM_THREADS (a thread count is a numerics knob too: sums over other splits differ in the last bits)."""
    if thread_count_chosen_by_user():
        return
    import torch

    wanted = threads_per_worker(workers, cpu_cores())
    if torch.get_num_threads() != wanted:
        torch.set_num_threads(wanted)


def resolve_workers(requested: int, device: str, jobs: int, sampling_with_seed: bool, compile: bool,
                    data_parallel: bool) -> int:
    """The number of workers for a run: what the user asked for (more than one on a CPU only: concurrent
    generate() calls on one GPU model are not a use transformers supports), or (AUTO) two on a CPU with at
    least two cores and one elsewhere, and never more than there are jobs."""
    if requested > 1 and device != "cpu":
        raise UsageError(f"--workers {requested} applies to runs on a CPU, and this run is on {device}",
                         hint="drop --workers; on a GPU, raise --batch-size instead")
    if requested == AUTO:
        on_cpu = device == "cpu"
        if not on_cpu or sampling_with_seed or compile or data_parallel or cpu_cores() < 2:
            requested = 1
        else:
            requested = CPU_AUTO_WORKERS
    return max(1, min(requested, jobs))
