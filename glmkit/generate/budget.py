"""What one request may allocate: its KV cache must fit the memory of the device the model is on.

A cache is preallocated for every row (prompt, or beam) at its full length, so `num_beams=10**6` asks for
a cache of hundreds of gigabytes at once; refusing it up front, with the limit, beats an out-of-memory
error (or, on the CPU, swapping the machine to a halt) after the prefill.
"""
from __future__ import annotations

import psutil
import torch

from ..model import GLM

# On a GPU the cache may take most of the free memory (the activations of a step are small next to it);
# on the CPU the machine and other processes need RAM too, so a request gets at most half of what is free.
CUDA_FRACTION = 0.9
CPU_FRACTION = 0.5


def kv_cache_bytes(model: GLM, rows: int, length: int) -> int:
    """Bytes of keys and values for `rows` sequences of `length` positions on this model (or shard)."""
    weight = model.transformer.word_embeddings.weight  # the activation dtype (linear weights may be int8)
    heads = model.transformer.layers[0].attention.local_heads
    per_position = len(model.transformer.layers) * 2 * heads * model.config.head_dim * weight.element_size()
    return rows * length * per_position


def cache_budget_bytes(device: torch.device) -> tuple[int, str]:
    """How many bytes a request's cache may take on `device`, and a phrase saying where that comes from."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        # Blocks the caching allocator holds but does not use are free for this process too.
        cached = torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
        return int(CUDA_FRACTION * (free + cached)), f"{CUDA_FRACTION:.0%} of the free memory of {device}"
    available = psutil.virtual_memory().available
    return int(CPU_FRACTION * available), f"{CPU_FRACTION:.0%} of the available RAM"


def check_kv_cache_fits(model: GLM, rows: int, length: int, what: str) -> None:
    """ValueError, before anything is allocated, when `rows` x `length` cache positions do not fit."""
    needed = kv_cache_bytes(model, rows, length)
    device = model.transformer.word_embeddings.weight.device
    budget, source = cache_budget_bytes(device)
    if needed <= budget:
        return
    fitting_rows = budget // max(1, kv_cache_bytes(model, 1, length))
    raise ValueError(f"{what} needs a KV cache of {needed / 2**30:.1f} GiB ({rows} rows x {length} positions) "
                     f"but a request may use at most {budget / 2**30:.1f} GiB ({source}): at most "
                     f"{fitting_rows} rows fit at this length; lower num_beams, the number of prompts or "
                     f"max_new_tokens")
