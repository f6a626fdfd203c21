"""What a checkpoint needs in memory, and what the machine has: the weights' size at each dtype and quantization
from the config alone (an empty-weights model, no download), and the check that refuses, before a weight is read,
weights that cannot fit in the free memory of the device(s) they are planned for."""

from __future__ import annotations

from typing import Any

from llavanext_cli.errors import SetupError
from llavanext_cli.model.loading import UNQUANTIZED_MODULES

BYTES_PER_PARAMETER = {"float32": 4, "float16": 2, "bfloat16": 2}


def count_parameters(config: Any) -> dict[str, int]:
    """Parameter counts of an empty-weights model built from the config: total, and the Linear weights that
    --quant would quantize."""
    import torch
    from accelerate import init_empty_weights
    from transformers import AutoModelForImageTextToText

    with init_empty_weights():
        model = AutoModelForImageTextToText.from_config(config)
    total = sum(p.numel() for p in model.parameters())
    quantizable = 0
    rows = 0
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and not name.startswith(UNQUANTIZED_MODULES):
            quantizable += module.weight.numel()
            rows += module.weight.shape[0]
    return {"total": total, "quantizable": quantizable, "quantizable_rows": rows}


def memory_bytes(counts: dict[str, int]) -> dict[str, int]:
    """Weight memory per dtype and per quantization (the rest of the model kept in 16 bits under --quant)."""
    total, quantizable = counts["total"], counts["quantizable"]
    kept = (total - quantizable) * 2
    memory = {dtype: total * size for dtype, size in BYTES_PER_PARAMETER.items()}
    # LLM.int8: one byte a weight plus one float32 scale per output row.
    memory["8bit"] = kept + quantizable + counts["quantizable_rows"] * 4
    # 4-bit NF4/FP4: half a byte a weight plus one float32 absmax per block of 64 weights.
    memory["4bit"] = kept + quantizable // 2 + (quantizable // 64) * 4
    return memory


def planned_bytes(memory: dict[str, int], dtype: str, quant: str) -> int:
    """The weights' memory as planned: at `dtype` (float32, float16, bfloat16), or quantized (4bit, 8bit)."""
    return memory[quant] if quant in ("4bit", "8bit") else memory[dtype]


def free_memory(device: str, device_map: Any, max_memory: dict[int | str, int] | None) -> tuple[int, str]:
    """The memory the planned placement can use now, and its name for a message: RAM on a CPU (and Apple's unified
    memory), a GPU's free memory, or with `device_map="auto"` the free memory of every visible GPU and the RAM it
    offloads to, each capped by --max-memory."""
    import psutil

    ram = psutil.virtual_memory().available
    if device in ("cpu", "mps"):
        return ram, "the machine's free memory" if device == "cpu" else "the free unified memory"
    import torch

    if device_map == "auto":
        limits = max_memory or {}
        total = 0
        for index in range(torch.cuda.device_count()):
            free = torch.cuda.mem_get_info(index)[0]
            total += min(free, limits.get(index, free))
        if not max_memory or "cpu" in max_memory:
            total += min(ram, limits.get("cpu", ram))
        return total, "the free memory of the GPUs (and the RAM they offload to)"
    index = int(device.split(":", 1)[1]) if ":" in device else 0
    return torch.cuda.mem_get_info(index)[0], f"GPU {index}'s free memory"


def _gib(size: int) -> str:
    return f"{size / 2**30:.1f} GiB"


def check_weights_fit(model: str, config: Any, device: str, device_map: Any, dtype: Any, quant: str,
                      max_memory: dict[int | str, int] | None) -> None:
    """SetupError (exit 3) with what to try, when the planned weights exceed the free memory they are planned for:
    before a weight is read (a 7B checkpoint in float32 on a 32 GB laptop would otherwise be killed by the kernel
    with no message)."""
    dtype_name = str(dtype).removeprefix("torch.")
    memory = memory_bytes(count_parameters(config))  # an empty-weights model built once
    needed = planned_bytes(memory, dtype_name, quant)
    available, where = free_memory(device, device_map, max_memory)
    if needed <= available:
        return
    options = [f"--quant 4bit ({_gib(memory['4bit'])})", f"--quant 8bit ({_gib(memory['8bit'])})"]
    if dtype_name == "float32":
        options.insert(0, f"--dtype bfloat16 ({_gib(memory['bfloat16'])})")
    if device != "cpu" and device_map != "auto":
        options.append("--device auto (spread it over every GPU, and the RAM)")
    options.append("--max-memory to say what each device may take")
    weights = "quantized " + quant if quant in ("4bit", "8bit") else dtype_name
    raise SetupError(f"{model} needs {_gib(needed)} for its weights in {weights}, and {where} is {_gib(available)}",
                     hint="try " + ", ".join(options) + "; --no-memory-check skips this check")
