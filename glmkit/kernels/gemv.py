"""Weight-only INT4/INT8 GEMV for decoding one row at a time: one 32-bit word of the weight per asm call.

At batch 1 the tensor-core tile of `glmkit.kernels.quant` pads one row to 16, unpacks the weight to fp16
and converts that tile into the MMA operand layout through shared memory: on an H200 it streamed GLM-130B's
INT4 weights at 1.6-2.4 TB/s, a third to a half of the card's copy rate. Here a program reads (BLOCK_N,
BLOCK_W) 32-bit words of the stored weight (eight INT4 values, byte i of a row holding column 2i in its high
nibble and 2i+1 in its low one; or four int8 values) and multiplies each word by its x values in registers:
no padding, no layout conversion, the stored format unchanged. Each thread keeps a (BLOCK_N, BLOCK_W) fp32
partial sum and reduces over the input once, at the end (docs/benchmarks.md has the measurements).

MATH picks how a word becomes its products, all on CUDA cores:
  0  shifts, fp32 products: runs in Triton's interpreter (the CPU tests) and is the other modes' reference
  1  inline PTX, exact (bf16 and fp32 inputs): each field is OR-ed into the low mantissa of 2^23 with its
     sign bit flipped, so one `lop3` and one subtract give q * 2^(b*p) exactly in fp32 (p: the field's place
     in its 16-bit half, b its width); products and sums are fp32, the 2^(b*p) factors removed once per word.
     For INT4 about 3.5 instructions a value, which makes it bound by instructions: 0.8x the speed of MATH 2.
  2  inline PTX, fp16 products (fp16 inputs): `lop3` (INT4) or xor + `prmt` (INT8) and one f16x2 fma give
     two exact fp16 values q / 64 (INT4) or q / 1024 (INT8) (the magic-number trick of glmkit.kernels.quant),
     f16x2 fmas sum the word's products in two fp16 lanes, then one fp32 add: INT4 about 2.2 instructions a
     value. Each product is rounded to fp16 (as the dequantize + matmul path rounds each weight), and the
     power-of-two divisor keeps a word's fp16 sums below 65504 for every fp16 x (INT4: 8 * 4 * 65504 / 64 =
     32752; INT8: 2 * 128 * 65504 / 1024 = 16376), so nothing overflows; it is multiplied back in fp32.

The grid is (rows, output tiles, K splits); with SPLIT_K > 1 programs sum into an fp32 buffer atomically.
"""
from __future__ import annotations

import os
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from .quant import KernelConfig

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: glmkit.quantization falls back to dequantize + F.linear
    triton = None
    tl = None

if triton is not None:

    @triton.jit
    def _int4_dot_exact(word, x0, x1, x2, x3, x4, x5, x6, x7):
        """sum_c x_c * q_c over the eight INT4 nibbles of `word`, fp32 throughout (MATH 1)."""
        # Nibble places in a 16-bit half: 0 -> column 1 (low nibble of byte 0), 1 -> column 0, 2 -> column 3,
        # 3 -> column 2; the high half (word >> 16) holds columns 5, 4, 7, 6 the same way. The lop3 LUT 0x6A
        # takes the masked bits from the word, flipping the nibble's top bit (q + 8), the rest from 2^23.
        return tl.inline_asm_elementwise(
            """{
            .reg .b32 hi, f<8>;
            .reg .f32 a<4>, r;
            shr.b32 hi, $1, 16;
            lop3.b32 f0, $1, 0x0000000F, 0x4B000008, 0x6A;
            lop3.b32 f1, $1, 0x000000F0, 0x4B000080, 0x6A;
            lop3.b32 f2, $1, 0x00000F00, 0x4B000800, 0x6A;
            lop3.b32 f3, $1, 0x0000F000, 0x4B008000, 0x6A;
            lop3.b32 f4, hi, 0x0000000F, 0x4B000008, 0x6A;
            lop3.b32 f5, hi, 0x000000F0, 0x4B000080, 0x6A;
            lop3.b32 f6, hi, 0x00000F00, 0x4B000800, 0x6A;
            lop3.b32 f7, hi, 0x0000F000, 0x4B008000, 0x6A;
            sub.f32 f0, f0, 0f4B000008;
            sub.f32 f1, f1, 0f4B000080;
            sub.f32 f2, f2, 0f4B000800;
            sub.f32 f3, f3, 0f4B008000;
            sub.f32 f4, f4, 0f4B000008;
            sub.f32 f5, f5, 0f4B000080;
            sub.f32 f6, f6, 0f4B000800;
            sub.f32 f7, f7, 0f4B008000;
            mul.f32 a0, $3, f0;
            fma.rn.f32 a0, $7, f4, a0;
            mul.f32 a1, $2, f1;
            fma.rn.f32 a1, $6, f5, a1;
            mul.f32 a2, $5, f2;
            fma.rn.f32 a2, $9, f6, a2;
            mul.f32 a3, $4, f3;
            fma.rn.f32 a3, $8, f7, a3;
            fma.rn.f32 r, a3, 0f3D800000, a2;
            fma.rn.f32 r, r, 0f3D800000, a1;
            fma.rn.f32 $0, r, 0f3D800000, a0;
            }""",
            "=f,r,f,f,f,f,f,f,f,f", [word, x0, x1, x2, x3, x4, x5, x6, x7], dtype=tl.float32, is_pure=True,
            pack=1)

    @triton.jit
    def _pair_columns(x01, x23, x45, x67):
        """x as half2 words (x0, x1) .. (x6, x7) -> (x0, x4), (x1, x5), (x2, x6), (x3, x7), the pairs
        `_int4_dot_fp16` extracts from one word without moving nibbles between its 16-bit halves."""
        return tl.inline_asm_elementwise(
            """{
            prmt.b32 $0, $4, $6, 0x5410;
            prmt.b32 $1, $4, $6, 0x7632;
            prmt.b32 $2, $5, $7, 0x5410;
            prmt.b32 $3, $5, $7, 0x7632;
            }""",
            "=r,=r,=r,=r,r,r,r,r", [x01, x23, x45, x67], dtype=(tl.int32, tl.int32, tl.int32, tl.int32),
            is_pure=True, pack=1)

    @triton.jit
    def _int4_dot_fp16(word, x04, x15, x26, x37):
        """sum_c x_c * q_c / 64 over the eight nibbles of `word`, fp16 products (MATH 2); x paired by
        `_pair_columns`."""
        # Columns 0 and 4 are the high nibbles of bytes 0 and 2 (bits 4-7 of each 16-bit half), columns 1 and
        # 5 the low ones; word >> 8 puts columns 2, 6 and 3, 7 in the same places. lop3 turns a nibble into
        # 1024 + 16u (high) or 1024 + u (low), u = q + 8, and one f16x2 fma gives q / 64 exactly: the 1/64
        # keeps a word's four-product fp16 sums below 65504 for every fp16 x (8 * 4 * 65504 / 64 = 32752).
        return tl.inline_asm_elementwise(
            """{
            .reg .b32 h, qa, qb, qc, qd, mh, sh, ml, sl, acc;
            .reg .b16 lo, hi;
            .reg .f32 flo, fhi;
            mov.b32 mh, 0x14001400;
            mov.b32 sh, 0xBC80BC80;
            mov.b32 ml, 0x24002400;
            mov.b32 sl, 0xCC08CC08;
            shr.b32 h, $1, 8;
            lop3.b32 qa, $1, 0x00F000F0, 0x64806480, 0x6A;
            lop3.b32 qb, $1, 0x000F000F, 0x64086408, 0x6A;
            lop3.b32 qc, h, 0x00F000F0, 0x64806480, 0x6A;
            lop3.b32 qd, h, 0x000F000F, 0x64086408, 0x6A;
            fma.rn.f16x2 qa, qa, mh, sh;
            fma.rn.f16x2 qb, qb, ml, sl;
            fma.rn.f16x2 qc, qc, mh, sh;
            fma.rn.f16x2 qd, qd, ml, sl;
            mul.rn.f16x2 acc, $2, qa;
            fma.rn.f16x2 acc, $3, qb, acc;
            fma.rn.f16x2 acc, $4, qc, acc;
            fma.rn.f16x2 acc, $5, qd, acc;
            mov.b32 {lo, hi}, acc;
            cvt.f32.f16 flo, lo;
            cvt.f32.f16 fhi, hi;
            add.f32 $0, flo, fhi;
            }""",
            "=f,r,r,r,r,r", [word, x04, x15, x26, x37], dtype=tl.float32, is_pure=True, pack=1)

    @triton.jit
    def _int8_dot_exact(word, x0, x1, x2, x3):
        """sum_c x_c * q_c over the four int8 bytes of `word`, fp32 throughout (MATH 1)."""
        # Bytes 0 and 2 (column 0, and column 2 after word >> 16) land in the mantissa of 2^23 as u = q + 128,
        # bytes 1 and 3 as 256u; one subtract each gives q or 256q exactly.
        return tl.inline_asm_elementwise(
            """{
            .reg .b32 hi, f<4>;
            .reg .f32 a0, a1;
            shr.b32 hi, $1, 16;
            lop3.b32 f0, $1, 0x000000FF, 0x4B000080, 0x6A;
            lop3.b32 f1, $1, 0x0000FF00, 0x4B008000, 0x6A;
            lop3.b32 f2, hi, 0x000000FF, 0x4B000080, 0x6A;
            lop3.b32 f3, hi, 0x0000FF00, 0x4B008000, 0x6A;
            sub.f32 f0, f0, 0f4B000080;
            sub.f32 f1, f1, 0f4B008000;
            sub.f32 f2, f2, 0f4B000080;
            sub.f32 f3, f3, 0f4B008000;
            mul.f32 a0, $2, f0;
            fma.rn.f32 a0, $4, f2, a0;
            mul.f32 a1, $3, f1;
            fma.rn.f32 a1, $5, f3, a1;
            fma.rn.f32 $0, a1, 0f3B800000, a0;
            }""",
            "=f,r,f,f,f,f", [word, x0, x1, x2, x3], dtype=tl.float32, is_pure=True, pack=1)

    @triton.jit
    def _int8_dot_fp16(word, x01, x23):
        """sum_c x_c * q_c / 1024 over the four int8 bytes of `word`, fp16 products (MATH 2); x as half2."""
        # xor makes each byte u = q + 128; prmt puts bytes 0, 1 (then 2, 3) under the exponent byte 0x64, the
        # fp16 values 1024 + u; one f16x2 fma gives q / 1024 exactly, which keeps the two-product fp16 sums
        # below 65504 for every fp16 x (2 * 128 * 65504 / 1024 = 16376).
        return tl.inline_asm_elementwise(
            """{
            .reg .b32 u, e, lo, hi, m, s, acc;
            .reg .b16 l16, h16;
            .reg .f32 fl, fh;
            mov.b32 e, 0x64646464;
            mov.b32 m, 0x14001400;
            mov.b32 s, 0xBC80BC80;
            xor.b32 u, $1, 0x80808080;
            prmt.b32 lo, u, e, 0x5140;
            prmt.b32 hi, u, e, 0x7362;
            fma.rn.f16x2 lo, lo, m, s;
            fma.rn.f16x2 hi, hi, m, s;
            mul.rn.f16x2 acc, $2, lo;
            fma.rn.f16x2 acc, $3, hi, acc;
            mov.b32 {l16, h16}, acc;
            cvt.f32.f16 fl, l16;
            cvt.f32.f16 fh, h16;
            add.f32 $0, fl, fh;
            }""",
            "=f,r,r,r", [word, x01, x23], dtype=tl.float32, is_pure=True, pack=1)

    @triton.jit
    def _field(word, column: tl.constexpr, BITS: tl.constexpr):
        """Signed value of `column` of each int32 word by shifts: INT8 byte c; INT4 byte c//2, its high nibble
        for even c."""
        if BITS == 8:
            shift: tl.constexpr = 8 * column
        else:
            shift: tl.constexpr = 8 * (column // 2) + 4 * (1 - column % 2)
        return ((word << (32 - BITS - shift)) >> (32 - BITS)).to(tl.float32)

    @triton.jit
    def _x_column(x_row, rw, w_ok, column: tl.constexpr, PER_WORD: tl.constexpr):
        """x values of `column` of each word in rw, as fp32 (1, BLOCK_W)."""
        return tl.load(x_row + PER_WORD * rw + column, mask=w_ok, other=0.0).to(tl.float32)[None, :]

    @triton.jit
    def _word_dots(words, x_row, rw, w_ok, BITS: tl.constexpr, MATH: tl.constexpr):
        """(BN, BW) fp32: each word's products with its x values (INT4: 8 a word, INT8: 4), summed."""
        shape: tl.constexpr = words.shape
        if MATH == 2:  # x_row points at half2 words of x
            if BITS == 4:
                x04, x15, x26, x37 = _pair_columns(tl.load(x_row + 4 * rw, mask=w_ok, other=0),
                                                   tl.load(x_row + 4 * rw + 1, mask=w_ok, other=0),
                                                   tl.load(x_row + 4 * rw + 2, mask=w_ok, other=0),
                                                   tl.load(x_row + 4 * rw + 3, mask=w_ok, other=0))
                dots = _int4_dot_fp16(words, tl.broadcast_to(x04[None, :], shape),
                                      tl.broadcast_to(x15[None, :], shape), tl.broadcast_to(x26[None, :], shape),
                                      tl.broadcast_to(x37[None, :], shape))
            else:
                x01 = tl.load(x_row + 2 * rw, mask=w_ok, other=0)[None, :]
                x23 = tl.load(x_row + 2 * rw + 1, mask=w_ok, other=0)[None, :]
                dots = _int8_dot_fp16(words, tl.broadcast_to(x01, shape), tl.broadcast_to(x23, shape))
        elif BITS == 4:
            x0 = _x_column(x_row, rw, w_ok, 0, 8)
            x1 = _x_column(x_row, rw, w_ok, 1, 8)
            x2 = _x_column(x_row, rw, w_ok, 2, 8)
            x3 = _x_column(x_row, rw, w_ok, 3, 8)
            x4 = _x_column(x_row, rw, w_ok, 4, 8)
            x5 = _x_column(x_row, rw, w_ok, 5, 8)
            x6 = _x_column(x_row, rw, w_ok, 6, 8)
            x7 = _x_column(x_row, rw, w_ok, 7, 8)
            if MATH == 1:
                dots = _int4_dot_exact(words, tl.broadcast_to(x0, shape), tl.broadcast_to(x1, shape),
                                       tl.broadcast_to(x2, shape), tl.broadcast_to(x3, shape),
                                       tl.broadcast_to(x4, shape), tl.broadcast_to(x5, shape),
                                       tl.broadcast_to(x6, shape), tl.broadcast_to(x7, shape))
            else:
                dots = (x0 * _field(words, 0, 4) + x1 * _field(words, 1, 4) + x2 * _field(words, 2, 4)
                        + x3 * _field(words, 3, 4) + x4 * _field(words, 4, 4) + x5 * _field(words, 5, 4)
                        + x6 * _field(words, 6, 4) + x7 * _field(words, 7, 4))
        else:
            x0 = _x_column(x_row, rw, w_ok, 0, 4)
            x1 = _x_column(x_row, rw, w_ok, 1, 4)
            x2 = _x_column(x_row, rw, w_ok, 2, 4)
            x3 = _x_column(x_row, rw, w_ok, 3, 4)
            if MATH == 1:
                dots = _int8_dot_exact(words, tl.broadcast_to(x0, shape), tl.broadcast_to(x1, shape),
                                       tl.broadcast_to(x2, shape), tl.broadcast_to(x3, shape))
            else:
                dots = (x0 * _field(words, 0, 8) + x1 * _field(words, 1, 8) + x2 * _field(words, 2, 8)
                        + x3 * _field(words, 3, 8))
        return dots

    @triton.jit
    def _gemv_kernel(x_ptr, w_ptr, scale_ptr, bias_ptr, out_ptr, N, KW, stride_xm, stride_wn, stride_om,
                     BITS: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_W: tl.constexpr,
                     SPLIT_K: tl.constexpr, MATH: tl.constexpr):
        # KW: 32-bit words per weight row (in_features * BITS / 32). x_ptr is x's elements for MATH 0 and 1,
        # its half2 words for MATH 2 (stride_xm in those units).
        pid_m = tl.program_id(0)
        pid_n = tl.program_id(1)
        pid_k = tl.program_id(2)
        rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        n_ok = rn < N
        x_row = x_ptr + pid_m * stride_xm
        acc = tl.zeros((BLOCK_N, BLOCK_W), dtype=tl.float32)
        for w0 in range(pid_k * BLOCK_W, KW, BLOCK_W * SPLIT_K):
            rw = w0 + tl.arange(0, BLOCK_W)
            w_ok = rw < KW
            words = tl.load(w_ptr + rn[:, None] * stride_wn + rw[None, :],
                            mask=n_ok[:, None] & w_ok[None, :], other=0)  # (BN, BW) int32
            acc += _word_dots(words, x_row, rw, w_ok, BITS, MATH)
        total = tl.sum(acc, axis=1) * tl.load(scale_ptr + rn, mask=n_ok, other=0.0).to(tl.float32)
        if MATH == 2:  # the fp16 products summed q / 64 (INT4) or q / 1024 (INT8): powers of two, exact
            total = total * (64.0 if BITS == 4 else 1024.0)
        out_ptrs = out_ptr + pid_m * stride_om + rn
        if SPLIT_K == 1:
            if HAS_BIAS:
                total += tl.load(bias_ptr + rn, mask=n_ok, other=0.0).to(tl.float32)
            tl.store(out_ptrs, total.to(out_ptr.dtype.element_ty), mask=n_ok)
        else:
            tl.atomic_add(out_ptrs, total, mask=n_ok)  # fp32 buffer; bias and cast happen after


def supports(weight: torch.Tensor) -> bool:
    """True when the GEMV can take this int8 (or INT4-packed) weight: whole 32-bit words per row, aligned."""
    return (triton is not None and weight.dim() == 2 and weight.shape[1] % 4 == 0 and weight.stride(1) == 1
            and weight.stride(0) % 4 == 0 and weight.data_ptr() % 4 == 0)


def math_mode(x: torch.Tensor, fast_unpack: bool) -> int:
    """MATH for this input: 2 (fp16 products) for fp16 on a GPU, 1 (exact PTX) for bf16/fp32 on a GPU, else 0
    (shifts: `fast_unpack` off, or Triton's interpreter, which cannot run PTX)."""
    if not fast_unpack or not x.is_cuda or os.environ.get("TRITON_INTERPRET") == "1":
        return 0
    if x.dtype == torch.float16:
        return 2 if x.data_ptr() % 4 == 0 and x.stride(0) % 2 == 0 else 1  # half2 words need aligned rows
    return 1 if x.dtype in (torch.bfloat16, torch.float32) else 0


def int_gemv(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None, bits: int,
             config: "KernelConfig", math: int | None = None) -> torch.Tensor:
    """x (m, in) @ dequant(weight)^T + bias -> (m, out) for an int8 weight (out, in * bits / 8).

    glmkit.kernels.quant.int_linear calls it for configs with block_m == 1, after checking the shapes;
    `supports` must hold. Of `config` it takes block_n, block_k (input features per step), split_k,
    num_warps, num_stages and fast_unpack. `math` forces a MATH mode (scripts/bench_gemv.py compares
    them); by default `math_mode` picks it from the input.
    """
    n, k = weight.shape[0], weight.shape[1] * 8 // bits
    if x.stride(-1) != 1:
        x = x.contiguous()
    m = x.shape[0]
    math = math_mode(x, config.fast_unpack) if math is None else math
    if math == 2 and (x.dtype != torch.float16 or math_mode(x, True) != 2):
        raise ValueError("GEMV math 2 (fp16 products) needs fp16 x with 4-byte aligned rows on a GPU")
    words = weight.view(torch.int32)  # (out, in * bits / 32): the bytes in memory order
    x_arg, stride_xm = (x.view(torch.int32), x.stride(0) // 2) if math == 2 else (x, x.stride(0))
    if config.split_k == 1:
        out = torch.empty(m, n, dtype=x.dtype, device=x.device)
    else:
        out = torch.zeros(m, n, dtype=torch.float32, device=x.device)
    grid = (m, triton.cdiv(n, config.block_n), config.split_k)
    _gemv_kernel[grid](x_arg, words, scale, bias if bias is not None else scale, out, n, words.shape[1],
                       stride_xm, words.stride(0), out.stride(0), BITS=bits, HAS_BIAS=bias is not None,
                       BLOCK_N=config.block_n, BLOCK_W=max(1, config.block_k * bits // 32),
                       SPLIT_K=config.split_k, MATH=math, num_warps=config.num_warps,
                       num_stages=config.num_stages)
    if config.split_k > 1:
        if bias is not None:
            out += bias.float()
        out = out.to(x.dtype)
    return out
