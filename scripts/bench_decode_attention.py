"""Time the fused decode-attention kernel alone: cache bytes read per second by batch, cache length and splits.

    python3 scripts/bench_decode_attention.py [--batches 1 8 32] [--lengths 256 2048] [--splits 1 2 4 8 16]
                                              [--block-t 64 128] [--warps 4 8]

GLM-130B's shape at TP=1 (96 heads, head dim 128, fp16). Prints one JSON line per case, with the fraction of
the card's copy bandwidth the kernel reaches reading keys and values, and the count `choose_splits` would pick.
"""
from __future__ import annotations

import argparse
import itertools
import json

import torch

from glmkit.kernels.attention import choose_splits, decode_attention
from glmkit.model import rotary_tables


def time_us(fn, repeats: int = 50) -> float:
    """Microseconds per call of `fn` replayed from a CUDA graph, as decode steps run (no launch overhead)."""
    fn()  # compile
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    graph.replay()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(repeats):
        graph.replay()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) * 1000 / repeats


def copy_gbs(size: int = 1 << 30) -> float:
    src = torch.empty(size, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    return 2 * size / time_us(lambda: dst.copy_(src), 20) / 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--lengths", type=int, nargs="+", default=[256, 2048])
    parser.add_argument("--splits", type=int, nargs="+", default=[1, 2, 4, 8, 16])
    parser.add_argument("--heads", type=int, default=96)
    parser.add_argument("--block-t", type=int, nargs="+", default=[128])
    parser.add_argument("--warps", type=int, nargs="+", default=[8])
    args = parser.parse_args()
    heads, hd = args.heads, 128
    copy = copy_gbs()
    print(json.dumps({"device": torch.cuda.get_device_name(), "copy_gbs": round(copy, 1)}), flush=True)
    for batch in args.batches:
        for length in args.lengths:
            qkv = torch.randn(batch, 1, heads, 3, hd, device="cuda").half()
            keys = torch.randn(batch, heads, length, hd, device="cuda").half()
            values = torch.randn_like(keys)
            slot = torch.tensor([length - 1], device="cuda")
            cos, sin = rotary_tables(torch.full((batch, 1), length - 1, device="cuda"), hd, 10000.0, torch.float16)
            allowed = torch.ones(batch, 1, 1, length, dtype=torch.bool, device="cuda")
            cache_bytes = 2 * keys.numel() * keys.element_size()
            for splits, block_t, warps in itertools.product(args.splits, args.block_t, args.warps):
                us = time_us(lambda: decode_attention(qkv, cos, sin, keys, values, slot, allowed, 5.0, splits=splits,
                                                      block_t=block_t, num_warps=warps))
                gbs = cache_bytes / us / 1e3
                print(json.dumps({"batch": batch, "length": length, "splits": splits, "block_t": block_t,
                                  "warps": warps, "us": round(us, 2),
                                  "cache_gbs": round(gbs, 1), "fraction_of_copy": round(gbs / copy, 3),
                                  "auto_splits": choose_splits(batch * heads, length, qkv.device)}), flush=True)


if __name__ == "__main__":
    main()
