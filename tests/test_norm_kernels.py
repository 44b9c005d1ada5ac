"""The fused residual-add + LayerNorm kernel against the eager ops, on the CPU through Triton's interpreter."""
from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from glmkit.kernels.norm import add_layernorm

# Allowed error in units in the last place of the exact result: fp32 carries the error of its own mean,
# variance and square root; fp16 is correctly rounded; Triton's interpreter converts to bf16 by truncation
# (a GPU rounds to nearest), which can add an ulp at each of the three bf16 roundings.
ULPS = {"float32": 4.0, "float16": 1.0, "bfloat16": 3.0}
DTYPES = tuple(ULPS)


def _run_cases() -> list[dict]:
    generator = torch.Generator().manual_seed(3)
    results = []
    for name in DTYPES:
        dtype = getattr(torch, name)
        for shape in [(1, 1, 40), (2, 3, 96), (5, 1000)]:
            norm = nn.LayerNorm(shape[-1], eps=1e-5)
            with torch.no_grad():
                norm.weight.normal_(1.0, 0.1, generator=generator)
                norm.bias.normal_(0.0, 0.1, generator=generator)
            norm = norm.to(dtype)
            residual = torch.randn(shape, generator=generator).to(dtype)
            branch = (3 * torch.randn(shape, generator=generator)).to(dtype)
            fused = add_layernorm(norm, residual, branch, 11.8, use_kernel=True)
            # Exact LayerNorm of the sum as the eager ops round it (each elementwise op rounds to dtype):
            # the kernel must be within one unit in the last place of it.
            hidden = (residual * 11.8 + branch).double()
            exact = torch.nn.functional.layer_norm(hidden, shape[-1:], norm.weight.double(), norm.bias.double(),
                                                   norm.eps)
            ulp = torch.finfo(dtype).eps * exact.abs().clamp(min=1.0)
            results.append({"dtype": name, "shape": list(shape), "same_dtype": fused.dtype == dtype,
                            "same_shape": list(fused.shape) == list(shape),
                            "error_in_ulps": ((fused.double() - exact).abs() / ulp).max().item()})
            alone = add_layernorm(norm, None, branch, 11.8, use_kernel=True)  # the first block's input
            exact = torch.nn.functional.layer_norm(branch.double(), shape[-1:], norm.weight.double(),
                                                   norm.bias.double(), norm.eps)
            ulp = torch.finfo(dtype).eps * exact.abs().clamp(min=1.0)
            results.append({"dtype": name, "shape": list(shape), "same_dtype": alone.dtype == dtype,
                            "same_shape": list(alone.shape) == list(shape),
                            "error_in_ulps": ((alone.double() - exact).abs() / ulp).max().item()})
    return results


def test_fused_add_layernorm_matches_eager_ops_under_interpreter(interpreted):
    results = interpreted
    assert len(results) == 18
    bad = [r for r in results if not (r["same_dtype"] and r["same_shape"] and r["error_in_ulps"] <= ULPS[r["dtype"]])]
    assert not bad, bad


def test_cpu_tensors_use_the_eager_ops():
    norm = nn.LayerNorm(8)
    x, y = torch.randn(2, 8), torch.randn(2, 8)
    assert torch.equal(add_layernorm(norm, None, x, 2.0), norm(x))
    assert torch.equal(add_layernorm(norm, x, y, 2.0), norm(x * 2.0 + y))  # CPU tensors: the eager ops


def test_training_keeps_the_eager_ops_because_the_kernel_has_no_backward(monkeypatch):
    from glmkit.kernels import norm as norm_kernels

    monkeypatch.setattr(norm_kernels, "kernel_usable", lambda tensor: True)  # as if on a GPU
    norm = nn.LayerNorm(8)
    x, y = torch.randn(2, 8, requires_grad=True), torch.randn(2, 8)
    out = add_layernorm(norm, x, y, 2.0)
    out.sum().backward()
    assert x.grad is not None and norm.weight.grad is not None


def test_mismatched_inputs_are_a_clear_error():
    norm = nn.LayerNorm(8)
    with pytest.raises(ValueError, match="same shape and dtype"):
        add_layernorm(norm, torch.randn(2, 8), torch.randn(3, 8), 2.0, use_kernel=True)


if __name__ == "__main__":
    print(json.dumps(_run_cases()))
