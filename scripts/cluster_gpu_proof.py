#!/usr/bin/env python3
"""GPU proof of the resident cluster: a GLM of several billion parameters, 2 engines over NCCL vs 1 GPU.

Writes a random fp16 GLM (GLM-130B's architecture, --layers/--hidden sized; default about 5.4 B parameters)
as a 2-shard SAT checkpoint, then
  1. loads it whole on one GPU in this process and generates greedily (the reference);
  2. starts a GLMCluster with one engine per GPU (2), which loads one shard per engine, and generates the
     same prompts greedily in lockstep;
and prints JSON: load seconds, prefill and per-token milliseconds, GPU memory per engine, and whether the
greedy outputs are identical. Usage on a 2-GPU machine (PYTHONPATH must reach glmkit and its deps):
    PYTHONUNBUFFERED=1 python scripts/cluster_gpu_proof.py --out $OUT/cluster_proof.json
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import tempfile
import time
from pathlib import Path

import torch

from glmkit.checkpoint import save_checkpoint
from glmkit.serve.cluster import GLMCluster
from glmkit.config import GLMConfig, KitConfig
from glmkit.model import GLM
from glmkit.generate.pipeline import GLMPipeline, load_model
from glmkit.parallel.layout import split_tensor
from glmkit.tokenizer import DEMO_TOKENIZER_DIR, GLMTokenizer

PROMPTS = ["def [MASK](self, other):\n    return self.value + other.value",
           "The standard library provides [MASK] for reading files.",
           "import os\nimport sys\n\n"]


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _peak_gb() -> float | None:
    return round(torch.cuda.max_memory_allocated() / 2**30, 2) if torch.cuda.is_available() else None


def write_random_checkpoint(config: GLMConfig, folder: Path, shards: int, seed: int) -> float:
    """Random fp16 weights (std 0.02, unit LayerNorms) written as `shards` SAT shards; returns seconds."""
    started = time.perf_counter()
    with torch.device("meta"):
        shapes = {name: tuple(p.shape) for name, p in GLM(config).named_parameters()}
    device = "cuda" if torch.cuda.is_available() else "cpu"
    generator = torch.Generator(device=device).manual_seed(seed)
    states = [{} for _ in range(shards)]
    for name, shape in shapes.items():
        if "layernorm" in name:
            full = torch.ones(shape, dtype=torch.float16) if name.endswith("weight") else torch.zeros(shape, dtype=torch.float16)
        elif name.endswith("bias"):
            full = torch.zeros(shape, dtype=torch.float16)
        else:
            full = (torch.randn(shape, generator=generator, device=device, dtype=torch.float32) * 0.02).half().cpu()
        for rank in range(shards):
            states[rank][name] = split_tensor(name, full, rank, shards).clone()
    save_checkpoint(folder, states, iteration=1, model_config=dataclasses.asdict(config))
    return time.perf_counter() - started


def timed_generation(generate, tokens: int) -> dict:
    """Prefill (1 new token) and decode (tokens new tokens) timings of a generate callable, greedy."""
    generate(PROMPTS[:1], max_new_tokens=4, min_new_tokens=4)  # warm-up
    _sync()
    start = time.perf_counter()
    generate(PROMPTS[:1], max_new_tokens=1, min_new_tokens=1)
    prefill = time.perf_counter() - start
    start = time.perf_counter()
    generate(PROMPTS[:1], max_new_tokens=tokens, min_new_tokens=tokens)
    total = time.perf_counter() - start
    return {"prefill_ms": round(prefill * 1e3, 2),
            "decode_ms_per_token": round((total - prefill) / (tokens - 1) * 1e3, 2)}


def compare(kit: KitConfig, tokens: int) -> dict:
    """The same greedy generations on one GPU (whole model) and on 2 engines (one shard each)."""
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    started = time.perf_counter()
    single = GLMPipeline(load_model(kit), GLMTokenizer.load(DEMO_TOKENIZER_DIR), kit)
    _sync()
    one = {"load_s": round(time.perf_counter() - started, 2)}
    reference = single.generate(PROMPTS, max_new_tokens=tokens)
    one.update(timed_generation(single.generate, tokens))
    one["gpu_peak_gb"] = _peak_gb()
    del single
    if torch.cuda.is_available():
        torch.cuda.empty_cache()

    started = time.perf_counter()
    with GLMCluster(config=kit.replace(device=kit.device.split(":")[0]), n=2) as cluster:
        two = {"start_and_load_s": round(time.perf_counter() - started, 2)}
        status = cluster.status()
        columns = [c for c in ("engine", "rank", "device", "shard", "load_seconds", "gpu_allocated_gb")
                   if c in status]
        two["engines"] = status[columns].round(2).to_dict(orient="records")
        results = cluster.generate(PROMPTS, max_new_tokens=tokens)
        two.update(timed_generation(cluster.generate, tokens))
        final = cluster.status()
        two["gpu_peak_gb"] = final["gpu_peak_gb"].round(2).tolist() if "gpu_peak_gb" in final else None
    same = [r.text == s.text and [b.tokens for b in r.blanks] == [b.tokens for b in s.blanks]
            for r, s in zip(results, reference)]
    agree = [sum(a == b for a, b in zip(sum((b.tokens for b in r.blanks), []), sum((b.tokens for b in s.blanks), [])))
             for r, s in zip(results, reference)]
    return {"one_gpu": one, "two_engines_tp2": two, "greedy_identical": same,
            "matching_tokens": agree, "generated_tokens": [r.num_generated_tokens for r in reference]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--layers", type=int, default=24)
    parser.add_argument("--hidden", type=int, default=4096)
    parser.add_argument("--heads", type=int, default=32)
    parser.add_argument("--inner", type=int, default=10880)
    parser.add_argument("--vocab", type=int, default=150528)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dtypes", default="fp16,fp32", help="comma-separated: fp16, bf16, fp32")
    parser.add_argument("--out")
    args = parser.parse_args()
    device = "cuda:0" if torch.cuda.is_available() else "cpu"
    if device != "cpu" and torch.cuda.device_count() < 2:
        raise SystemExit("this proof needs 2 GPUs (or none: then it runs on CPU engines as a smoke test)")
    config = GLMConfig(num_layers=args.layers, hidden_size=args.hidden, num_attention_heads=args.heads,
                       inner_hidden_size=args.inner, vocab_size=args.vocab, max_sequence_length=2048)
    summary = {"device": torch.cuda.get_device_name(0) if device != "cpu" else "cpu",
               "gpus": torch.cuda.device_count(),
               "parameters_billion": round(config.num_parameters() / 1e9, 3),
               "weights_gb_fp16": round(config.num_parameters() * 2 / 1e9, 2)}
    with tempfile.TemporaryDirectory(dir=os.environ.get("TMPDIR", "/tmp")) as tmp:
        folder = Path(tmp) / "glm-proof"
        summary["write_checkpoint_s"] = round(write_random_checkpoint(config, folder, 2, args.seed), 1)
        for dtype in args.dtypes.split(","):
            kit = KitConfig(name="glm-proof", model=config, checkpoint=folder, tokenizer=DEMO_TOKENIZER_DIR,
                            dtype=dtype, device=device)
            summary[dtype] = compare(kit, args.tokens)
    text = json.dumps(summary, indent=2)
    print(text)
    out = args.out or (os.path.join(os.environ["OUT"], "cluster_proof.json") if os.environ.get("OUT") else None)
    if out:
        Path(out).write_text(text)


if __name__ == "__main__":
    main()
