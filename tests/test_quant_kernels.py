"""The INT8/INT4 Triton kernels (glmkit.kernels.quant) against the dequantize path, on the CPU through Triton's
interpreter, and their launch configs (checked, and tuned per shape and row count). The weight format itself:
tests/test_quantization.py."""
from __future__ import annotations

import json

import pytest
import torch

from glmkit.quantization import dequantize_weight, quantize_weight

# TRITON_INTERPRET must be set before Triton is first imported (its own library functions are decorated
# then), so the cases run in a fresh interpreter: `python tests/test_quant_kernels.py` prints their results.

KERNEL_CASES = [dict(block_m=1, block_n=16, block_k=64),  # GEMV, masked K and N tails
                dict(block_m=4, block_n=32, block_k=32, split_k=2),  # fp32 atomics over K splits
                dict(block_m=16, block_n=16, block_k=64),  # tl.dot
                dict(block_m=16, block_n=32, block_k=32, split_k=3),
                dict(block_m=16, block_n=16, block_k=64, int4_join=False),  # INT4 over strided x columns
                dict(block_m=2, block_n=16, block_k=64, int4_join=False)]


def _run_kernel_cases() -> list[dict]:
    from glmkit.kernels import quant as quant_kernels

    results = []
    generator = torch.Generator().manual_seed(7)
    for bits in (8, 4):
        w, bias = torch.randn(48, 160, generator=generator), torch.randn(48, generator=generator)
        q, scale = quantize_weight(w, bits)
        reference = dequantize_weight(q, scale, bits, torch.float64)
        for config in KERNEL_CASES + [None]:  # None: the default config for the batch
            for dtype in (torch.float32, torch.float16):
                rows = 1 if config is None else 6
                x = torch.randn(rows, 2 * 160, generator=generator).to(dtype)[:, ::2]  # a strided view
                b = None if config is None else bias.to(dtype)
                got = quant_kernels.int_linear(x.reshape(rows, 1, 160), q, scale, b, bits,
                                               None if config is None else quant_kernels.KernelConfig(**config))
                expected = x.double() @ reference.T + (0 if b is None else b.double())
                results.append({"bits": bits, "config": config, "dtype": str(dtype), "dtype_ok": got.dtype == dtype,
                                "shape": list(got.shape),
                                "error": (got.reshape(rows, 48).double() - expected).abs().max().item(),
                                # fp32: summation order only; fp16: output rounding (|y| < 64: 2**-6 there)
                                "tolerance": 1e-4 if dtype == torch.float32 else 2.0 ** -5})
    for bits in (8, 4):  # the prefill dequantization kernel gives dequantize_weight's values exactly
        packed, row_scale = quantize_weight(torch.randn(37, 300, generator=generator), bits)
        for dtype in (torch.float32, torch.float16):
            results.append({"dequantize_bits": bits, "dtype": str(dtype), "equal": torch.equal(
                quant_kernels.dequantize(packed, row_scale, bits, dtype),
                dequantize_weight(packed, row_scale, bits, dtype))})
    results += _gemv_cases(quant_kernels, generator)
    try:
        quant_kernels.int_linear(torch.randn(1, 32), q, scale, None, 4)
    except ValueError as error:
        results.append({"error_message": str(error)})
    return results


GEMV_CASES = [dict(block_m=1, block_n=16, block_k=32),  # few words a step: masked word and row tails
              dict(block_m=1, block_n=64, block_k=64, split_k=3),  # one ragged tile, K splits with atomics
              dict(block_m=1, block_n=16, block_k=1024, fast_unpack=False)]
# (bits, input features): rows of whole 32-bit words take the word GEMV, the others the tl.sum path
GEMV_SHAPES = [(4, 160, True), (4, 164, False), (8, 160, True), (8, 162, False)]


def _gemv_cases(quant_kernels, generator) -> list[dict]:
    """block_m 1: the word GEMV (glmkit.kernels.gemv) where it applies, counted to tell the paths apart."""
    from glmkit.kernels import gemv

    calls = []
    int_gemv = gemv.int_gemv
    gemv.int_gemv = lambda *args: calls.append(1) or int_gemv(*args)
    results = []
    try:
        for (bits, inputs, words), config, rows, dtype in [(shape, c, r, d) for shape in GEMV_SHAPES
                                                           for c in GEMV_CASES for r in (1, 3)
                                                           for d in (torch.float32, torch.float16)]:
            q, scale = quantize_weight(torch.randn(45, inputs, generator=generator), bits)
            bias = torch.randn(45, generator=generator).to(dtype)
            x = torch.randn(rows, inputs, generator=generator).to(dtype)
            before = len(calls)
            got = quant_kernels.int_linear(x, q, scale, bias, bits, quant_kernels.KernelConfig(**config))
            expected = x.double() @ dequantize_weight(q, scale, bits, torch.float64).T + bias.double()
            results.append({"gemv_bits": bits, "inputs": inputs, "whole_words": words, "config": config,
                            "rows": rows, "dtype": str(dtype), "used_gemv": len(calls) > before,
                            "dtype_ok": got.dtype == dtype, "gemv_error": (got.double() - expected).abs().max().item(),
                            # fp16: output rounding; INT8 outputs reach |y| ~ 100 here (2**-4 there)
                            "tolerance": 1e-4 if dtype == torch.float32 else 2.0 ** -4})
    finally:
        gemv.int_gemv = int_gemv
    return results


def test_word_gemv_matches_dequantize_path_under_interpreter(interpreted):
    cases = [r for r in interpreted if "gemv_bits" in r]
    assert len(cases) == len(GEMV_SHAPES) * len(GEMV_CASES) * 2 * 2
    assert all(r["used_gemv"] == r["whole_words"] for r in cases), cases
    bad = [r for r in cases if not (r["dtype_ok"] and r["gemv_error"] <= r["tolerance"])]
    assert not bad, bad


def test_triton_kernel_matches_dequantize_path_under_interpreter(interpreted):
    results = interpreted
    dequantized = [r for r in results if "dequantize_bits" in r]
    assert len(dequantized) == 4 and all(r["equal"] for r in dequantized), dequantized
    cases = [r for r in results if "error" in r]
    assert len(cases) == 2 * (len(KERNEL_CASES) + 1) * 2
    bad = [r for r in cases if not (r["dtype_ok"] and r["shape"][-1] == 48 and r["error"] <= r["tolerance"])]
    assert not bad, bad
    assert "input has 32 features but the INT4 weight (48, 80) takes 160" in results[-1]["error_message"]


def test_kernel_config_checks():
    from glmkit.kernels.quant import KernelConfig

    with pytest.raises(ValueError, match="must be a power of two"):
        KernelConfig(block_n=48)
    with pytest.raises(ValueError, match="block_k must be at least 32"):
        KernelConfig(block_k=16)


def test_tuned_kernel_configs_pick_by_shape_and_rows(tmp_path):
    from glmkit.kernels import quant as quant_kernels
    from glmkit.kernels.quant import KernelConfig, default_config, load_tuned_configs, tuned_config_entries

    small, large = KernelConfig(block_m=16, block_n=32, block_k=256), KernelConfig(block_m=32, block_n=128)
    path = tmp_path / "tuned.json"
    path.write_text(json.dumps(tuned_config_entries([(4, 36864, 12288, 32, large), (4, 36864, 12288, 1, small)],
                                                    "test GPU")))
    try:
        assert load_tuned_configs(path) == 2
        assert default_config(1, 36864, 12288, 4) == small
        assert default_config(7, 36864, 12288, 4) == large  # the next larger tuned batch covers it
        generic = dict(quant_kernels.DEFAULT_CONFIGS)
        assert default_config(64, 36864, 12288, 4) == generic[64]  # beyond the tuned rows
        assert default_config(1, 36864, 12288, 8) == generic[1]  # other bits: not tuned
        assert default_config(1, 4096, 12288, 4) == quant_kernels.INT4_GEMV_DEFAULT  # other shape, one row
        assert default_config(2, 4096, 12288, 4) == generic[16]
        path.write_text(json.dumps({"configs": [{"bits": 4}]}))
        with pytest.raises(ValueError, match="is not a kernel config file"):
            load_tuned_configs(path)
        with pytest.raises(FileNotFoundError, match="--write-configs"):
            load_tuned_configs(tmp_path / "missing.json")
    finally:
        load_tuned_configs()  # back to the shipped file


if __name__ == "__main__":
    print(json.dumps(_run_kernel_cases()))
