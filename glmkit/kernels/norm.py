"""DeepNorm's residual add and the LayerNorm after it, as one GPU kernel.

Every GLM block computes LayerNorm(x * alpha + branch) twice (post-LN DeepNorm). In eager PyTorch that is a
multiply, an add and a LayerNorm: three launches, and PyTorch's LayerNorm gives a row of 12288 features to
one thread block, so at decode batch 1 it takes about 21 us on an H100 (profiled with
scripts/profile_decode.py): together about 50 us of a layer's 100 us outside the weight matmuls.

`add_layernorm` does it in one Triton program per row. It rounds x * alpha and the sum to the model dtype
before normalising, as the eager ops do, so GPU results match the CPU path up to the order of the fp32
mean/variance sums. Without Triton or on the CPU it runs the eager ops.
"""
from __future__ import annotations

import os

import torch
import torch.nn.functional as F
from torch import nn

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs use the eager ops
    triton = None
    tl = None


def kernel_usable(tensor: torch.Tensor) -> bool:
    """True when glmkit's Triton kernels can run on `tensor`'s device (CUDA, or Triton's interpreter)."""
    if triton is None:
        return False
    return tensor.is_cuda or os.environ.get("TRITON_INTERPRET") == "1"


def add_layernorm(norm: nn.LayerNorm, residual: torch.Tensor | None, branch: torch.Tensor, alpha: float,
                  use_kernel: bool | None = None) -> torch.Tensor:
    """norm(residual * alpha + branch), or norm(branch) when `residual` is None, in `branch`'s dtype.

    The kernel serves both (PyTorch's own LayerNorm is the slow part at decode batch sizes).

    `use_kernel` None picks the Triton kernel for CUDA tensors when no gradient is needed; True forces it
    (the tests run it under TRITON_INTERPRET=1 on the CPU), False forces the eager ops.
    """
    if use_kernel is None:
        # The kernel has no backward: training (anything that needs gradients) takes the eager ops.
        needs_grad = torch.is_grad_enabled() and any(
            t is not None and t.requires_grad for t in (residual, branch, norm.weight, norm.bias))
        use_kernel = kernel_usable(branch) and not needs_grad
    if not use_kernel:
        hidden = branch if residual is None else residual * alpha + branch
        # F.layer_norm rather than norm(...): `norm` may be the fused module whose forward called this.
        return F.layer_norm(hidden, norm.normalized_shape, norm.weight, norm.bias, norm.eps)
    has_residual = residual is not None
    residual = branch if residual is None else residual  # a placeholder pointer; the kernel ignores it
    if residual.shape != branch.shape or residual.dtype != branch.dtype:
        raise ValueError(f"residual {tuple(residual.shape)} {residual.dtype} and branch {tuple(branch.shape)} "
                         f"{branch.dtype} must have the same shape and dtype")
    width = branch.shape[-1]
    res2, branch2 = residual.reshape(-1, width), branch.reshape(-1, width)
    if res2.stride(-1) != 1 or branch2.stride(-1) != 1:
        res2, branch2 = res2.contiguous(), branch2.contiguous()
    out = torch.empty(branch2.shape, dtype=branch.dtype, device=branch.device)
    block = triton.next_power_of_2(width)
    _add_layernorm_kernel[(res2.shape[0],)](
        res2, branch2, norm.weight, norm.bias, out, width, float(alpha), float(norm.eps),
        res2.stride(0), branch2.stride(0), out.stride(0),
        HAS_RESIDUAL=has_residual, BLOCK=block, num_warps=max(1, min(16, block // 1024)))
    return out.view(branch.shape)


if triton is not None:

    @triton.jit
    def _add_layernorm_kernel(res_ptr, branch_ptr, weight_ptr, bias_ptr, out_ptr, N, alpha, eps,
                              stride_res, stride_branch, stride_out, HAS_RESIDUAL: tl.constexpr,
                              BLOCK: tl.constexpr):
        row = tl.program_id(0)
        cols = tl.arange(0, BLOCK)
        ok = cols < N
        dtype = out_ptr.dtype.element_ty
        hidden = tl.load(branch_ptr + row * stride_branch + cols, mask=ok, other=0.0).to(tl.float32)
        if HAS_RESIDUAL:
            res = tl.load(res_ptr + row * stride_res + cols, mask=ok, other=0.0).to(tl.float32)
            # Round as the eager `residual * alpha + branch` does (each op rounds to the model dtype).
            scaled = (res * alpha).to(dtype).to(tl.float32)
            hidden = (scaled + hidden).to(dtype).to(tl.float32)
        hidden = tl.where(ok, hidden, 0.0)
        mean = tl.sum(hidden, axis=0) / N
        centred = tl.where(ok, hidden - mean, 0.0)
        variance = tl.sum(centred * centred, axis=0) / N
        normed = centred / tl.sqrt(variance + eps)
        weight = tl.load(weight_ptr + cols, mask=ok, other=0.0).to(tl.float32)
        bias = tl.load(bias_ptr + cols, mask=ok, other=0.0).to(tl.float32)
        tl.store(out_ptr + row * stride_out + cols, (normed * weight + bias).to(dtype), mask=ok)

