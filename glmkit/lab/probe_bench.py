"""`glmkit bench --probe`: what a probe call costs through GLMCluster and GLMPipeline, on random weights.

On a random GLM of any shape (e.g. GLM-130B's with 12 layers) installed on N resident engines by a request
(glmkit.lab.engine_bench.RandomWeightsRequest) and then in an in-process GLMPipeline, it times two calls from
here: the logit lens over a prompt of `prompt_tokens` tokens at every layer and position, and a patching sweep
over every layer x the last `patch_positions` positions (clean and corrupted prompts of the same length).
Each call's wall time is a median over repeats after a warm-up; what it ships is the pickled size of its
result (what travels from rank 0 to the notebook), and what the ranks exchange is the result's
`collective_bytes`, both of which stay small whatever the vocabulary.
"""
from __future__ import annotations

import dataclasses
import pickle
import statistics
import time
from pathlib import Path

import pandas as pd
import torch

from ..config import DTYPES, GLMConfig, KitConfig
from ..generate.pipeline import GLMPipeline
from ..tokenizer import GLMTokenizer
from .engine_bench import RandomWeightsRequest, _prompt
from .random_model import build_random_model

PROBE_KEYS = {
    "config": "the GLMConfig measured", "dtype": "weights and activations", "quantization": "null, int8 or int4",
    "engines": "engines of the cluster",
    "device": "rank 0's device name", "prompt_tokens": "tokens of the prompt as GLM sees it (with [gMASK], sop)",
    "lens_cells": "layers x positions the lens covers", "top_k": "tokens per lens cell",
    "patch_runs": "patched runs of the sweep (layers x patch_positions)", "repeats": "timed calls per median",
    "cluster": "GLMCluster with `engines` engines: CALL_KEYS per call (lens, patch)",
    "pipeline": "GLMPipeline in this process at TP 1 (null when skipped): CALL_KEYS per call (lens, patch)",
    "seconds": "wall time of the whole run",
}
CALL_KEYS = {"wall_s": "median wall seconds of the call", "result_bytes": "pickled size of the result shipped",
             "collective_bytes": "bytes each rank's probe collectives sent, the model's own all-reduces aside "
             "(0 in one process)"}


def corrupted_prompt(tokenizer: GLMTokenizer, prompt: str) -> str:
    """`prompt` with its last word replaced by another word of the same token count."""
    head, _, last = prompt.rpartition(" ")
    length = len(tokenizer.encode(prompt))
    for i in range(1000):
        candidate = f"{head} other{i}" if head else f"other{i}"
        if candidate != prompt and len(tokenizer.encode(candidate)) == length:
            return candidate
    raise RuntimeError(f"found no word to replace {last!r} with at the same token count")


def time_call(call, repeats: int) -> dict:
    """Median wall seconds of `call()` after a warm-up, its result's pickled size and collective bytes."""
    result = call()
    walls = []
    for _ in range(repeats):
        started = time.perf_counter()
        result = call()
        walls.append(time.perf_counter() - started)
    # A patching sweep is a DataFrame, whose attrs carry what a LogitLens holds as an attribute.
    exchanged = result.attrs["collective_bytes"] if isinstance(result, pd.DataFrame) else result.collective_bytes
    return {"wall_s": statistics.median(walls), "result_bytes": len(pickle.dumps(result)),
            "collective_bytes": exchanged}


def probe_calls(backend, prompt: str, corrupted: str, top_k: int, patch_positions: int, repeats: int) -> dict:
    """Time the lens (all layers and positions) and the patching sweep on one backend."""
    lens = backend.logit_lens(prompt, top_k=top_k)  # also names the target: the model's own next token
    last = lens.top[(lens.top["layer"] == lens.layers[-1]) & (lens.top["rank"] == 1)]
    target = int(last["token_id"].iloc[-1])
    positions = list(range(-patch_positions, 0))
    return {"lens": time_call(lambda: backend.logit_lens(prompt, top_k=top_k), repeats),
            "patch": time_call(lambda: backend.patch(prompt, corrupted, target, positions=positions), repeats)}


def run_probe_bench(config: GLMConfig, *, engines: int, dtype: str = "fp16", device: str = "cuda",
                    quantization: str | None = None, tokenizer: Path | None = None, prompt_tokens: int = 128,
                    patch_positions: int = 32,
                    top_k: int = 10, repeats: int = 3, seed: int = 0, pipeline: bool = True) -> dict:
    """Time the logit lens and a patching sweep through GLMCluster (and GLMPipeline) on the same random weights."""
    from ..serve.cluster import GLMCluster

    started = time.perf_counter()
    tok = GLMTokenizer.load(tokenizer)
    prompt = _prompt(tok, prompt_tokens)
    corrupted = corrupted_prompt(tok, prompt)
    length = len(tok.encode(prompt)) + 2  # [gMASK] and sop
    if not 1 <= patch_positions <= length:
        raise ValueError(f"patch_positions must be in [1, {length}] (the prompt's tokens), got {patch_positions}")
    kit = KitConfig(name="random", model=config, tokenizer=tokenizer, dtype=dtype, device=device,
                    quantization=quantization)
    request = RandomWeightsRequest(config, dtype, tokenizer, quantization, seed, copy_bytes=2**20)
    cluster = GLMCluster(config=kit, n=engines)
    try:
        cluster.load(kit, weights=request)
        name = cluster.load_results[0]["device"]
        through_cluster = probe_calls(cluster, prompt, corrupted, top_k, patch_positions, repeats)
    finally:
        cluster.close()
    in_process = None
    if pipeline:
        target = torch.device("cuda", 0) if device.startswith("cuda") else torch.device("cpu")
        model = build_random_model(config, DTYPES[dtype], target, quantization=quantization, seed=seed)
        in_process = probe_calls(GLMPipeline(model, tok), prompt, corrupted, top_k, patch_positions, repeats)
        del model
    return {"config": dataclasses.asdict(config), "dtype": dtype, "quantization": quantization, "engines": engines,
            "device": name,
            "prompt_tokens": length, "lens_cells": config.num_layers * length, "top_k": top_k,
            "patch_runs": config.num_layers * patch_positions, "repeats": repeats, "cluster": through_cluster,
            "pipeline": in_process, "seconds": time.perf_counter() - started}
