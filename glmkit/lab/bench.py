"""`glmkit bench`: decode and prefill speed of a GLM against the memory-bandwidth floor, on random weights.

Decoding one token reads every weight once, so the floor of a decode step is weight bytes ÷ memory
bandwidth. `run_bench` builds a model of any GLMConfig with random weights directly on the device (a
meta-device model, then one tensor at a time, so the host never holds it), optionally tensor-parallel
over `tp` processes, measures the device's copy bandwidth, and times:
  - the real generation path: `glmkit.generate.tokens.Generator` (what GLMPipeline and the engines decode
    with), per generated token;
  - the fixed-shape decode step alone: CUDA-graph replays, and the same step launched eagerly, so the
    Python overhead of the generation loop and the launch overhead are both visible;
  - prefill of a prompt;
  - optionally SAT's own GLM130B (`against="sat"`), patched, on the very same weight tensors, decoding
    in filling_sequence's shape (glmkit.lab.sat_reference).
What to measure is a BenchOptions (glmkit.lab.bench_options). It returns one JSON-ready dict; RESULT_KEYS and
BATCH_KEYS document every key. GPU numbers come from CUDA events or synchronised host clocks, after warm-up, as
medians over repeats. On CPU the same code runs (tiny configs, for tests): graphs are off, the bandwidth is a
host memcpy and memory comes from the OS.
"""
from __future__ import annotations

import dataclasses
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from ..config import DTYPES, GLMConfig
from ..generate.graphs import DecodeStep
from ..generate.budget import kv_cache_bytes
from ..generate.tokens import Generator, prefill_inputs
from ..model import GLM
from .random_model import build_random_model, random_contexts, weight_bytes
from ..generate.sampling import GenerationSettings
from .timing import Clock, collective_step_ms, free_cached, measure_bandwidth, memory_info, peak_bytes, reset_peak
# What to measure lives in bench_options; its names stay importable from here (cli, notebooks, tests).
from .bench_options import BenchOptions, check_can_run, default_device, resolve_config  # noqa: F401

# Every top-level key of the result, with its meaning (tests check that all are present).
RESULT_KEYS = {
    "config_name": "preset or YAML the architecture came from",
    "config": "the GLMConfig measured (num_layers after any --layers override)",
    "dtype": "fp16, bf16 or fp32: weights and activations",
    "quantization": "null, int8 or int4 (weight-only)",
    "tp": "tensor-parallel processes (one GPU each)",
    "device": "the device's name (rank 0), or 'cpu'",
    "torch": "torch version",
    "prompt_tokens": "prompt length of each sequence (prefill)",
    "new_tokens": "tokens generated per sequence in each timed run",
    "repeats": "timed repetitions behind each median",
    "parameters_per_gpu": "parameters held by one rank",
    "weight_bytes_per_gpu": "bytes of those parameters: what one decode step must read at least",
    "build_seconds": "time to materialise the random model on the device",
    "copy_bytes": "size of the buffer copied to measure bandwidth",
    "copy_bandwidth_gbs": "device-to-device copy, (bytes read + bytes written) / time, 1e9 B/s",
    "copy_read_only_equivalent_gbs": "the same copy counting bytes read only (half of the above)",
    "read_bandwidth_gbs": "a read-only pass (sum reduction) over the same buffer, bytes read / time",
    "bandwidth_floor_ms": "weight_bytes_per_gpu / copy_bandwidth_gbs: no decode step can be faster",
    "prefill_ms": "batch-1 prefill of prompt_tokens tokens (model forward filling the KV cache)",
    "ms_per_token": "batch-1 decode, real generation path (glmkit.generate.tokens.Generator), ms per token",
    "step_ms": "batch-1 decode step alone: CUDA-graph replay (eager on CPU), ms",
    "floor_fraction": "bandwidth_floor_ms / ms_per_token (1.0 = at the floor)",
    "floor_fraction_step": "bandwidth_floor_ms / step_ms",
    "batches": "one record per batch size (BATCH_KEYS)",
    "batch_throughput_ratio": "tokens/s at the largest batch ÷ tokens/s at batch 1 (generation path)",
    "batch_throughput_ratio_batch": "the largest batch size measured",
    "peak_gpu_bytes": "peak allocated device memory of glmkit's part of the run (rank 0; null on CPU)",
    "peak_gpu_bytes_per_rank": "the same for every rank",
    "device_memory_bytes": "total memory of the device (host RAM on CPU)",
    "kv_cache_bytes_per_token": "KV cache bytes per token of context per rank (all layers, keys and values)",
    "max_context_tokens": "longest batch-1 context whose KV cache fits the memory left after the weights and "
                          "the measured decode workspace (not capped by max_sequence_length)",
    "max_context_tokens_with_prefill": "the same, also leaving room for a one-shot prefill of that length "
                                       "(attention scores and MLP activations, estimated)",
    "context_check": "with verify_context: the context length actually prefilled and decoded, and whether it "
                     "fit; else null",
    "logits_finite": "the batch-1 prefill logits are all finite (random weights did not overflow)",
    "prefill_top_logits": "the 16 largest logits of the batch-1 prefill's last position, [token, value]: the "
                          "random weights do not depend on tp, so runs at different TP sizes must agree",
    "sat": "with against='sat': SAT GLM130B's numbers on the same weights (SAT_KEYS); else null",
    "speedup_vs_sat": "SAT ms_per_token ÷ glmkit ms_per_token at batch 1; null without SAT",
    "all_reduce": "tp > 1: 'symmetric' (one-shot peer reads through torch symmetric memory for decode-sized "
                  "activations) or 'nccl'; null at tp 1",
    "kernel_configs": "the tuned INT8/INT4 kernel config file given, or null (the shipped one)",
    "seconds": "wall time of the whole run",
}
BATCH_KEYS = {
    "batch": "sequences decoded together",
    "ms_per_token": "ms per decode step of the whole batch, real generation path (median over steps and runs)",
    "step_ms": "the fixed-shape decode step alone: graph replay on GPU, eager on CPU",
    "eager_step_ms": "the same step launched op by op (no graph)",
    "python_overhead_ms": "ms_per_token - step_ms: sampling, host loop and input copies",
    "tokens_per_s": "batch * 1000 / ms_per_token",
    "throughput_vs_batch1": "tokens_per_s ÷ tokens_per_s at batch 1",
    "floor_fraction": "bandwidth_floor_ms / ms_per_token",
    "prefill_ms": "prefill of batch x prompt_tokens tokens",
    "kv_cache_bytes": "bytes of this batch's KV cache (fixed shape, cache length rounded up)",
    "floor_with_kv_ms": "(weight bytes + the KV cache a decode step reads: every row's filled context) / copy "
                        "bandwidth: the floor at long contexts, where reading the cache is no longer negligible",
    "floor_fraction_with_kv": "floor_with_kv_ms / ms_per_token",
    "prefill_tokens_per_s": "batch x prompt_tokens / prefill_ms",
    "prefill_tflops": "model FLOP/s of the prefill, 1e12: 2 x linear weights per token plus attention's "
                      "4 x s x t x hidden per layer (GLM's context attends both ways: no causal saving)",
    "cache_length": "positions in that cache",
    "peak_gpu_bytes": "peak allocated device memory while measuring this batch (null on CPU)",
    "collective_ms": "tp > 1: the step's collectives alone (2 all-reduces a layer, the embedding's, the logits "
                     "all-gather), replayed as a CUDA graph; null at tp 1",
    "collective_share": "collective_ms / step_ms: the all-reduce share of a decode step (null at tp 1)",
    "greedy_tokens": "the tokens greedy decoding gave the batch's first prompt (compare runs across TP sizes: "
                     "the random weights do not depend on it)",
}
SAT_KEYS = {
    "ms_per_token": "batch-1 decode in filling_sequence's shape, host clock per token (median)",
    "forward_ms": "batch-1 model call alone per decode step (CUDA events, median)",
    "prefill_ms": "batch-1 prompt forward up to the first token on the host",
    "batches": "per batch: batch, ms_per_token, forward_ms, prefill_ms, tokens_per_s",
    "prefill_max_abs_diff": "max |logits_SAT - logits_glmkit| of the batch-1 prefill: same weights, same model",
    "peak_gpu_bytes": "peak allocated device memory of SAT's part of the run (rank 0)",
}


# ----------------------------------------------------------------------------- measurements

def _generation_intervals(generator: Generator, contexts, new_tokens: int) -> tuple[list[float], list[int]]:
    """(ms between consecutive generated tokens, row 0's greedy tokens) of the real generation path."""
    stamps, tokens = [], []

    def on_token(index, token, record):
        if index == 0:  # called after the step's tokens reached the host (`.tolist()` synchronises)
            stamps.append(time.perf_counter())
            tokens.append(int(token))

    settings = GenerationSettings(max_new_tokens=new_tokens)
    generator.generate(contexts, settings, end_tokens=(), on_token=on_token)
    if len(stamps) != new_tokens:
        raise RuntimeError(f"generation produced {len(stamps)} tokens, expected {new_tokens}")
    return [(b - a) * 1e3 for a, b in zip(stamps, stamps[1:])], tokens


@torch.no_grad()
def measure_batch(generator: Generator, batch: int, options: BenchOptions, clock: Clock) -> dict:
    """Decode (generation path, graph replay, eager step) and prefill timings at one batch size."""
    device, model, steps = clock.device, generator.model, generator.steps
    steps.clear()
    free_cached(device)
    reset_peak(device)
    contexts = random_contexts(model.config, batch, options.prompt_tokens, options.seed + batch)
    step = steps.step_for(batch, options.prompt_tokens + options.new_tokens)  # the one generation will use
    _, tokens = _generation_intervals(generator, contexts, options.new_tokens)  # warm-up (and graph capture)
    intervals = []
    for _ in range(options.repeats):
        intervals += _generation_intervals(generator, contexts, options.new_tokens)[0]
    ms_per_token = statistics.median(intervals)

    prefill = statistics.median(clock.time_ms(lambda: generator.prefill(contexts, options.new_tokens),
                                              options.repeats))

    # The step's input buffers still hold the last generated token: replay it as is. On a GPU, blocks of
    # new_tokens steps, so a block lasts long enough for event timing. On the CPU each step is timed alone
    # and the median taken, the statistic ms_per_token uses: a block's mean counts every stall of a shared
    # CPU, which the median of intervals drops, and made python_overhead_ms negative (-76 ms was seen).
    block = options.new_tokens if clock.cuda else 1
    runs = options.repeats if clock.cuda else options.repeats * options.new_tokens

    def replay():
        for _ in range(block):
            step.graph.replay()

    @torch.inference_mode()  # as generation runs the step (DecodeStep.__call__); no_grad costs more per op
    def eager():
        for _ in range(block):
            step.run_eager()

    eager_ms = statistics.median(clock.time_ms(eager, runs)) / block
    step_ms = statistics.median(clock.time_ms(replay, runs)) / block if step.graph else eager_ms
    cache = step.cache
    return {"batch": batch, "ms_per_token": ms_per_token, "step_ms": step_ms, "eager_step_ms": eager_ms,
            "python_overhead_ms": ms_per_token - step_ms, "tokens_per_s": batch * 1e3 / ms_per_token,
            "prefill_ms": prefill,
            "kv_cache_bytes": (cache.keys.numel() + cache.values.numel()) * cache.keys.element_size(),
            "cache_length": cache.max_length, "peak_gpu_bytes": peak_bytes(device), "greedy_tokens": tokens}


def prefill_flops(model: GLM, batch: int, length: int) -> float:
    """Model FLOPs of one prefill on this rank: linear layers 2 x weights per token, attention 4 x s x s x h."""
    config = model.config
    h, f = config.hidden_size, config.inner_hidden_size
    tp = h // (model.transformer.layers[0].attention.local_heads * config.head_dim)
    # Per layer: query_key_value 3h x h, dense h x h, dense_h_to_4h 2f x h, dense_4h_to_h h x f; 1/tp of each.
    linear_weights = (4 * h * h + 3 * f * h) // tp
    attention = 4 * batch * length * length * h // tp  # q k^T and probabilities x v, 2 FLOPs a product each
    return float(config.num_layers * (2 * linear_weights * batch * length + attention))


def prefill_workspace_bytes(config: GLMConfig, world_size: int, length: int, element: int) -> int:
    """Estimated temporaries of a one-shot batch-1 prefill of `length` tokens on one rank, in bytes."""
    # glmkit's attention holds (local heads, L, L) scores in the model dtype, a masked copy, and fp32
    # copies for the softmax and its output: about (2 * element + 8) bytes per score. The MLP holds
    # (L, 2 * inner / tp) activations about twice.
    heads, inner = config.num_attention_heads // world_size, config.inner_hidden_size // world_size
    return heads * length * length * (2 * element + 8) + 2 * length * 2 * inner * element


def context_limits(config: GLMConfig, world_size: int, memory_free: int, workspace: int, kv_per_token: int,
                   element: int) -> tuple[int, int]:
    """Longest batch-1 context (tokens) whose KV cache fits, alone and with room for its one-shot prefill."""
    budget = memory_free - workspace
    decode = max(0, budget // kv_per_token)
    low, high = 0, decode
    while low < high:  # the largest L with kv(L) + prefill(L) <= budget
        mid = (low + high + 1) // 2
        if mid * kv_per_token + prefill_workspace_bytes(config, world_size, mid, element) <= budget:
            low = mid
        else:
            high = mid - 1
    return decode, low


@torch.no_grad()
def check_context(model: GLM, length: int, clock: Clock, seed: int) -> dict:
    """Prefill length-1 random tokens into a cache of `length` and decode one step: does it fit?"""
    device = clock.device
    reset_peak(device)
    try:
        # Eager, not captured: an out-of-memory inside a graph capture surfaces as a capture error. A
        # batch-1 graph's private pool holds only one step's temporaries, a few MB at GLM-130B's shape.
        step = DecodeStep(model, 1, length, use_graphs=False)
        contexts = random_contexts(model.config, 1, length - 1, seed)
        ids, positions, allowed, _ = prefill_inputs(contexts, device)
        model(ids, positions, allowed, step.cache, torch.arange(length - 1, device=device), last_only=True)
        step(ids[:, -1:], positions[:, -1:] + 1, length - 1, torch.zeros(1, dtype=torch.long))
        clock.sync()
        result = {"tokens": length, "fits": True, "peak_gpu_bytes": peak_bytes(device)}
    except torch.cuda.OutOfMemoryError as error:
        result = {"tokens": length, "fits": False, "error": str(error).splitlines()[0]}
    step = None
    free_cached(device)
    return result


def _log(rank: int, message: str) -> None:
    if rank == 0:
        print(f"[bench] {message}", file=sys.stderr, flush=True)


def _gather(value, world_size: int) -> list:
    if world_size == 1:
        return [value]
    import torch.distributed as dist
    values = [None] * world_size
    dist.all_gather_object(values, value)
    return values


def bench_process(options: BenchOptions, rank: int = 0, world_size: int = 1, group=None) -> dict:
    """The measurements of one process (rank); rank 0's result is the run's result."""
    started = time.perf_counter()
    device = torch.device(options.device)
    if device.type == "cuda" and (world_size > 1 or device.index is None):
        # Each rank takes the GPU of its rank; a bare "cuda" means GPU 0 (set_device needs an index).
        device = torch.device("cuda", rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    clock = Clock(device)
    if options.kernel_configs is not None:
        from ..kernels.quant import load_tuned_configs
        load_tuned_configs(options.kernel_configs)  # in every rank's process
    copy_bytes = options.copy_bytes or (2**30 if clock.cuda else 64 * 2**20)
    _log(rank, f"bandwidth: copying {copy_bytes / 2**20:.0f} MiB")
    bandwidth = measure_bandwidth(device, copy_bytes)

    _log(rank, f"building {options.config.num_layers} layers, {options.dtype}, quantization "
               f"{options.quantization}, tp {world_size}")
    reset_peak(device)
    mark = time.perf_counter()
    model = build_random_model(options.config, DTYPES[options.dtype], device, quantization=options.quantization,
                               rank=rank, world_size=world_size, group=group, seed=options.seed,
                               symmetric_all_reduce=options.all_reduce == "auto")
    clock.sync()
    build_seconds = time.perf_counter() - mark
    build_peak = peak_bytes(device)
    weights_allocated = torch.cuda.memory_allocated(device) if clock.cuda else None
    weights = weight_bytes(model)
    floor_ms = weights / (bandwidth["copy_bandwidth_gbs"] * 1e6)

    generator = Generator(model, use_graphs=clock.cuda)
    records = []
    with torch.no_grad():
        contexts = random_contexts(model.config, 1, options.prompt_tokens, options.seed + 1)
        logits = model(*prefill_inputs(contexts, device)[:3], last_only=True)[0, -1].float()
        finite = bool(torch.isfinite(logits).all())
        values, tokens = logits.topk(16)
        top_logits = [[token, value] for token, value in zip(tokens.tolist(), values.tolist())]
        del logits
    for batch in options.batches:
        _log(rank, f"batch {batch}: generation path, graph replay, eager step, prefill")
        record = measure_batch(generator, batch, options, clock)
        record["collective_ms"] = record["collective_share"] = None
        if world_size > 1:
            record["collective_ms"] = collective_step_ms(options.config, batch, world_size, model.all_reduce,
                                                         DTYPES[options.dtype], clock, options.repeats)
            record["collective_share"] = record["collective_ms"] / record["step_ms"]
        records.append(record)
    base = next((r for r in records if r["batch"] == 1), None)
    per_token_kv = kv_cache_bytes(model, 1, 1)
    for record in records:
        record["throughput_vs_batch1"] = record["tokens_per_s"] / base["tokens_per_s"] if base else None
        record["floor_fraction"] = floor_ms / record["ms_per_token"]
        # A step reads each row's context once: prompt plus, on average, half the generated tokens.
        context = options.prompt_tokens + options.new_tokens / 2
        kv_read = record["batch"] * context * per_token_kv
        record["floor_with_kv_ms"] = floor_ms + kv_read / (bandwidth["copy_bandwidth_gbs"] * 1e6)
        record["floor_fraction_with_kv"] = record["floor_with_kv_ms"] / record["ms_per_token"]
        tokens = record["batch"] * options.prompt_tokens
        record["prefill_tokens_per_s"] = tokens * 1e3 / record["prefill_ms"]
        record["prefill_tflops"] = prefill_flops(model, record["batch"], options.prompt_tokens) / record["prefill_ms"] / 1e9

    # Memory left for context at batch 1, after the weights and a batch-1 decode's workspace.
    generator.steps.clear()
    free_cached(device)
    element = model.transformer.word_embeddings.weight.element_size()  # the activation (and cache) dtype
    kv_per_token = kv_cache_bytes(model, 1, 1)
    memory = memory_info(device)
    workspace = 0
    if base is not None and clock.cuda:
        workspace = max(0, base["peak_gpu_bytes"] - weights_allocated - base["kv_cache_bytes"])
    max_context, max_context_prefill = context_limits(options.config, world_size, memory["free"], workspace,
                                                      kv_per_token, element)
    context = None
    if options.verify_context:
        length = max(2, min(max_context_prefill, options.config.max_sequence_length))
        _log(rank, f"checking a batch-1 context of {length} tokens")
        context = check_context(model, length, clock, options.seed)
    peak = max([p for p in [build_peak] + [r["peak_gpu_bytes"] for r in records] if p is not None], default=None)

    sat_result = None
    if options.against == "sat":
        from .sat_reference import time_sat_decode

        _log(rank, "SAT GLM130B on the same weights")
        free_cached(device)
        reset_peak(device)
        # Batch b's prompts are the ones glmkit decoded at batch b (same seeds).
        prompts = {b: random_contexts(model.config, b, options.prompt_tokens, options.seed + b)
                   for b in options.batches}
        sat_result = time_sat_decode(model, prompts, options.new_tokens, options.repeats, device, world_size)
        sat_result["peak_gpu_bytes"] = peak_bytes(device)
        free_cached(device)
    peaks = _gather(peak, world_size)
    largest = max(records, key=lambda r: r["batch"])
    result = {
        "config_name": options.config_name, "config": dataclasses.asdict(options.config),
        "dtype": options.dtype, "quantization": options.quantization, "tp": world_size,
        "device": torch.cuda.get_device_name(device) if clock.cuda else "cpu", "torch": torch.__version__,
        "prompt_tokens": options.prompt_tokens, "new_tokens": options.new_tokens, "repeats": options.repeats,
        "parameters_per_gpu": sum(p.numel() for p in model.parameters()),
        "weight_bytes_per_gpu": weights, "build_seconds": build_seconds, **bandwidth,
        "bandwidth_floor_ms": floor_ms,
        "prefill_ms": base["prefill_ms"] if base else None,
        "ms_per_token": base["ms_per_token"] if base else None,
        "step_ms": base["step_ms"] if base else None,
        "floor_fraction": floor_ms / base["ms_per_token"] if base else None,
        "floor_fraction_step": floor_ms / base["step_ms"] if base else None,
        "batches": records,
        "batch_throughput_ratio": largest["throughput_vs_batch1"],
        "batch_throughput_ratio_batch": largest["batch"],
        "peak_gpu_bytes": peak, "peak_gpu_bytes_per_rank": peaks,
        "device_memory_bytes": memory["total"],
        "kv_cache_bytes_per_token": kv_per_token,
        "max_context_tokens": max_context, "max_context_tokens_with_prefill": max_context_prefill,
        "context_check": context, "logits_finite": finite, "prefill_top_logits": top_logits,
        "sat": sat_result,
        "speedup_vs_sat": (sat_result["ms_per_token"] / base["ms_per_token"]
                           if sat_result and base and sat_result["ms_per_token"] else None),
        "kernel_configs": options.kernel_configs,
        "all_reduce": ("symmetric" if getattr(model, "all_reduce", None) and model.all_reduce.symmetric
                       else "nccl") if world_size > 1 else None,
        "seconds": time.perf_counter() - started,
    }
    return result


def _rank_main(rank: int, options: BenchOptions, port: int, result_path: str) -> None:
    from ..parallel.comm import init_process_groups

    sys.stdout = sys.stderr  # the parent prints the JSON; nothing else may reach stdout
    device = torch.device(options.device)
    if device.type == "cuda":
        device = torch.device("cuda", rank)
        torch.cuda.set_device(device)
    groups = init_process_groups(rank, options.tp, device, "127.0.0.1", port)
    try:
        result = bench_process(options, rank, options.tp, groups.data)
        if rank == 0:
            Path(result_path).write_text(json.dumps(result))
        torch.distributed.barrier(group=groups.control)
    finally:
        if options.against == "sat":
            from sat import mpu
            mpu.destroy_model_parallel()
        groups.close()


def run_bench(options: BenchOptions) -> dict:
    """Measure `options` (in `tp` processes when tp > 1) and return the result dict (RESULT_KEYS)."""
    check_can_run(options)
    if options.tp == 1:
        return bench_process(options)
    import torch.multiprocessing as mp

    from ..parallel.comm import free_port
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "result.json"
        mp.spawn(_rank_main, args=(options, free_port(), str(path)), nprocs=options.tp, join=True)
        return json.loads(path.read_text())
