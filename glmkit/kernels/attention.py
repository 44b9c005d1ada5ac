"""GLM attention for one decode step as one GPU kernel: rotary, KV-cache write, scores, softmax, values.

In eager PyTorch a decode step's attention is about 16 launches per layer (rotary on q and k, two cache
writes, the q scaling, two batched matmuls, the mask, the fp32 softmax and its casts, a reshape copy), each
a few microseconds of a mostly idle GPU: on an H100 about 30 us per layer against 400 us of INT4 weight
reads (scripts/profile_decode.py). `decode_attention` does all of it in one program per (sequence, head).

It follows the eager ops' roundings, so GPU and CPU decode agree up to summation order:
  q, k rotated as x*cos + rotate_half(x)*sin with each product and the sum rounded to the model dtype;
  q divided by sqrt(head_dim) * coeff and rounded (GLM-130B's overflow guard, coeff = layer index + 1);
  each score rounded to the model dtype (a half-precision matmul's output), masked with -10000,
  multiplied by coeff in fp32, softmax in fp32, probabilities rounded to the model dtype, and the
  weighted sum of values accumulated in fp32 and rounded once.
Scores go through a small fp32 scratch buffer (sequence x head x cache length), so any cache length works
with a fixed number of registers: one pass over the keys (scores, running maximum and sum), one over the
values.

One program per (sequence, head) is too few for long caches at small batches: GLM-130B's 96 heads give 96
programs for a 132-SM H200 at batch 1, each walking 2,048 cached positions twice. With `splits` > 1 the
cache is cut into that many ranges (flash-decoding): one launch scores each range and keeps its maximum
and sum, a second turns the scores into probabilities with the combined maximum and sum (the same rounded
probabilities as one program computes) and weighs the values of its range, a third adds the ranges'
fp32 partial outputs and rounds once. `choose_splits` picks the count from the batch, heads and length.
"""
from __future__ import annotations

import math

import numpy as np
import torch

# One check for both decode kernels; glmkit.model asks it here, so tests can switch attention alone.
from .norm import kernel_usable

__all__ = ["decode_attention", "kernel_usable"]

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs use the eager attention in glmkit.model
    triton = None
    tl = None

BLOCK_T = 128  # cache positions per loop step
# Split the cache until there are about this many programs per SM: on an H200 (scripts/bench_decode_attention.py,
# CUDA-graph replays, GLM-130B's 96 heads) batch 1 reads a 2,048-position cache at 2.2 TB/s with 8 ranges
# (768 programs) against 0.6 TB/s with one program per head; from batch 8 on (768 programs) one range is best.
PROGRAMS_PER_SM = 6
# A split range holds at least this many positions: shorter ranges cost more in the extra launches than they gain.
MIN_SPLIT_POSITIONS = 128
# With this many programs per SM or more the grid runs in several waves, and a program walking a long cache
# holds its slot for the whole walk, so the last wave's stragglers leave the card half idle. Ranges of at most
# MAX_WAVE_RANGE positions even the waves out: batch 32 (3,072 programs), 2,048 positions: 880 us with 4
# ranges against 962 us with one; at batch 8 (768 programs, one wave) one range stays best (247 us).
WAVE_PROGRAMS_PER_SM = 16
MAX_WAVE_RANGE = 512
# 4 warps per program beat 8 at every batch and length measured (e.g. batch 8, 2,048 positions: 3.3 against
# 2.1 TB/s): more programs fit on an SM, so more loads are in flight.
NUM_WARPS = 4
_SM_COUNT: dict[int, int] = {}


def choose_splits(rows: int, length: int, device: torch.device) -> int:
    """How many cache ranges a decode step's attention uses for `rows` (sequence x head) programs."""
    if device.type != "cuda":
        return 1
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _SM_COUNT:
        _SM_COUNT[index] = torch.cuda.get_device_properties(index).multi_processor_count
    sms = _SM_COUNT[index]
    wanted = PROGRAMS_PER_SM * sms // rows  # rounded down: batch 8 (768 programs) keeps one range
    if rows >= WAVE_PROGRAMS_PER_SM * sms:
        wanted = max(wanted, -(-length // MAX_WAVE_RANGE))
    return max(1, min(wanted, length // MIN_SPLIT_POSITIONS))


def decode_attention(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, keys: torch.Tensor,
                     values: torch.Tensor, slot: torch.Tensor, allowed: torch.Tensor, coeff: float,
                     splits: int | None = None, block_t: int = BLOCK_T, num_warps: int = NUM_WARPS) -> torch.Tensor:
    """Attention output (b, 1, heads * head_dim) of one decode step; writes k and v into the cache.

    qkv (b, 1, heads, 3, head_dim) is the fused projection; cos, sin (b, 1, 1, head_dim) the rotary
    tables; keys, values (b, heads, T, head_dim) this layer's cache; slot (1,) the cache position to
    write; allowed (b, 1, 1, T) bool the positions each sequence may attend to. `splits` cache ranges
    (None: `choose_splits`) are scored in parallel; 1 is the single-program kernel. `block_t` (cache positions
    per loop step) and `num_warps` are launch parameters (scripts/bench_decode_attention.py times them).
    """
    b, s, heads, three, hd = qkv.shape
    if s != 1 or three != 3:
        raise ValueError(f"decode_attention takes qkv of shape (b, 1, heads, 3, head_dim), got {tuple(qkv.shape)}")
    length = keys.shape[2]
    if keys.shape != (b, heads, length, hd) or values.shape != keys.shape:
        raise ValueError(f"cache keys {tuple(keys.shape)} / values {tuple(values.shape)} do not match "
                         f"qkv {tuple(qkv.shape)}")
    if allowed.shape != (b, 1, 1, length) or slot.shape != (1,):
        raise ValueError(f"allowed must be ({b}, 1, 1, {length}) and slot (1,), got {tuple(allowed.shape)} "
                         f"and {tuple(slot.shape)}")
    if splits is None:
        splits = choose_splits(b * heads, length, qkv.device)
    if splits < 1:
        raise ValueError(f"splits must be at least 1, got {splits}")
    # Each range is a whole number of BLOCK_T steps; recounting the ranges at that size leaves none empty.
    per_range = -(-length // splits)  # ceil
    chunk = -(-per_range // block_t) * block_t
    splits = -(-length // chunk)
    cos, sin = cos.expand(b, 1, 1, hd), sin.expand(b, 1, 1, hd)
    out = torch.empty(b, 1, heads * hd, dtype=qkv.dtype, device=qkv.device)
    scratch = torch.empty(b * heads, length, dtype=torch.float32, device=qkv.device)
    block_d = triton.next_power_of_2(hd)
    strides = (qkv.stride(0), qkv.stride(2), qkv.stride(3), cos.stride(0), sin.stride(0),
               keys.stride(0), keys.stride(1), keys.stride(2), values.stride(0), values.stride(1), values.stride(2),
               allowed.stride(0), allowed.stride(3), out.stride(0))
    q_scale = _reciprocal(math.sqrt(hd) * coeff)
    if splits == 1:
        _decode_attention_kernel[(b * heads,)](
            qkv, cos, sin, keys, values, slot, allowed, out, scratch, length, q_scale, coeff, *strides,
            HEADS=heads, HEAD_DIM=hd, BLOCK_D=block_d, BLOCK_T=block_t, num_warps=num_warps)
        return out
    stats = torch.empty(b * heads, splits, 2, dtype=torch.float32, device=qkv.device)  # (max, sum) per range
    partial = torch.empty(b * heads, splits, block_d, dtype=torch.float32, device=qkv.device)
    grid = (b * heads, splits)
    _split_scores_kernel[grid](
        qkv, cos, sin, keys, values, slot, allowed, scratch, stats, length, chunk, q_scale, coeff, *strides,
        HEADS=heads, HEAD_DIM=hd, BLOCK_D=block_d, BLOCK_T=block_t, SPLITS=splits, num_warps=num_warps)
    _split_values_kernel[grid](
        values, scratch, stats, partial, length, chunk, s_vb=values.stride(0), s_vh=values.stride(1),
        s_vt=values.stride(2), HEADS=heads, HEAD_DIM=hd, BLOCK_D=block_d, BLOCK_T=block_t, SPLITS=splits,
        BLOCK_S=triton.next_power_of_2(splits), num_warps=num_warps)
    _split_combine_kernel[(b * heads,)](
        partial, out, out.stride(0), HEADS=heads, HEAD_DIM=hd, BLOCK_D=block_d, SPLITS=splits,
        BLOCK_S=triton.next_power_of_2(splits), num_warps=4)
    return out


def _reciprocal(divisor: float) -> float:
    # PyTorch's CUDA division by a Python scalar multiplies by the fp32 reciprocal: do the same.
    return float(np.float32(1.0) / np.float32(divisor))


if triton is not None:

    @triton.jit
    def _rotate(x_ptr, cos, sin, d, d_ok, HALF: tl.constexpr, HEAD_DIM: tl.constexpr, dtype: tl.constexpr):
        # x*cos + rotate_half(x)*sin, rotate_half((x1, x2)) = (-x2, x1); each op rounded like the eager one.
        x = tl.load(x_ptr + d, mask=d_ok, other=0.0).to(tl.float32)
        partner = tl.load(x_ptr + (d + HALF) % HEAD_DIM, mask=d_ok, other=0.0).to(tl.float32)
        rotated = tl.where(d < HALF, -partner, partner)
        first = (x * cos).to(dtype).to(tl.float32)
        second = (rotated * sin).to(dtype).to(tl.float32)
        return (first + second).to(dtype)

    @triton.jit
    def _write_step(qkv_ptr, cos_ptr, sin_ptr, k_ptr, v_ptr, slot, write, batch, head, d, d_ok,
                    s_qb, s_qh, s_q3, s_cb, s_sb, s_kb, s_kh, s_kt, s_vb, s_vh, s_vt,
                    HEAD_DIM: tl.constexpr, dtype: tl.constexpr):
        """The step's rotated q (scaled later), and its rotated k and v written at `slot` where `write` is set."""
        base = qkv_ptr + batch * s_qb + head * s_qh
        cos = tl.load(cos_ptr + batch * s_cb + d, mask=d_ok, other=0.0).to(tl.float32)
        sin = tl.load(sin_ptr + batch * s_sb + d, mask=d_ok, other=0.0).to(tl.float32)
        q = _rotate(base, cos, sin, d, d_ok, HEAD_DIM // 2, HEAD_DIM, dtype)
        k = _rotate(base + s_q3, cos, sin, d, d_ok, HEAD_DIM // 2, HEAD_DIM, dtype)
        v = tl.load(base + 2 * s_q3 + d, mask=d_ok, other=0.0)
        tl.store(k_ptr + batch * s_kb + head * s_kh + slot * s_kt + d, k, mask=d_ok & write)
        tl.store(v_ptr + batch * s_vb + head * s_vh + slot * s_vt + d, v, mask=d_ok & write)
        return q

    @triton.jit
    def _score_range(k_base, s_kt, allowed_row, s_at, scores_row, q, d, d_ok, start, end, coeff,
                     dtype: tl.constexpr, BLOCK_T: tl.constexpr):
        """Scores of cache positions [start, end) into the scratch row; their maximum and sum of exponentials
        (rescaled as the maximum grows)."""
        best = tl.full((), -float("inf"), tl.float32)
        total = tl.zeros((), tl.float32)
        for t0 in range(start, end, BLOCK_T):
            t = t0 + tl.arange(0, BLOCK_T)
            ok = t < end
            keys = tl.load(k_base + t[:, None] * s_kt + d[None, :], mask=ok[:, None] & d_ok[None, :],
                           other=0.0).to(tl.float32)
            score = tl.sum(keys * q[None, :], axis=1).to(dtype).to(tl.float32)  # a half-precision matmul output
            visible = tl.load(allowed_row + t * s_at, mask=ok, other=0).to(tl.int1)
            score = tl.where(visible, score, -10000.0) * coeff
            score = tl.where(ok, score, -float("inf"))
            tl.store(scores_row + t, score, mask=ok)
            new_best = tl.maximum(best, tl.max(score, axis=0))
            total = total * tl.exp(best - new_best) + tl.sum(tl.exp(score - new_best), axis=0)
            best = new_best
        return best, total

    @triton.jit
    def _weigh_range(v_base, s_vt, scores_row, best, total, d, d_ok, start, end, dtype: tl.constexpr,
                     BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr):
        """The probabilities of positions [start, end) from the softmax's final maximum and sum, rounded as the
        eager softmax output is, against their values: an fp32 (BLOCK_D,) partial output."""
        acc = tl.zeros((BLOCK_D,), dtype=tl.float32)
        for t0 in range(start, end, BLOCK_T):
            t = t0 + tl.arange(0, BLOCK_T)
            ok = t < end
            score = tl.load(scores_row + t, mask=ok, other=-float("inf"))
            probs = (tl.exp(score - best) / total).to(dtype).to(tl.float32)
            vals = tl.load(v_base + t[:, None] * s_vt + d[None, :], mask=ok[:, None] & d_ok[None, :],
                           other=0.0).to(tl.float32)
            acc += tl.sum(probs[:, None] * vals, axis=0)
        return acc

    @triton.jit
    def _decode_attention_kernel(qkv_ptr, cos_ptr, sin_ptr, k_ptr, v_ptr, slot_ptr, allowed_ptr, out_ptr,
                                 scratch_ptr, T, q_scale, coeff,
                                 s_qb, s_qh, s_q3, s_cb, s_sb, s_kb, s_kh, s_kt, s_vb, s_vh, s_vt,
                                 s_ab, s_at, s_ob,
                                 HEADS: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
                                 BLOCK_T: tl.constexpr):
        # Program (sequence x head), the whole cache: pass 1 scores every position, pass 2 weighs the values.
        pid = tl.program_id(0)
        batch = pid // HEADS
        head = pid % HEADS
        dtype = out_ptr.dtype.element_ty
        d = tl.arange(0, BLOCK_D)  # head_dim padded to a power of two
        d_ok = d < HEAD_DIM
        slot = tl.load(slot_ptr)
        q = _write_step(qkv_ptr, cos_ptr, sin_ptr, k_ptr, v_ptr, slot, True, batch, head, d, d_ok,
                        s_qb, s_qh, s_q3, s_cb, s_sb, s_kb, s_kh, s_kt, s_vb, s_vh, s_vt, HEAD_DIM, dtype)
        tl.debug_barrier()  # the cache reads below include the slot just written
        q = (q.to(tl.float32) * q_scale).to(dtype).to(tl.float32)
        scores_row = scratch_ptr + pid * T
        best, total = _score_range(k_ptr + batch * s_kb + head * s_kh, s_kt, allowed_ptr + batch * s_ab, s_at,
                                   scores_row, q, d, d_ok, 0, T, coeff, dtype, BLOCK_T)
        tl.debug_barrier()
        acc = _weigh_range(v_ptr + batch * s_vb + head * s_vh, s_vt, scores_row, best, total, d, d_ok, 0, T,
                           dtype, BLOCK_T, BLOCK_D)
        tl.store(out_ptr + batch * s_ob + head * HEAD_DIM + d, acc.to(dtype), mask=d_ok)

    @triton.jit
    def _split_scores_kernel(qkv_ptr, cos_ptr, sin_ptr, k_ptr, v_ptr, slot_ptr, allowed_ptr, scratch_ptr, stats_ptr,
                             T, CHUNK, q_scale, coeff,
                             s_qb, s_qh, s_q3, s_cb, s_sb, s_kb, s_kh, s_kt, s_vb, s_vh, s_vt,
                             s_ab, s_at, s_ob,
                             HEADS: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
                             BLOCK_T: tl.constexpr, SPLITS: tl.constexpr):
        # Program (sequence x head, range): scores of one cache range into the scratch row, and the range's
        # maximum and sum of exponentials. The range holding `slot` also writes the step's k and v there.
        pid = tl.program_id(0)
        split = tl.program_id(1)
        batch = pid // HEADS
        head = pid % HEADS
        dtype = qkv_ptr.dtype.element_ty
        d = tl.arange(0, BLOCK_D)
        d_ok = d < HEAD_DIM
        start = split * CHUNK
        end = tl.minimum(start + CHUNK, T)
        slot = tl.load(slot_ptr)
        q = _write_step(qkv_ptr, cos_ptr, sin_ptr, k_ptr, v_ptr, slot, (slot >= start) & (slot < end), batch, head,
                        d, d_ok, s_qb, s_qh, s_q3, s_cb, s_sb, s_kb, s_kh, s_kt, s_vb, s_vh, s_vt, HEAD_DIM, dtype)
        tl.debug_barrier()  # this range's reads below include the slot just written
        q = (q.to(tl.float32) * q_scale).to(dtype).to(tl.float32)
        best, total = _score_range(k_ptr + batch * s_kb + head * s_kh, s_kt, allowed_ptr + batch * s_ab, s_at,
                                   scratch_ptr + pid * T, q, d, d_ok, start, end, coeff, dtype, BLOCK_T)
        tl.store(stats_ptr + (pid * SPLITS + split) * 2, best)
        tl.store(stats_ptr + (pid * SPLITS + split) * 2 + 1, total)

    @triton.jit
    def _split_values_kernel(v_ptr, scratch_ptr, stats_ptr, partial_ptr, T, CHUNK, s_vb, s_vh, s_vt,
                             HEADS: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
                             BLOCK_T: tl.constexpr, SPLITS: tl.constexpr, BLOCK_S: tl.constexpr):
        # Program (sequence x head, range): the softmax maximum and sum over all ranges, then this range's
        # rounded probabilities against its values, an fp32 partial output.
        pid = tl.program_id(0)
        split = tl.program_id(1)
        batch = pid // HEADS
        head = pid % HEADS
        s = tl.arange(0, BLOCK_S)
        s_ok = s < SPLITS
        maxima = tl.load(stats_ptr + (pid * SPLITS + s) * 2, mask=s_ok, other=-float("inf"))
        sums = tl.load(stats_ptr + (pid * SPLITS + s) * 2 + 1, mask=s_ok, other=0.0)
        best = tl.max(maxima, axis=0)
        total = tl.sum(tl.where(s_ok, sums * tl.exp(maxima - best), 0.0), axis=0)
        d = tl.arange(0, BLOCK_D)
        start = split * CHUNK
        acc = _weigh_range(v_ptr + batch * s_vb + head * s_vh, s_vt, scratch_ptr + pid * T, best, total, d,
                           d < HEAD_DIM, start, tl.minimum(start + CHUNK, T), v_ptr.dtype.element_ty, BLOCK_T,
                           BLOCK_D)
        tl.store(partial_ptr + (pid * SPLITS + split) * BLOCK_D + d, acc)

    @triton.jit
    def _split_combine_kernel(partial_ptr, out_ptr, s_ob, HEADS: tl.constexpr, HEAD_DIM: tl.constexpr,
                              BLOCK_D: tl.constexpr, SPLITS: tl.constexpr, BLOCK_S: tl.constexpr):
        # Program (sequence x head): the ranges' fp32 partial outputs added, rounded once.
        pid = tl.program_id(0)
        batch = pid // HEADS
        head = pid % HEADS
        s = tl.arange(0, BLOCK_S)
        d = tl.arange(0, BLOCK_D)
        parts = tl.load(partial_ptr + (pid * SPLITS + s[:, None]) * BLOCK_D + d[None, :],
                        mask=(s < SPLITS)[:, None], other=0.0)
        acc = tl.sum(parts, axis=0)
        tl.store(out_ptr + batch * s_ob + head * HEAD_DIM + d, acc.to(out_ptr.dtype.element_ty), mask=d < HEAD_DIM)
