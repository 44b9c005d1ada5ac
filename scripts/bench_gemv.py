"""GPU benchmark of the word GEMV (glmkit.kernels.gemv) per math mode against the shipped kernel; JSON lines.

    python scripts/bench_gemv.py [--bits 4] [--batches 1] [--tp 1] [--quick] [--math fp16 exact portable]

Checks every math mode against dequantize + F.linear (fp16 and bf16, ragged shapes), then times, for each
linear layer of a GLM-130B block at --tp, the shipped `int_linear` (its tuned config) and, per math mode
(forced, all on fp16 inputs), the best of a sweep of GEMV launch parameters, with GB/s and the fraction of
the measured copy bandwidth. The summary extrapolates one block's four linears to 70 layers. To tune what
glmkit ships, use scripts/bench_quant.py kernels --bits 4 --sweep gemv --write-configs.
"""
from __future__ import annotations

import argparse
import itertools
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from glmkit.kernels.gemv import int_gemv  # noqa: E402
from glmkit.kernels.quant import KernelConfig, default_config, int_linear  # noqa: E402
from glmkit.quantization import dequantize_weight, quantize_weight  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_quant import LAYERS, bench_ms, copy_bandwidth_gbs, layer_shapes, sweep_configs  # noqa: E402


def check(modes, bits: int) -> list[dict]:
    results = []
    for dtype, (out, inp), rows, math in itertools.product(
            (torch.float16, torch.bfloat16), [(96, 160), (3000, 4096), (12288, 1536)], (1, 3), modes):
        if math == "fp16" and dtype != torch.float16:
            continue  # fp16 products take fp16 inputs only
        w = torch.randn(out, inp, device="cuda")
        q, scale = quantize_weight(w, bits)
        x = torch.randn(rows, inp, device="cuda", dtype=dtype)
        bias = torch.randn(out, device="cuda", dtype=dtype)
        expected = F.linear(x.float(), dequantize_weight(q, scale, bits, torch.float32), bias.float())
        for config in (KernelConfig(block_m=1, block_n=16, block_k=1024),
                       KernelConfig(block_m=1, block_n=32, block_k=256, split_k=2)):
            got = int_gemv(x, q, scale, bias, bits, config, MATH[math]).float()
            error = ((got - expected).abs().max() / expected.abs().max()).item()
            results.append({"dtype": str(dtype), "shape": [out, inp], "rows": rows, "math": math,
                            "split_k": config.split_k, "relative_error": error, "ok": error < 1e-2})
    return results


MATH = {"portable": 0, "exact": 1, "fp16": 2}  # glmkit.kernels.gemv's MATH modes


def sweep(quick: bool, bits: int) -> list[KernelConfig]:
    if not quick:
        return sweep_configs(1, "gemv", bits)
    grid = dict(block_n=[8, 16, 32], block_k=[k * 4 // bits for k in (256, 512)], split_k=[1, 2])
    return [KernelConfig(block_m=1, **dict(zip(grid, values))) for values in itertools.product(*grid.values())]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--bits", type=int, choices=[4, 8], default=4)
    parser.add_argument("--batches", type=int, nargs="+", default=[1])
    parser.add_argument("--tp", type=int, default=1)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--math", nargs="+", default=["fp16", "exact"], choices=["fp16", "exact", "portable"])
    args = parser.parse_args()
    torch.manual_seed(0)
    copy = copy_bandwidth_gbs()
    print(json.dumps({"device": torch.cuda.get_device_name(), "copy_gbs": round(copy, 1),
                      "triton": __import__("triton").__version__}), flush=True)
    checks = check(["portable", "exact", "fp16"], args.bits)
    worst = {m: max(r["relative_error"] for r in checks if r["math"] == m) for m in ("portable", "exact", "fp16")}
    failures = [r for r in checks if not r["ok"]]
    print(json.dumps({"check": f"INT{args.bits} int_gemv vs dequantize+F.linear", "cases": len(checks), "worst": worst,
                      "failures": failures}), flush=True)
    if failures:
        sys.exit("the GEMV disagrees with dequantize + F.linear; not timing it")
    totals: dict[tuple, float] = {}
    for name, (out, inp) in layer_shapes(args.tp).items():
        w = torch.randn(out, inp, device="cuda", dtype=torch.float16) * 0.02
        q, scale = quantize_weight(w, args.bits)
        bias = torch.randn(out, device="cuda", dtype=torch.float16)
        weight_bytes = q.numel() + scale.numel() * 2
        for batch in args.batches:
            x = torch.randn(batch, inp, device="cuda", dtype=torch.float16)
            shipped = default_config(batch, out, inp, args.bits)
            rows = [("shipped", bench_ms(lambda: int_linear(x, q, scale, bias, args.bits, shipped)), str(shipped))]
            best = {}
            for config, math in itertools.product(sweep(args.quick, args.bits), args.math):
                try:
                    ms = bench_ms(lambda: int_gemv(x, q, scale, bias, args.bits, config, MATH[math]))
                except Exception as error:  # resources exceeded for this tile: skip it
                    print(json.dumps({"skipped": str(config), "error": str(error)[:200]}), flush=True)
                    continue
                if math not in best or ms < best[math][0]:
                    best[math] = (ms, config)
            rows += [(f"gemv_{math}", ms, str(config)) for math, (ms, config) in best.items()]
            for method, ms, config in rows:
                gbs = weight_bytes / ms / 1e6
                totals[(method, batch)] = totals.get((method, batch), 0.0) + ms
                print(json.dumps({"layer": name, "batch": batch, "method": method, "ms": round(ms, 4),
                                  "gbs": round(gbs, 1), "of_copy": round(gbs / copy, 3), "config": config}),
                      flush=True)
    for (method, batch), ms in sorted(totals.items()):
        print(json.dumps({"summary": "one block (4 linears)", "method": method, "batch": batch,
                          "block_ms": round(ms, 4), "70_layers_ms": round(ms * LAYERS, 2)}), flush=True)


if __name__ == "__main__":
    main()
