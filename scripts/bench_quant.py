"""GPU benchmark of weight-only INT8/INT4 linear layers at GLM-130B shapes; prints JSON lines.

    python scripts/bench_quant.py kernels [--tp 1 2] [--batches 1 32] [--bits 8 4] [--dtype fp16]
                                         [--sweep quick|full|wide|gemv|none] [--write-configs configs/int_kernels.json]
    python scripts/bench_quant.py load DIR [--layers 2] [--shards 2] [--bits 4] [--tp 1]

`kernels` first checks the Triton kernel against dequantize + F.linear on the GPU, then, for each layer of a
GLM-130B block (query_key_value, dense, dense_h_to_4h, dense_4h_to_h; their tensor-parallel shard at --tp),
each batch size and INT8/INT4, times:
  kernel     glmkit.kernels.quant.int_linear with the default config (and the best of a sweep)
  fallback   dequantize_weight + F.linear (what glmkit uses for large batches and without Triton)
  dense      F.linear on the fp16/bf16 weight (the unquantized baseline)
Each record gives milliseconds, the weight bytes read, GB/s and the fraction of the measured copy bandwidth
(the bandwidth floor). The last record sums one block and extrapolates 70 layers to tokens/s (weights only).
INT4 records also time the best configuration with the portable shift-based unpacking (`kernel_best_portable`)
and with two half-width products over strided x columns (`kernel_best_strided`), to show what each gains.
`--sweep gemv` tries only the word GEMV's tiles at batch 1 (glmkit.kernels.gemv).
`--write-configs` merges the winners, per (bits, out, in, batch), into the JSON file
glmkit.kernels.quant.default_config reads (configs/int_kernels.json is the shipped one).

`load` writes a random fp16 checkpoint of GLM-130B shape (--layers, --shards; about 3.2 GB per layer plus
3.7 GB of embedding) into DIR if it is not there, then loads it with quantize-while-loading onto the GPU and
reports load GB/s, peak host memory (anonymous, i.e. allocated, and file-backed, i.e. page cache of the
memory-mapped shards) against one shard's size, and peak GPU memory.
"""
from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import os
import resource
import sys
import threading
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from glmkit.kernels import quant as quant_kernels  # noqa: E402
from glmkit.kernels.quant import KernelConfig, default_config, int_linear  # noqa: E402
from glmkit.quantization import dequantize_weight, quantize_weight  # noqa: E402

HIDDEN, INNER, LAYERS = 12288, 32768, 70
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}


def layer_shapes(tp: int) -> dict[str, tuple[int, int]]:
    """(out, in) of one rank's shard of each linear layer of a GLM-130B block."""
    return {"query_key_value": (3 * HIDDEN // tp, HIDDEN), "dense": (HIDDEN, HIDDEN // tp),
            "dense_h_to_4h": (2 * INNER // tp, HIDDEN), "dense_4h_to_h": (HIDDEN, INNER // tp)}


def bench_ms(fn) -> float:
    from triton.testing import do_bench

    return do_bench(fn, warmup=25, rep=100, return_mode="median")  # flushes L2 between runs


def copy_bandwidth_gbs(size_bytes: int = 2 << 30) -> float:
    """Device-to-device copy bandwidth: bytes read plus bytes written per second."""
    src = torch.empty(size_bytes, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    ms = bench_ms(lambda: dst.copy_(src))
    return 2 * size_bytes / ms / 1e6


def sweep_configs(batch: int, level: str, bits: int = 8) -> list[KernelConfig]:
    """Kernel configurations to try for `batch` rows: GEMV tiles for small batches, tl.dot tiles for all.

    `gemv`: one row, the word GEMV's tiles (glmkit.kernels.gemv; block_k counts input features, so INT8
    tiles of the same words per step have half INT4's block_k)."""
    if level == "none":
        return []
    if level == "gemv":
        if batch != 1:
            return []
        grid = dict(block_n=[4, 8, 16, 32], block_k=[k * 4 // bits for k in (512, 1024, 2048)], split_k=[1, 2, 4],
                    num_warps=[4, 8], num_stages=[2, 3])
        configs = [KernelConfig(block_m=1, **dict(zip(grid, values))) for values in itertools.product(*grid.values())]
        return [c for c in configs if c.block_n * c.block_k * bits <= 32 * 4096]  # fp32 partial sums in registers
    grids = []
    if batch < 16:
        grids.append(dict(block_m=[1 << (batch - 1).bit_length()], block_n=[16, 32, 64],
                          block_k=[256, 512, 1024], split_k=[1, 2, 4],
                          num_warps=[4] if level == "quick" else [4, 8],
                          num_stages=[2] if level == "quick" else [1, 2, 3]))
    if level == "wide":  # tensor-core tiles only (they won every batch-1 INT4 shape), deeper K and pipelines
        grids = [dict(block_m=[max(16, min(64, 1 << (batch - 1).bit_length()))], block_n=[32, 64, 128],
                      block_k=[256, 512], split_k=[1, 2, 4], num_warps=[4, 8], num_stages=[3, 4])]
    else:
        grids.append(dict(block_m=[max(16, min(64, 1 << (batch - 1).bit_length()))], block_n=[32, 64, 128],
                          block_k=[64, 128, 256], split_k=[1, 2], num_warps=[4] if level == "quick" else [4, 8],
                          num_stages=[3] if level == "quick" else [2, 3, 4]))
    configs = []
    for grid in grids:
        for values in itertools.product(*grid.values()):
            config = KernelConfig(**dict(zip(grid, values)))
            if config.block_m < 16 and config.block_m * config.block_n * config.block_k > 32768:
                continue  # the GEMV product tile lives in registers
            if level == "quick" and config.split_k > 2:
                continue
            configs.append(config)
    return configs


def check_kernel() -> list[dict]:
    """Kernel against dequantize + F.linear on the GPU in fp16 and bf16 (both INT4 unpackings), ragged shapes."""
    results = []
    for dtype, bits, (out, inp), rows in itertools.product(
            (torch.float16, torch.bfloat16), (8, 4), [(96, 160), (3000, 4096), (12288, 1536)], (1, 5, 32, 100)):
        w = torch.randn(out, inp, device="cuda")
        q, scale = quantize_weight(w, bits)
        x = torch.randn(rows, inp, device="cuda", dtype=dtype)
        bias = torch.randn(out, device="cuda", dtype=dtype)
        expected = F.linear(x.float(), dequantize_weight(q, scale, bits, torch.float32), bias.float())
        for config in [None] + [c for c in sweep_configs(rows, "quick")[:3]]:
            got = int_linear(x, q, scale, bias, bits, config).float()
            error = ((got - expected).abs().max() / expected.abs().max()).item()
            results.append({"check": True, "dtype": str(dtype), "bits": bits, "shape": [out, inp], "rows": rows,
                            "config": None if config is None else config.__dict__, "relative_error": error,
                            "ok": error < 1e-2})
    return results


def kernels(args) -> None:
    dtype = DTYPES[args.dtype]
    torch.manual_seed(0)
    copy = copy_bandwidth_gbs()
    print(json.dumps({"device": torch.cuda.get_device_name(), "copy_gbs": round(copy, 1), "tp": args.tp,
                      "dtype": args.dtype}), flush=True)
    checks = check_kernel()
    failures = [r for r in checks if not r["ok"]]
    print(json.dumps({"check": "kernel vs dequantize+F.linear", "cases": len(checks), "failures": failures}),
          flush=True)
    if failures:
        sys.exit("the kernel disagrees with dequantize + F.linear; not timing it")
    winners = []
    for tp in args.tp:
        winners += kernels_at(args, tp, dtype, copy)
    if args.write_configs:
        write_configs(Path(args.write_configs), winners)


def write_configs(path: Path, winners: list[tuple]) -> None:
    """Merge `winners` (bits, out, in, batch, config) into the tuned-config file at `path`; each entry keeps
    the card it was tuned on, and the file's "device" lists them all."""
    entries = {}
    if path.exists():
        old = json.loads(path.read_text())
        for entry in old["configs"]:
            entry.setdefault("device", old.get("device"))
            entries[(entry["bits"], entry["out_features"], entry["in_features"], entry["max_rows"])] = entry
    document = quant_kernels.tuned_config_entries(winners, torch.cuda.get_device_name())
    for entry in document["configs"]:
        entries[(entry["bits"], entry["out_features"], entry["in_features"], entry["max_rows"])] = entry
    document["configs"] = [entries[key] for key in sorted(entries)]
    document["device"] = ", ".join(sorted({e["device"] for e in document["configs"] if e.get("device")}))
    path.write_text(json.dumps(document, indent=1) + "\n")
    print(json.dumps({"wrote": str(path), "entries": len(document["configs"])}), flush=True)


def kernels_at(args, tp: int, dtype: torch.dtype, copy: float) -> list[tuple]:
    """Time every layer shape of one rank at `tp`; returns the sweep winners (bits, out, in, batch, config)."""
    totals: dict[tuple, float] = {}
    winners = []
    for name, (out, inp) in layer_shapes(tp).items():
        w = torch.randn(out, inp, device="cuda", dtype=dtype) * 0.02
        bias = torch.randn(out, device="cuda", dtype=dtype)
        for batch in args.batches:
            x = torch.randn(batch, inp, device="cuda", dtype=dtype)
            dense_bytes = w.numel() * w.element_size()
            ms = bench_ms(lambda: F.linear(x, w, bias))
            record(name, "dense", 16, batch, ms, dense_bytes, copy, totals)
            for bits in args.bits:
                q, scale = quantize_weight(w, bits)
                weight_bytes = q.numel() + scale.numel() * 2
                ms = bench_ms(lambda: F.linear(x, dequantize_weight(q, scale, bits, dtype), bias))
                record(name, "fallback", bits, batch, ms, weight_bytes, copy, totals)
                config = default_config(batch, out, inp, bits)
                ms = bench_ms(lambda: int_linear(x, q, scale, bias, bits, config))
                record(name, "kernel", bits, batch, ms, weight_bytes, copy, totals, config)
                best = (ms, config)
                for candidate in sweep_configs(batch, args.sweep, bits):
                    try:
                        candidate_ms = bench_ms(lambda: int_linear(x, q, scale, bias, bits, candidate))
                    except Exception as error:  # resources exceeded for this tile: skip it
                        print(json.dumps({"skipped": candidate.__dict__, "error": str(error)[:200]}), flush=True)
                        continue
                    if candidate_ms < best[0]:
                        best = (candidate_ms, candidate)
                swept = args.sweep != "none" and (args.sweep != "gemv" or batch == 1)
                if swept:
                    record(name, "kernel_best", bits, batch, best[0], weight_bytes, copy, totals, best[1])
                    winners.append((bits, out, inp, batch, best[1]))
                if bits == 4:  # what each INT4 technique gains: the winner without it
                    changes = [("kernel_best_portable", {"fast_unpack": False})]
                    if best[1].block_m > 1:  # the word GEMV (block_m 1) has no strided variant
                        changes.append(("kernel_best_strided", {"int4_join": False}))
                    for method, change in changes:
                        variant = dataclasses.replace(best[1], **change)
                        ms = bench_ms(lambda: int_linear(x, q, scale, bias, bits, variant))
                        record(name, method, bits, batch, ms, weight_bytes, copy, totals, variant)
    for (method, bits, batch), ms in sorted(totals.items()):
        per_token = ms * LAYERS  # every rank runs its shard of all 70 layers at once
        print(json.dumps({"summary": "one block (4 linears), weights only", "tp": tp, "method": method,
                          "bits": bits, "batch": batch, "block_ms": round(ms, 4),
                          "70_layers_ms": round(per_token, 2),
                          "70_layers_tokens_per_s": round(1000 * batch / per_token, 1)}), flush=True)
    return winners


def record(name, method, bits, batch, ms, weight_bytes, copy_gbs, totals, config=None) -> None:
    gbs = weight_bytes / ms / 1e6
    result = {"layer": name, "method": method, "bits": bits, "batch": batch, "ms": round(ms, 4),
              "weight_mb": round(weight_bytes / 1e6, 1), "gbs": round(gbs, 1),
              "fraction_of_copy": round(gbs / copy_gbs, 3)}
    if config is not None:
        result["config"] = config.__dict__
    print(json.dumps(result), flush=True)
    key = (method, bits, batch)
    totals[key] = totals.get(key, 0.0) + ms


def _memory_kb() -> dict[str, int]:
    fields = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("RssAnon", "RssFile"):
            fields[key] = int(value.split()[0])
    return fields


def load(args) -> None:
    from glmkit.checkpoint import expected_shapes, inspect_checkpoint, save_checkpoint
    from glmkit.config import GLMConfig, KitConfig
    from glmkit.generate.pipeline import load_model
    from glmkit.parallel.layout import split_tensor

    model = GLMConfig(num_layers=args.layers, hidden_size=HIDDEN, num_attention_heads=96,
                      inner_hidden_size=INNER, vocab_size=150528)
    root = Path(args.dir)
    if not (root / "latest").exists():
        started = time.perf_counter()
        shards = [{} for _ in range(args.shards)]
        for name, shape in expected_shapes(model).items():  # one full tensor at a time
            full = (torch.randn(shape, device="cuda", dtype=torch.float16) * 0.02).cpu()
            for rank in range(args.shards):
                shards[rank][name] = split_tensor(name, full, rank, args.shards).clone()
            del full
        save_checkpoint(root, shards)
        del shards
        print(json.dumps({"wrote": str(root), "seconds": round(time.perf_counter() - started, 1)}), flush=True)
    info = inspect_checkpoint(root)
    shard_bytes = os.path.getsize(info.shard_paths[0])
    total_bytes = sum(os.path.getsize(p) for p in info.shard_paths)
    peaks = {"RssAnon": 0, "RssFile": 0}
    base = _memory_kb()
    stop = threading.Event()

    def sample():
        while not stop.is_set():
            for key, value in _memory_kb().items():
                peaks[key] = max(peaks[key], value)
            time.sleep(0.005)

    sampler = threading.Thread(target=sample, daemon=True)
    torch.cuda.reset_peak_memory_stats()
    config = KitConfig(name="bench", model=model, checkpoint=root, dtype="fp16", device="cuda",
                       quantization=None if args.bits == 16 else f"int{args.bits}")
    sampler.start()
    started = time.perf_counter()
    model_rank0 = load_model(config, 0, args.tp)  # at --tp > 1, rank 0 only (one GPU)
    torch.cuda.synchronize()
    seconds = time.perf_counter() - started
    stop.set()
    sampler.join()
    print(json.dumps({
        "load": str(root), "bits": args.bits, "tp": args.tp, "rank": 0, "seconds": round(seconds, 2),
        # bytes of the checkpoint this rank covers (at --tp > 1 it also reads every row-parallel weight once
        # for the scales, which this figure leaves out)
        "checkpoint_gb": round(total_bytes / 1e9, 2), "load_gbs": round(total_bytes / args.tp / seconds / 1e9, 2),
        "shard_gb": round(shard_bytes / 1e9, 2),
        "peak_host_anon_gb": round((peaks["RssAnon"] - base["RssAnon"]) * 1024 / 1e9, 3),
        "peak_host_anon_vs_shard": round((peaks["RssAnon"] - base["RssAnon"]) * 1024 / shard_bytes, 3),
        "peak_host_file_backed_gb": round(peaks["RssFile"] * 1024 / 1e9, 2),
        "ru_maxrss_gb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9, 2),
        "gpu_allocated_gb": round(torch.cuda.memory_allocated() / 1e9, 2),
        "gpu_peak_gb": round(torch.cuda.max_memory_allocated() / 1e9, 2),
        "parameters_local": sum(p.numel() for p in model_rank0.parameters()),
    }), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    k = sub.add_parser("kernels")
    k.add_argument("--tp", type=int, nargs="+", default=[1], help="shard shapes of these TP sizes")
    k.add_argument("--batches", type=int, nargs="+", default=[1, 32])
    k.add_argument("--bits", type=int, nargs="+", choices=[4, 8], default=[8, 4])
    k.add_argument("--write-configs", help="merge the sweep's winners into this tuned-config JSON file")
    k.add_argument("--dtype", choices=sorted(DTYPES), default="fp16")
    k.add_argument("--sweep", choices=["none", "quick", "full", "wide", "gemv"], default="quick")
    ld = sub.add_parser("load")
    ld.add_argument("dir")
    ld.add_argument("--layers", type=int, default=2)
    ld.add_argument("--shards", type=int, default=2)
    ld.add_argument("--bits", type=int, choices=[4, 8, 16], default=4, help="16: fp16, no quantization")
    ld.add_argument("--tp", type=int, default=1)
    args = parser.parse_args()
    if not torch.cuda.is_available() or not quant_kernels.available():
        sys.exit("needs a CUDA GPU and Triton")
    kernels(args) if args.command == "kernels" else load(args)


if __name__ == "__main__":
    main()
