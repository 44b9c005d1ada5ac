"""`glmkit bench --engines N`: the decode speed a user gets through GLMCluster and GLMPipeline, on random weights.

`glmkit bench` times the generation path inside one process. This mode times what a notebook call costs:
the same random weights (glmkit.lab.random_model: one model at every TP size) are installed on N resident
engines by a request (`RandomWeightsRequest`, the general engine request path) and in an in-process
GLMPipeline, and `generate()` is called on each from here with a text prompt. A call of n new tokens takes
fixed + n * per_token; two lengths give both, medians over repeats:
  per-token ms = (T(long) - T(short)) / (tokens(long) - tokens(short)),  fixed ms = T(short) - tokens * per-token.
The floor is one rank's weight bytes over its measured copy bandwidth, as in `glmkit bench`.
"""
from __future__ import annotations

import dataclasses
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import torch

from ..config import DTYPES, GLMConfig, KitConfig
from ..generate.pipeline import GLMPipeline
from ..tokenizer import GLMTokenizer
from .random_model import build_random_model, weight_bytes
from .timing import measure_bandwidth

ENGINE_KEYS = {
    "config": "the GLMConfig measured", "dtype": "weights and activations", "quantization": "null, int8 or int4",
    "engines": "engines of the cluster (tensor-parallel ranks)", "device": "rank 0's device name",
    "prompt_tokens": "tokens of the prompt as GLM sees it (with [gMASK], sop)",
    "short_tokens": "new tokens of the short call", "new_tokens": "new tokens of the long call",
    "repeats": "timed calls per length and backend", "weight_bytes_per_gpu": "one rank's parameter bytes",
    "copy_bandwidth_gbs": "rank 0's device-to-device copy bandwidth, 1e9 B/s",
    "bandwidth_floor_ms": "weight_bytes_per_gpu / copy_bandwidth_gbs: no decode step can be faster",
    "pipeline": "GLMPipeline in this process at TP 1 (null when it does not fit or is skipped): CALL_KEYS",
    "cluster": "GLMCluster with `engines` engines: CALL_KEYS",
    "cluster_streaming": "the same with an on_text callback receiving every streamed event: CALL_KEYS",
    "fixed_cost_vs_pipeline_ms": "cluster fixed_ms - pipeline fixed_ms (null without the pipeline)",
    "seconds": "wall time of the whole run",
}
CALL_KEYS = {"ms_per_token": "per-token ms from the two call lengths", "fixed_ms": "a call's cost besides its tokens",
             "floor_fraction": "bandwidth_floor_ms / ms_per_token", "call_ms": "median wall ms of each length",
             "generated": "tokens each length generated", "text": "the long call's generated text"}


@dataclass(frozen=True)
class RandomWeightsRequest:
    """Build random weights of `config` on every engine (each rank its slice) and make them the shard's model."""

    config: GLMConfig
    dtype: str
    tokenizer: Path | None
    quantization: str | None = None
    seed: int = 0
    copy_bytes: int = 2**30
    reduction: ClassVar[str] = "all"
    needs_model: ClassVar[bool] = False

    def run(self, worker, channel) -> dict:
        worker.generator = None  # free the previous model first
        bandwidth = measure_bandwidth(worker.device, self.copy_bytes)
        model = build_random_model(self.config, DTYPES[self.dtype], worker.device, quantization=self.quantization,
                                   rank=worker.rank, world_size=worker.world_size, group=worker.groups.data,
                                   seed=self.seed)
        worker.install(model, GLMTokenizer.load(self.tokenizer))
        name = torch.cuda.get_device_name(worker.device) if worker.device.type == "cuda" else "cpu"
        return {"weight_bytes": weight_bytes(model), "device": name, **bandwidth}


def _prompt(tokenizer: GLMTokenizer, tokens: int) -> str:
    """A text prompt of about `tokens` tokens as GLM sees it ([gMASK] and sop included)."""
    words = []
    while len(tokenizer.encode(" ".join(words))) < tokens - 2:
        words.append(f"word{len(words) % 97}")
    return " ".join(words)


def time_calls(backend, prompt: str, short: int, long: int, repeats: int, floor_ms: float,
               stream: bool = False) -> dict:
    """Per-token and fixed ms of `backend.generate` calls (greedy) from two call lengths."""
    events = []
    on_text = events.append if stream else None
    timings, generated, text = {}, {}, ""
    for n in (short, long):
        backend.generate(prompt, max_new_tokens=n, on_text=on_text)  # warm-up (graph capture, caches)
        walls = []
        for _ in range(repeats):
            started = time.perf_counter()
            result = backend.generate(prompt, max_new_tokens=n, on_text=on_text)
            walls.append((time.perf_counter() - started) * 1e3)
        timings[n], generated[n], text = statistics.median(walls), result.num_generated_tokens, result.completion
    if generated[long] <= generated[short]:
        raise RuntimeError(f"the long call generated {generated[long]} tokens, the short one {generated[short]}: "
                           f"the model ended early; choose another --seed")
    per_token = (timings[long] - timings[short]) / (generated[long] - generated[short])
    return {"ms_per_token": per_token, "fixed_ms": timings[short] - generated[short] * per_token,
            "floor_fraction": floor_ms / per_token, "call_ms": [timings[short], timings[long]],
            "generated": [generated[short], generated[long]], "text": text}


def run_engine_bench(config: GLMConfig, *, engines: int, dtype: str = "fp16", device: str = "cuda",
                     quantization: str | None = None, tokenizer: Path | None = None, prompt_tokens: int = 128,
                     new_tokens: int = 64, short_tokens: int = 8, repeats: int = 3, seed: int = 0,
                     copy_bytes: int | None = None, pipeline: bool = True) -> dict:
    """Time generate() through GLMCluster (and GLMPipeline at one engine's size) on the same random weights."""
    from ..serve.cluster import GLMCluster

    if not 1 <= short_tokens < new_tokens:
        raise ValueError(f"short_tokens must be at least 1 and below new_tokens ({new_tokens}), got {short_tokens}")
    started = time.perf_counter()
    cuda = device.startswith("cuda")
    copy_bytes = copy_bytes or (2**30 if cuda else 64 * 2**20)
    tok = GLMTokenizer.load(tokenizer)
    prompt = _prompt(tok, prompt_tokens)
    request = RandomWeightsRequest(config, dtype, tokenizer, quantization, seed, copy_bytes)
    kit = KitConfig(name="random", model=config, tokenizer=tokenizer, dtype=dtype, device=device,
                    quantization=quantization)
    cluster = GLMCluster(config=kit, n=engines)  # the engines' devices follow the config (one GPU each)
    try:
        cluster.load(kit, weights=request)  # starts the engines; random weights instead of a checkpoint
        ranks = cluster.load_results
        floor_ms = ranks[0]["weight_bytes"] / (ranks[0]["copy_bandwidth_gbs"] * 1e6)
        through_cluster = time_calls(cluster, prompt, short_tokens, new_tokens, repeats, floor_ms)
        streaming = time_calls(cluster, prompt, short_tokens, new_tokens, repeats, floor_ms, stream=True)
    finally:
        cluster.close()
    in_process = None
    if pipeline:
        # Same weights at TP 1, built on this process's device once the engines have let go of theirs.
        target = torch.device("cuda", 0) if cuda else torch.device("cpu")
        model = build_random_model(config, DTYPES[dtype], target, quantization=quantization, seed=seed)
        one_floor = weight_bytes(model) / (measure_bandwidth(target, copy_bytes)["copy_bandwidth_gbs"] * 1e6)
        in_process = time_calls(GLMPipeline(model, tok), prompt, short_tokens, new_tokens, repeats, one_floor)
        in_process["bandwidth_floor_ms"] = one_floor
        del model
    return {"config": dataclasses.asdict(config), "dtype": dtype, "quantization": quantization, "engines": engines,
            "device": ranks[0]["device"], "prompt_tokens": len(tok.encode(prompt)) + 2,
            "short_tokens": short_tokens, "new_tokens": new_tokens, "repeats": repeats,
            "weight_bytes_per_gpu": ranks[0]["weight_bytes"], "copy_bandwidth_gbs": ranks[0]["copy_bandwidth_gbs"],
            "bandwidth_floor_ms": floor_ms, "pipeline": in_process, "cluster": through_cluster,
            "cluster_streaming": streaming,
            "fixed_cost_vs_pipeline_ms": (through_cluster["fixed_ms"] - in_process["fixed_ms"]) if in_process else None,
            "seconds": time.perf_counter() - started}
