#!/usr/bin/env python3
"""Where a decode step's time goes: kernel times of one GLM decode step, grouped, against the step's wall time.

Builds a random GLM of GLM-130B shape (--layers, fp16 by default) on one GPU, captures the batch-1 decode
step as glmkit generation does, and profiles --steps replays with torch.profiler (CUPTI sees the kernels
inside the graph). Prints JSON lines: one per kernel group (weight matmuls, attention, elementwise,
normalisation, copies, quantized kernels...) with total microseconds per step and kernel count per step,
then a summary: step wall time, sum of kernel times, the gap between them (launch gaps and idle time in the
graph), and the weight bytes' copy-bandwidth floor. Usage on the GPU machine:

    python3 scripts/profile_decode.py --layers 4 [--quantization int4] [--batch 1] --out $OUT/profile.jsonl
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
from collections import defaultdict
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from glmkit.config import DTYPES, PRESETS  # noqa: E402
from glmkit.generate.graphs import DecodeStep  # noqa: E402
from glmkit.lab.random_model import build_random_model, weight_bytes  # noqa: E402
from glmkit.lab.timing import Clock, measure_bandwidth  # noqa: E402

# First matching substring of the (lower-cased) kernel name decides the group.
GROUPS = [("quantized", ("int_linear",)), ("norm (fused)", ("add_layernorm",)),
          ("gemm/gemv", ("gemv", "gemm", "sm90_xmma", "cutlass", "splitk", "nvjet")),
          ("nccl", ("nccl",)), ("softmax", ("softmax",)), ("layernorm", ("layer_norm", "layernorm")),
          ("copy/index", ("copy", "index", "cat", "scatter", "gather")), ("reduce", ("reduce",)),
          ("elementwise", ("elementwise", "vectorized")), ("triton (fused)", ("triton",))]


def group_of(name: str) -> str:
    lower = name.lower()
    for group, keys in GROUPS:
        if any(key in lower for key in keys):
            return group
    return "other"


@torch.inference_mode()
def check_fused_kernels(step: DecodeStep) -> dict:
    """Logits of one decode step with glmkit's fused GPU kernels against the same step in eager ops."""
    from glmkit.kernels import attention as attention_kernels
    from glmkit.kernels import norm as norm_kernels

    generator = torch.Generator(device=step.cache.keys.device).manual_seed(0)
    for tensor in (step.cache.keys, step.cache.values):
        tensor.normal_(0.0, 1.0, generator=generator)  # a filled cache, so attention has something to mix
    length = step.keys.shape[0]
    step.ids.fill_(1234)
    step.positions.fill_(length // 2)
    step.index.fill_(length // 2)
    step.pads.fill_(0)
    fused = step._run().float()
    saved = attention_kernels.kernel_usable, norm_kernels.kernel_usable
    attention_kernels.kernel_usable = norm_kernels.kernel_usable = lambda tensor: False
    try:
        eager = step._run().float()
    finally:
        attention_kernels.kernel_usable, norm_kernels.kernel_usable = saved
    return {"check": "fused kernels vs eager ops, one decode step's logits",
            "max_abs_difference": (fused - eager).abs().max().item(), "logit_std": eager.std().item(),
            "same_argmax": bool(torch.equal(fused.argmax(-1), eager.argmax(-1)))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="fp16")
    parser.add_argument("--quantization", choices=["int8", "int4"])
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--length", type=int, default=256, help="KV cache positions")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--kernel-configs", help="tuned INT8/INT4 kernel configs (scripts/bench_quant.py)")
    parser.add_argument("--out")
    args = parser.parse_args()
    if args.kernel_configs:
        from glmkit.kernels.quant import load_tuned_configs
        load_tuned_configs(args.kernel_configs)
    device = torch.device("cuda")
    config = dataclasses.replace(PRESETS["glm-130b"], num_layers=args.layers)
    bandwidth = measure_bandwidth(device, 2**30)
    model = build_random_model(config, DTYPES[args.dtype], device, quantization=args.quantization)
    step = DecodeStep(model, args.batch, args.length, use_graphs=True)
    print(json.dumps(check_fused_kernels(step)), flush=True)
    clock = Clock(device)
    wall = statistics.median(clock.time_ms(lambda: [step.graph.replay() for _ in range(args.steps)], 5)) / args.steps

    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(args.steps):
            step.graph.replay()
        torch.cuda.synchronize()
    totals, counts, kernels = defaultdict(float), defaultdict(int), defaultdict(float)
    for event in prof.events():
        if event.device_type != torch.autograd.DeviceType.CUDA:
            continue
        group = group_of(event.name)
        totals[group] += event.device_time / args.steps
        counts[group] += 1
        kernels[event.name[:120]] += event.device_time / args.steps
    lines = [{"group": g, "us_per_step": round(t, 1), "kernels_per_step": counts[g] / args.steps}
             for g, t in sorted(totals.items(), key=lambda item: -item[1])]
    top = sorted(kernels.items(), key=lambda item: -item[1])[:15]
    lines += [{"kernel": name, "us_per_step": round(t, 1)} for name, t in top]
    busy = sum(totals.values()) / 1e3
    floor = weight_bytes(model) / (bandwidth["copy_bandwidth_gbs"] * 1e6)
    lines.append({"summary": True, "device": torch.cuda.get_device_name(), "layers": args.layers,
                  "dtype": args.dtype, "quantization": args.quantization, "batch": args.batch,
                  "step_ms": round(wall, 4), "kernel_ms": round(busy, 4), "gap_ms": round(wall - busy, 4),
                  "kernels_per_step": sum(counts.values()) / args.steps,
                  "floor_ms": round(floor, 4), "floor_fraction": round(floor / wall, 3),
                  "per_layer_non_matmul_us": round((busy * 1e3 - totals["gemm/gemv"] - totals["quantized"])
                                                   / args.layers, 1)})
    text = "\n".join(json.dumps(line) for line in lines)
    print(text, flush=True)
    if args.out:
        Path(args.out).write_text(text + "\n")


if __name__ == "__main__":
    main()
