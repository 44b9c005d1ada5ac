"""GPU kernels applied to a plain GLM as module swaps: DeepNorm add+LayerNorm, decode attention, INT8/INT4 matmuls.

`apply_decode_kernels(model)` turns a plain `glmkit.model.GLM` (or a tensor-parallel rank of it) into one whose
LayerNorms and decode-step attention run glmkit's Triton kernels where they can (a CUDA tensor, or Triton's
interpreter in tests, and no gradient needed: the kernels have no backward) and the plain model's code
everywhere else. State-dict keys do not change. Quantized linears are swapped by `glmkit.quantization`.
"""
from __future__ import annotations

import torch
from torch import nn

from ..model import AddLayerNorm, Attention
from . import attention, norm


class FusedAddLayerNorm(AddLayerNorm):
    """AddLayerNorm through one Triton kernel (PyTorch's LayerNorm gives a 12288-wide row to one block)."""

    def forward(self, residual, branch, alpha):
        if residual is not None and (residual.dtype != branch.dtype or torch.is_autocast_enabled()):
            return super().forward(residual, branch, alpha)  # autocast mixes dtypes: the eager ops promote
        return norm.add_layernorm(self, residual, branch, alpha)  # the eager ops where the kernel cannot run


class FusedDecodeAttention(Attention):
    """Attention whose one-token decode step is one kernel (rotary, cache write, scores, softmax, values)."""

    def forward(self, x, cos, sin, allowed, cache, slots):
        b, s, _ = x.shape
        if s != 1 or cache is None or torch.is_grad_enabled() or not attention.kernel_usable(x):
            return super().forward(x, cos, sin, allowed, cache, slots)
        qkv = self.query_key_value(x).view(b, 1, self.local_heads, 3, self.config.head_dim)
        keys, values = cache.layer(self.layer_id, allowed.shape[-1])  # (b, nh, t, hd)
        context = attention.decode_attention(qkv, cos, sin, keys, values, slots, allowed, float(self.layer_id + 1))
        return self.dense(context)


_SWAPS = {AddLayerNorm: FusedAddLayerNorm, Attention: FusedDecodeAttention}


def apply_decode_kernels(model: nn.Module) -> nn.Module:
    """Swap the fused-kernel modules into `model` in place (their parameters stay where they are)."""
    for module in model.modules():
        fused = _SWAPS.get(type(module))
        if fused is not None:
            module.__class__ = fused  # same __init__ and parameters; only forward differs
    return model


def remove_decode_kernels(model: nn.Module) -> nn.Module:
    """Undo `apply_decode_kernels`: the plain model's modules again (e.g. to compare against eager ops)."""
    plain = {fused: base for base, fused in _SWAPS.items()}
    for module in model.modules():
        base = plain.get(type(module))
        if base is not None:
            module.__class__ = base
    return model
