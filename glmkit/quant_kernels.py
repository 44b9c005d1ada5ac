"""Triton kernels for weight-only INT8/INT4 linear layers: dequantize in registers, accumulate in fp32.

    y = x @ (q * scale[:, None])^T + bias  =  (x @ q^T) * scale + bias

so the integer weight is read once from memory, converted in registers, and the per-output-row scale is
applied once to the fp32 accumulator. Decoding reads every weight once per token, so at batch 1-32 the
kernel is bound by the bytes of `q`: INT8 halves them and INT4 quarters them against fp16.

One kernel serves both shapes of the problem, chosen by `KernelConfig.block_m`:
  block_m < 16   GEMV-like: broadcast multiply and reduce over K on CUDA cores (batch 1, maybe a few more)
  block_m >= 16  tl.dot on the int weights converted to x's dtype (exact: |q| <= 127); smaller batches are
                 padded to 16 rows, which costs tensor-core time but no extra weight traffic
`split_k > 1` splits the input dimension over programs and sums with fp32 atomics, which gives enough
programs to fill the GPU when the output dimension is small (row-parallel shards).

The kernels run on the CPU under TRITON_INTERPRET=1 (the tests do this); `glmkit.quantization` falls back
to dequantize + F.linear when Triton is missing or the input is on the CPU.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: glmkit.quantization uses its dequantize + F.linear fallback
    triton = None
    tl = None


def available() -> bool:
    """True when Triton is importable (the kernels still need a CUDA tensor, or TRITON_INTERPRET=1)."""
    return triton is not None


@dataclass(frozen=True)
class KernelConfig:
    """Launch parameters; tune them on the GPU with scripts/bench_quant.py. Block sizes are powers of two."""

    block_m: int = 1  # input rows per program; >= 16 switches to tensor-core tl.dot
    block_n: int = 64  # output features per program
    block_k: int = 256  # input features per loop step (INT4: block_k/2 bytes)
    split_k: int = 1  # programs sharing one output tile along the input dimension (fp32 atomics when > 1)
    num_warps: int = 4
    num_stages: int = 2

    def __post_init__(self):
        for name in ("block_m", "block_n", "block_k", "num_warps"):
            value = getattr(self, name)
            if value < 1 or value & (value - 1):
                raise ValueError(f"KernelConfig.{name} must be a power of two, got {value}")
        if self.split_k < 1:
            raise ValueError(f"KernelConfig.split_k must be at least 1, got {self.split_k}")
        if self.block_k < 32:
            raise ValueError(f"KernelConfig.block_k must be at least 32, got {self.block_k}")
        if self.block_m >= 16 and self.block_n < 16:
            raise ValueError("tl.dot needs block_n >= 16 when block_m >= 16")


# (max rows, config) in increasing order of rows: the first entry whose max covers the batch is used.
# Starting points only; scripts/bench_quant.py sweeps alternatives on the GPU.
DEFAULT_CONFIGS: list[tuple[int, KernelConfig]] = [
    (1, KernelConfig(block_m=1, block_n=32, block_k=512, num_warps=4)),
    (16, KernelConfig(block_m=16, block_n=64, block_k=128, num_warps=4)),
    (32, KernelConfig(block_m=32, block_n=64, block_k=128, num_warps=4)),
    (64, KernelConfig(block_m=64, block_n=64, block_k=64, num_warps=4, num_stages=3)),
]


def default_config(rows: int, out_features: int, in_features: int, bits: int) -> KernelConfig:
    """Launch parameters for `rows` input rows from DEFAULT_CONFIGS (the largest entry beyond them)."""
    for max_rows, config in DEFAULT_CONFIGS:
        if rows <= max_rows:
            return config
    return DEFAULT_CONFIGS[-1][1]


if triton is not None:

    @triton.jit
    def _int_linear_kernel(x_ptr, w_ptr, scale_ptr, bias_ptr, out_ptr, M, N, K,
                           stride_xm, stride_xk, stride_wn, stride_wk, stride_om, stride_on,
                           BITS: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr,
                           BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr,
                           DOT_PRECISION: tl.constexpr):
        # Grid: (output tiles, row tiles, K splits). K counts logical input features (INT4: 2 per byte).
        pid_n = tl.program_id(0)
        pid_m = tl.program_id(1)
        pid_k = tl.program_id(2)
        rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        m_ok = rm < M
        n_ok = rn < N
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(pid_k * BLOCK_K, K, BLOCK_K * SPLIT_K):
            if BITS == 8:
                rk = k0 + tl.arange(0, BLOCK_K)
                k_ok = rk < K
                w = tl.load(w_ptr + rn[:, None] * stride_wn + rk[None, :] * stride_wk,
                            mask=n_ok[:, None] & k_ok[None, :], other=0)  # (BN, BK) int8
                x = tl.load(x_ptr + rm[:, None] * stride_xm + rk[None, :] * stride_xk,
                            mask=m_ok[:, None] & k_ok[None, :], other=0.0)  # (BM, BK)
                if BLOCK_M >= 16:
                    acc += tl.dot(x, tl.trans(w.to(x.dtype)), input_precision=DOT_PRECISION)
                else:
                    acc += tl.sum(x.to(tl.float32)[:, None, :] * w.to(tl.float32)[None, :, :], axis=2)
            else:
                # Byte i of a row holds columns 2i (high nibble) and 2i+1 (low nibble), both signed.
                rb = k0 // 2 + tl.arange(0, BLOCK_K // 2)
                b_ok = rb < K // 2
                packed = tl.load(w_ptr + rn[:, None] * stride_wn + rb[None, :] * stride_wk,
                                 mask=n_ok[:, None] & b_ok[None, :], other=0)  # (BN, BK/2) int8
                packed = packed.to(tl.int32)  # sign-extends, so arithmetic shifts recover signed nibbles
                high = packed >> 4
                low = (packed << 28) >> 28
                x_mask = m_ok[:, None] & b_ok[None, :]
                x_even = tl.load(x_ptr + rm[:, None] * stride_xm + (2 * rb)[None, :] * stride_xk,
                                 mask=x_mask, other=0.0)  # (BM, BK/2)
                x_odd = tl.load(x_ptr + rm[:, None] * stride_xm + (2 * rb + 1)[None, :] * stride_xk,
                                mask=x_mask, other=0.0)
                if BLOCK_M >= 16:
                    acc += tl.dot(x_even, tl.trans(high.to(x_even.dtype)), input_precision=DOT_PRECISION)
                    acc += tl.dot(x_odd, tl.trans(low.to(x_odd.dtype)), input_precision=DOT_PRECISION)
                else:
                    acc += tl.sum(x_even.to(tl.float32)[:, None, :] * high.to(tl.float32)[None, :, :], axis=2)
                    acc += tl.sum(x_odd.to(tl.float32)[:, None, :] * low.to(tl.float32)[None, :, :], axis=2)
        scale = tl.load(scale_ptr + rn, mask=n_ok, other=0.0).to(tl.float32)
        acc = acc * scale[None, :]
        out_ptrs = out_ptr + rm[:, None] * stride_om + rn[None, :] * stride_on
        out_mask = m_ok[:, None] & n_ok[None, :]
        if SPLIT_K == 1:
            if HAS_BIAS:
                acc += tl.load(bias_ptr + rn, mask=n_ok, other=0.0).to(tl.float32)[None, :]
            tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=out_mask)
        else:
            tl.atomic_add(out_ptrs, acc, mask=out_mask)  # fp32 buffer; bias and cast happen after


def int_linear(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None,
               bits: int, config: KernelConfig | None = None) -> torch.Tensor:
    """x (..., in) @ dequant(weight)^T + bias -> (..., out) in x's dtype; weight (out, in*bits/8) int8."""
    if triton is None:
        raise RuntimeError("Triton is not installed; use glmkit.quantization.quantized_matmul, which falls back")
    if bits not in (4, 8):
        raise ValueError(f"quantization bits must be 4 or 8, got {bits!r}")
    if weight.dtype != torch.int8 or weight.dim() != 2:
        raise ValueError(f"quantized weight must be a 2-D int8 tensor, got {weight.dtype} {tuple(weight.shape)}")
    n = weight.shape[0]
    k = weight.shape[1] * 8 // bits
    if x.shape[-1] != k:
        raise ValueError(f"input has {x.shape[-1]} features but the INT{bits} weight {tuple(weight.shape)} "
                         f"takes {k}")
    if scale.shape != (n,):
        raise ValueError(f"scale has shape {tuple(scale.shape)}, expected ({n},)")
    lead = x.shape[:-1]
    x2 = x.reshape(-1, k)  # (m, k); strides are passed, so no copy is needed for a view
    m = x2.shape[0]
    config = config or default_config(m, n, k, bits)
    precision = "ieee" if x.dtype == torch.float32 else "tf32"  # tf32 only matters for fp32 inputs
    if config.split_k == 1:
        out = torch.empty(m, n, dtype=x.dtype, device=x.device)
    else:
        out = torch.zeros(m, n, dtype=torch.float32, device=x.device)
    grid = (triton.cdiv(n, config.block_n), triton.cdiv(m, config.block_m), config.split_k)
    _int_linear_kernel[grid](
        x2, weight, scale, bias if bias is not None else scale, out, m, n, k,
        x2.stride(0), x2.stride(1), weight.stride(0), weight.stride(1), out.stride(0), out.stride(1),
        BITS=bits, HAS_BIAS=bias is not None, BLOCK_M=config.block_m, BLOCK_N=config.block_n,
        BLOCK_K=config.block_k, SPLIT_K=config.split_k, DOT_PRECISION=precision,
        num_warps=config.num_warps, num_stages=config.num_stages)
    if config.split_k > 1:
        if bias is not None:
            out += bias.float()
        out = out.to(x.dtype)
    return out.reshape(*lead, n)
