"""Triton kernels for weight-only INT8/INT4 linear layers: dequantize in registers, accumulate in fp32.

    y = x @ (q * scale[:, None])^T + bias  =  (x @ q^T) * scale + bias

so the integer weight is read once from memory, converted in registers, and the per-output-row scale is
applied once to the fp32 accumulator. Decoding reads every weight once per token, so at batch 1-32 the
kernel is bound by the bytes of `q`: INT8 halves them and INT4 quarters them against fp16.

One kernel serves both shapes of the problem, chosen by `KernelConfig.block_m`:
  block_m == 1   the word-at-a-time GEMV of glmkit.kernels.gemv (one program per row and output tile)
  block_m < 16   GEMV-like: broadcast multiply and reduce over K on CUDA cores (a few rows; one row too when
                 a weight row is not whole 32-bit words)
  block_m >= 16  tl.dot on the int weights converted to x's dtype (exact: |q| <= 127); smaller batches are
                 padded to 16 rows, which costs tensor-core time but no extra weight traffic
`split_k > 1` splits the input dimension over programs and sums with fp32 atomics, which gives enough
programs to fill the GPU when the output dimension is small (row-parallel shards).

INT4 unpacking is where the time goes: at batch 1 the kernel must turn 8 nibbles into 8 fp16 values for
every 4 bytes it reads, and with plain shifts and int->float conversions (4-5 instructions a value) it is
bound by instructions, not memory (37-44 % of copy bandwidth on an H100). On a GPU with fp16/bf16 inputs,
`_unpack_int4` uses the magic-number conversion in inline PTX instead: a nibble u placed in the low
mantissa bits of 1024.0 (0x6400) is the fp16 value 1024 + u, so one `lop3` (mask, or with 0x6400, and
flip of the sign bit, which turns two's complement q into u = q + 8) makes two fp16 values at once and
one packed fp16 subtract or fma removes the offset: about 1.3 instructions a value, all exact.

Launch parameters: `default_config` takes a configuration tuned for the exact (bits, out, in) shape and
row count from `configs/int_kernels.json` (written by `scripts/bench_quant.py kernels --write-configs`
on a GPU), else the generic DEFAULT_CONFIGS by row count.

The kernels run on the CPU under TRITON_INTERPRET=1 (the tests do this, with the portable unpacking);
`glmkit.quantization` falls back to dequantize + F.linear when Triton is missing or the input is on the CPU.
"""
from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from ..config import CONFIG_DIR
from . import gemv

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
    fast_unpack: bool = True  # INT4 with fp16/bf16 inputs on a GPU: inline-PTX unpacking (see module doc)
    int4_join: bool = True  # INT4: one product over interleaved nibbles (else two over strided x columns)

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
    (1, KernelConfig(block_m=1, block_n=32, block_k=512, num_warps=4)),  # INT4: INT4_GEMV_DEFAULT
    (16, KernelConfig(block_m=16, block_n=64, block_k=128, num_warps=4)),
    (32, KernelConfig(block_m=32, block_n=64, block_k=128, num_warps=4)),
    (64, KernelConfig(block_m=64, block_n=64, block_k=64, num_warps=4, num_stages=3)),
]
# INT4 at one row: the GEMV tile that won most GLM-130B shapes on an H200 (docs/benchmarks.md)
INT4_GEMV_DEFAULT = KernelConfig(block_m=1, block_n=16, block_k=1024, num_warps=4, num_stages=3)

TUNED_CONFIGS_PATH = CONFIG_DIR / "int_kernels.json"
# (bits, out_features, in_features) -> [(max rows, config)] in increasing order of rows.
_tuned: dict[tuple[int, int, int], list[tuple[int, KernelConfig]]] | None = None


def load_tuned_configs(path: str | Path | None = None) -> int:
    """Use the tuned launch parameters in `path` (default: the shipped configs/int_kernels.json).

    The file holds {"device": ..., "configs": [{"bits", "out_features", "in_features", "max_rows",
    "device", "config": {KernelConfig fields}}, ...]} ("device" only says where an entry was tuned).
    Returns how many entries were loaded; a missing default file means none (generic defaults apply), a
    missing explicit path is an error.
    """
    global _tuned
    explicit = path is not None
    path = Path(path) if explicit else TUNED_CONFIGS_PATH
    table: dict[tuple[int, int, int], list[tuple[int, KernelConfig]]] = {}
    if path.exists() or explicit:
        try:
            entries = json.loads(path.read_text())["configs"]
            for entry in entries:
                key = (int(entry["bits"]), int(entry["out_features"]), int(entry["in_features"]))
                table.setdefault(key, []).append((int(entry["max_rows"]), KernelConfig(**entry["config"])))
        except FileNotFoundError:
            raise FileNotFoundError(f"kernel config file {path} does not exist; write one with "
                                    f"scripts/bench_quant.py kernels --write-configs {path}") from None
        except (KeyError, TypeError, ValueError) as error:
            raise ValueError(f"{path} is not a kernel config file ({error}); expected {{'configs': [{{'bits', "
                             f"'out_features', 'in_features', 'max_rows', 'config': {{...}}}}]}}") from None
    for choices in table.values():
        choices.sort(key=lambda item: item[0])
    _tuned = table
    return sum(len(choices) for choices in table.values())


def tuned_config_entries(results: list[tuple[int, int, int, int, KernelConfig]], device: str) -> dict:
    """The JSON document load_tuned_configs reads, from (bits, out, in, max_rows, config) tuples; each entry
    names the card it was tuned on (a file merged over several runs can mix cards)."""
    return {"device": device, "configs": [
        {"bits": bits, "out_features": out, "in_features": inp, "max_rows": rows, "device": device,
         "config": asdict(config)}
        for bits, out, inp, rows, config in results]}


def default_config(rows: int, out_features: int, in_features: int, bits: int) -> KernelConfig:
    """Launch parameters: the tuned entry for this shape covering `rows`, else DEFAULT_CONFIGS by rows."""
    if _tuned is None:
        load_tuned_configs()
    for max_rows, config in _tuned.get((bits, out_features, in_features), ()):
        if rows <= max_rows:
            return config
    if bits == 4 and rows == 1:
        return INT4_GEMV_DEFAULT
    for max_rows, config in DEFAULT_CONFIGS:
        if rows <= max_rows:
            return config
    return DEFAULT_CONFIGS[-1][1]


if triton is not None:

    @triton.jit
    def _unpack_int4(packed, FAST_UNPACK: tl.constexpr):
        """(high, low) nibbles of int8 bytes as signed values: byte i holds columns 2i (high) and 2i+1 (low).

        FAST_UNPACK 1 and 2 give fp16 and bf16 through inline PTX (the module docstring explains the
        constants); 0 gives int32 through shifts, which also runs in the interpreter.
        """
        if FAST_UNPACK == 1:
            # lop3 LUT 0x6A = (~b & c) | (b & (a ^ c)): bits in mask b come from a (flipped where c is set),
            # the others are c. High nibbles land at 1024 + 16u: fma with 1/16 and -72 gives q = u - 8.
            high, low = tl.inline_asm_elementwise(
                """{
                .reg .b32 z, d01, d23, m, s;
                mov.b32 z, 0;
                prmt.b32 d01, $4, z, 0x4140;
                prmt.b32 d23, $4, z, 0x4342;
                lop3.b32 $0, d01, 0x00F000F0, 0x64806480, 0x6A;
                lop3.b32 $1, d23, 0x00F000F0, 0x64806480, 0x6A;
                lop3.b32 $2, d01, 0x000F000F, 0x64086408, 0x6A;
                lop3.b32 $3, d23, 0x000F000F, 0x64086408, 0x6A;
                mov.b32 m, 0x2C002C00;
                mov.b32 s, 0xD480D480;
                fma.rn.f16x2 $0, $0, m, s;
                fma.rn.f16x2 $1, $1, m, s;
                mov.b32 s, 0x64086408;
                sub.f16x2 $2, $2, s;
                sub.f16x2 $3, $3, s;
                }""",
                "=r,=r,=r,=r,r", [packed], dtype=(tl.float16, tl.float16), is_pure=True, pack=4)
        elif FAST_UNPACK == 2:
            # bf16 has 7 mantissa bits: shift high nibbles down first; 128 + u minus 136 gives q.
            high, low = tl.inline_asm_elementwise(
                """{
                .reg .b32 z, d01, d23, h01, h23, one, s;
                mov.b32 z, 0;
                prmt.b32 d01, $4, z, 0x4140;
                prmt.b32 d23, $4, z, 0x4342;
                shr.b32 h01, d01, 4;
                shr.b32 h23, d23, 4;
                lop3.b32 $0, h01, 0x000F000F, 0x43084308, 0x6A;
                lop3.b32 $1, h23, 0x000F000F, 0x43084308, 0x6A;
                lop3.b32 $2, d01, 0x000F000F, 0x43084308, 0x6A;
                lop3.b32 $3, d23, 0x000F000F, 0x43084308, 0x6A;
                mov.b32 one, 0x3F803F80;
                mov.b32 s, 0xC308C308;
                fma.rn.bf16x2 $0, $0, one, s;
                fma.rn.bf16x2 $1, $1, one, s;
                fma.rn.bf16x2 $2, $2, one, s;
                fma.rn.bf16x2 $3, $3, one, s;
                }""",
                "=r,=r,=r,=r,r", [packed], dtype=(tl.bfloat16, tl.bfloat16), is_pure=True, pack=4)
        else:
            wide = packed.to(tl.int32)  # sign-extends, so arithmetic shifts recover signed nibbles
            high = wide >> 4
            low = (wide << 28) >> 28
        return high, low

    @triton.jit
    def _dequantize_kernel(w_ptr, scale_ptr, out_ptr, N, K, stride_wn, stride_on, BITS: tl.constexpr,
                           FAST_UNPACK: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
        rn = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        rk = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
        n_ok, k_ok = rn < N, rk < K
        if BITS == 8:
            w = tl.load(w_ptr + rn[:, None] * stride_wn + rk[None, :], mask=n_ok[:, None] & k_ok[None, :], other=0)
        else:
            rb = tl.program_id(1) * (BLOCK_K // 2) + tl.arange(0, BLOCK_K // 2)
            packed = tl.load(w_ptr + rn[:, None] * stride_wn + rb[None, :],
                             mask=n_ok[:, None] & (rb < K // 2)[None, :], other=0)
            high, low = _unpack_int4(packed, FAST_UNPACK)
            w = tl.reshape(tl.join(high, low), (BLOCK_N, BLOCK_K))
        scale = tl.load(scale_ptr + rn, mask=n_ok, other=0.0)
        dtype = out_ptr.dtype.element_ty
        # dequantize_weight multiplies in the target dtype: q and the scale converted, product rounded once.
        value = w.to(dtype).to(tl.float32) * scale.to(dtype).to(tl.float32)[:, None]
        tl.store(out_ptr + rn[:, None] * stride_on + rk[None, :], value.to(dtype), mask=n_ok[:, None] & k_ok[None, :])

    @triton.jit
    def _int_linear_kernel(x_ptr, w_ptr, scale_ptr, bias_ptr, out_ptr, M, N, K,
                           stride_xm, stride_xk, stride_wn, stride_wk, stride_om, stride_on,
                           BITS: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr,
                           BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr,
                           DOT_PRECISION: tl.constexpr, FAST_UNPACK: tl.constexpr, INT4_JOIN: tl.constexpr):
        # Grid: (row tiles, output tiles, K splits). Row tiles vary fastest, so the programs sharing a weight
        # tile run together and read it from L2 after the first (prefill: many row tiles). K counts logical
        # input features (INT4: 2 per byte).
        pid_m = tl.program_id(0)
        pid_n = tl.program_id(1)
        pid_k = tl.program_id(2)
        rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        m_ok = rm < M
        n_ok = rn < N
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(pid_k * BLOCK_K, K, BLOCK_K * SPLIT_K):
            rk = k0 + tl.arange(0, BLOCK_K)
            k_ok = rk < K
            if BITS == 8 or INT4_JOIN:
                # x is read contiguously (vectorised loads); an INT4 weight is unpacked and its two
                # nibble planes interleaved back into (BN, BK) column order, so both widths share one product.
                x = tl.load(x_ptr + rm[:, None] * stride_xm + rk[None, :] * stride_xk,
                            mask=m_ok[:, None] & k_ok[None, :], other=0.0)  # (BM, BK)
                if BITS == 8:
                    w = tl.load(w_ptr + rn[:, None] * stride_wn + rk[None, :] * stride_wk,
                                mask=n_ok[:, None] & k_ok[None, :], other=0)  # (BN, BK) int8
                else:
                    # Byte i of a row holds columns 2i (high nibble) and 2i+1 (low nibble), both signed.
                    rb = k0 // 2 + tl.arange(0, BLOCK_K // 2)
                    packed = tl.load(w_ptr + rn[:, None] * stride_wn + rb[None, :] * stride_wk,
                                     mask=n_ok[:, None] & (rb < K // 2)[None, :], other=0)  # (BN, BK/2) int8
                    high, low = _unpack_int4(packed, FAST_UNPACK)
                    w = tl.reshape(tl.join(high, low), (BLOCK_N, BLOCK_K))  # [..., 2i] high, [..., 2i+1] low
                if BLOCK_M >= 16:
                    acc += tl.dot(x, tl.trans(w.to(x.dtype)), input_precision=DOT_PRECISION)
                else:
                    acc += tl.sum(x.to(tl.float32)[:, None, :] * w.to(tl.float32)[None, :, :], axis=2)
            else:
                # INT4 as two half-width products: x's even and odd columns (strided loads) against the
                # high and low nibble planes. Kept for comparison in scripts/bench_quant.py.
                rb = k0 // 2 + tl.arange(0, BLOCK_K // 2)
                b_ok = rb < K // 2
                packed = tl.load(w_ptr + rn[:, None] * stride_wn + rb[None, :] * stride_wk,
                                 mask=n_ok[:, None] & b_ok[None, :], other=0)  # (BN, BK/2) int8
                high, low = _unpack_int4(packed, FAST_UNPACK)
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


def _unpack_mode(bits: int, dtype: torch.dtype, on_gpu: bool) -> int:
    """The kernels' FAST_UNPACK: 1 (fp16) or 2 (bf16) for INT4 through inline PTX on a real GPU, else 0
    (shifts: other dtypes, INT8, and Triton's interpreter, which cannot run PTX)."""
    if bits != 4 or not on_gpu or os.environ.get("TRITON_INTERPRET") == "1":
        return 0
    return {torch.float16: 1, torch.bfloat16: 2}.get(dtype, 0)


def dequantize(weight: torch.Tensor, scale: torch.Tensor, bits: int, dtype: torch.dtype) -> torch.Tensor:
    """The float weight (out, in) in `dtype` of an int8 / INT4-packed weight: q * scale, rounded once.

    One kernel instead of the unpacking ops of glmkit.quantization.dequantize_weight (same values), for
    prefill on a GPU, which multiplies many rows by the dequantized weight with cuBLAS.
    """
    if triton is None:
        raise RuntimeError("Triton is not installed; use glmkit.quantization.dequantize_weight")
    n, k = weight.shape[0], weight.shape[1] * 8 // bits
    out = torch.empty(n, k, dtype=dtype, device=weight.device)
    fast_unpack = _unpack_mode(bits, dtype, weight.is_cuda)
    block_n, block_k = 16, 256
    grid = (triton.cdiv(n, block_n), triton.cdiv(k, block_k))
    _dequantize_kernel[grid](weight, scale, out, n, k, weight.stride(0), out.stride(0), BITS=bits,
                             FAST_UNPACK=fast_unpack, BLOCK_N=block_n, BLOCK_K=block_k, num_warps=4)
    return out


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
    if config.block_m == 1 and gemv.supports(weight):
        return gemv.int_gemv(x2, weight, scale, bias, bits, config).reshape(*lead, n)
    precision = "ieee" if x.dtype == torch.float32 else "tf32"  # tf32 only matters for fp32 inputs
    fast_unpack = _unpack_mode(bits, x.dtype, x.is_cuda) if config.fast_unpack else 0
    if config.split_k == 1:
        out = torch.empty(m, n, dtype=x.dtype, device=x.device)
    else:
        out = torch.zeros(m, n, dtype=torch.float32, device=x.device)
    grid = (triton.cdiv(m, config.block_m), triton.cdiv(n, config.block_n), config.split_k)
    _int_linear_kernel[grid](
        x2, weight, scale, bias if bias is not None else scale, out, m, n, k,
        x2.stride(0), x2.stride(1), weight.stride(0), weight.stride(1), out.stride(0), out.stride(1),
        BITS=bits, HAS_BIAS=bias is not None, BLOCK_M=config.block_m, BLOCK_N=config.block_n,
        BLOCK_K=config.block_k, SPLIT_K=config.split_k, DOT_PRECISION=precision, FAST_UNPACK=fast_unpack,
        INT4_JOIN=config.int4_join,
        num_warps=config.num_warps, num_stages=config.num_stages)
    if config.split_k > 1:
        if bias is not None:
            out += bias.float()
        out = out.to(x.dtype)
    return out.reshape(*lead, n)
