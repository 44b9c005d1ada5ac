"""Device timing for benchmarks: CUDA-event clocks, copy bandwidth, and peak/free memory, CPU-safe.

On a GPU, work is timed with CUDA events after warm-up and memory comes from the caching allocator; on a
CPU (tiny configs in tests) the same calls use perf_counter, a host memcpy and the OS's free memory.
"""
from __future__ import annotations

import os
import statistics
import time

import torch


class Clock:
    """Times device work: CUDA events on a GPU, perf_counter on the CPU (which runs synchronously)."""

    def __init__(self, device: torch.device):
        self.device = device
        self.cuda = device.type == "cuda"

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize(self.device)

    def time_ms(self, fn, repeats: int, warmup: int = 1) -> list[float]:
        """Run `fn` warmup times, then time each of `repeats` runs; milliseconds per run."""
        for _ in range(warmup):
            fn()
        self.sync()
        times = []
        for _ in range(repeats):
            if self.cuda:
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                fn()
                end.record()
                end.synchronize()
                times.append(start.elapsed_time(end))
            else:
                started = time.perf_counter()
                fn()
                times.append((time.perf_counter() - started) * 1e3)
        return times


def measure_bandwidth(device: torch.device, nbytes: int, repeats: int = 20) -> dict:
    """Copy bandwidth (read + write), its read-only equivalent, and a read-only reduction, in 1e9 B/s."""
    clock = Clock(device)
    # Random values, never zeros; fp16 on a GPU, fp32 on a CPU (whose half arithmetic is emulated).
    dtype = torch.float16 if clock.cuda else torch.float32
    count = nbytes // torch.empty(0, dtype=dtype).element_size()
    src = torch.empty(count, dtype=dtype, device=device).normal_()
    dst = torch.empty_like(src)
    actual = count * src.element_size()
    copy = statistics.median(clock.time_ms(lambda: dst.copy_(src), repeats, warmup=3))
    read = statistics.median(clock.time_ms(lambda: src.sum(dtype=torch.float32), repeats, warmup=3))
    src = dst = None  # free both buffers before the model is built
    if clock.cuda:
        torch.cuda.empty_cache()
    return {"copy_bytes": actual,
            "copy_bandwidth_gbs": 2 * actual / copy / 1e6,
            "copy_read_only_equivalent_gbs": actual / copy / 1e6,
            "read_bandwidth_gbs": actual / read / 1e6}


def memory_info(device: torch.device) -> dict:
    if device.type == "cuda":
        free, total = torch.cuda.mem_get_info(device)
        cached = torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
        return {"free": free + cached, "total": total}
    try:
        import psutil
        info = psutil.virtual_memory()
        return {"free": info.available, "total": info.total}
    except ImportError:  # pragma: no cover - psutil comes with jupyter/ipyparallel
        pages, size = os.sysconf("SC_AVPHYS_PAGES"), os.sysconf("SC_PAGE_SIZE")
        return {"free": pages * size, "total": os.sysconf("SC_PHYS_PAGES") * size}


def peak_bytes(device: torch.device) -> int | None:
    return torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def free_cached(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()


def collective_step_ms(config, batch: int, world_size: int, all_reduce, dtype: torch.dtype,
                       clock: Clock, repeats: int) -> float:
    """ms of the collectives of one tensor-parallel decode step alone, replayed like the step (CUDA graph).

    A step all-reduces the (batch, 1, hidden) activations after the embedding and after both row-parallel
    linears of every layer, and all-gathers the vocab-parallel logits. Decoding runs them in series with the
    compute, so this time over the step's is their share of it. `all_reduce` is the model's own
    (glmkit.parallel.comm.AllReduce). Every rank must call this together.
    """
    import torch.distributed as dist

    device = clock.device
    activations = torch.zeros(batch, 1, config.hidden_size, dtype=dtype, device=device)
    logits = torch.zeros(batch, 1, config.vocab_size // world_size, dtype=dtype, device=device)
    pieces = [torch.empty_like(logits) for _ in range(world_size)]

    def collectives():
        for _ in range(2 * config.num_layers + 1):
            all_reduce(activations)
        dist.all_gather(pieces, logits, group=all_reduce.group)

    if not clock.cuda:
        return statistics.median(clock.time_ms(collectives, repeats))
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        collectives()  # warm-up outside the capture (NCCL sets up its channels)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        collectives()
    times = clock.time_ms(lambda: [graph.replay() for _ in range(10)], repeats)
    return statistics.median(times) / 10
