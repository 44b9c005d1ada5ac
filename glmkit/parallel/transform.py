"""The live tensor-parallel transform: the plain GLM with one rank's weights plus the collectives Megatron's
layout needs (an all-reduce after row-parallel layers and the vocab-parallel embedding, an all-gather of the
logits). The process group and the communicator are passed in explicitly; there is no global parallel state.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from ..quantization import quantized_matmul
from .comm import AllReduce
from .layout import shard_shape, split_tensor


def _parent(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    path, _, attr = name.rpartition(".")
    return model.get_submodule(path), attr


def resize_for_rank(model: nn.Module, world_size: int) -> nn.Module:
    """Give a meta-device model per-rank parameter shapes, so a rank's state dict loads with assign=True."""
    for name, param in list(model.named_parameters()):
        shape = shard_shape(name, param.shape, world_size)
        if shape != tuple(param.shape):
            parent, attr = _parent(model, name)
            setattr(parent, attr, nn.Parameter(torch.empty(shape, dtype=param.dtype, device=param.device),
                                               requires_grad=False))
    return model


def shard_model(model: nn.Module, rank: int, world_size: int) -> nn.Module:
    """Slice a loaded full model's weights in place down to rank `rank` of `world_size`."""
    for name, param in list(model.named_parameters()):
        shard = split_tensor(name, param.data, rank, world_size)
        if shard.shape != param.shape:
            parent, attr = _parent(model, name)
            setattr(parent, attr, nn.Parameter(shard.clone(), requires_grad=False))
    return model


class VocabParallelEmbedding(nn.Module):
    """Embedding rows of one vocab slice: out-of-slice ids give zeros, and an all-reduce sums the ranks."""

    def __init__(self, weight: nn.Parameter, rank: int, all_reduce: AllReduce):
        super().__init__()
        self.weight = weight  # (vocab/tp, h); the name keeps SAT's state-dict key
        self.rank, self.all_reduce = rank, all_reduce

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        rows = self.weight.shape[0]
        local = input_ids - self.rank * rows
        outside = (local < 0) | (local >= rows)
        hidden = F.embedding(local.masked_fill(outside, 0), self.weight)  # (b, s, h)
        hidden = hidden.masked_fill(outside[..., None], 0)
        return self.all_reduce(hidden)


class RowParallelLinear(nn.Module):
    """A linear layer whose input features are split: partial products are summed, then the bias added once.

    Wraps an nn.Linear or a glmkit.quantization.QuantizedLinear. It adopts the layer's parameters under their
    own names (weight, bias, and weight_scale when quantized) so state-dict keys stay SAT's, rather than
    holding the layer as a child (which would rename them) or beside itself (which would alias parameters
    that `load_state_dict(assign=True)` or `.to()` may replace).
    """

    def __init__(self, linear: nn.Module, all_reduce: AllReduce):
        super().__init__()
        for name, param in linear.named_parameters(recurse=False):
            self.register_parameter(name, param)  # weight (out, in/tp) [int8 (out, in*bits/8/tp)], bias (out)
        self.bits = getattr(linear, "bits", None)  # None: a plain float weight
        self.all_reduce = all_reduce

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.bits is None:
            partial = F.linear(x, self.weight)
        else:
            partial = quantized_matmul(x, self.weight, self.weight_scale, self.bits)  # no bias yet
        return self.all_reduce(partial) + self.bias


def _gather_logits(group, world_size):
    def hook(module, args, logits):  # (b, s, vocab/tp) -> (b, s, vocab)
        pieces = [torch.empty_like(logits) for _ in range(world_size)]
        dist.all_gather(pieces, logits.contiguous(), group=group)
        return torch.cat(pieces, dim=-1)
    return hook


def parallelize(model: nn.Module, rank: int, world_size: int, group=None,
                symmetric_all_reduce: bool = True) -> nn.Module:
    """Add the collectives to a model holding rank `rank`'s weights, so it computes the full model's logits.

    Collective on GPUs (sets up the shared AllReduce): every rank calls it together. The AllReduce is kept
    as `model.all_reduce` (benchmarks time it alone); `symmetric_all_reduce=False` keeps NCCL for all sizes.
    """
    if world_size == 1:
        return model
    transformer = model.transformer
    weight = transformer.word_embeddings.weight
    group = group if group is not None else dist.group.WORLD
    all_reduce = AllReduce.setup(group, weight.device, weight.dtype, symmetric=symmetric_all_reduce)
    model.all_reduce = all_reduce
    transformer.word_embeddings = VocabParallelEmbedding(weight, rank, all_reduce)
    for layer in transformer.layers:
        layer.attention.dense = RowParallelLinear(layer.attention.dense, all_reduce)
        layer.mlp.dense_4h_to_h = RowParallelLinear(layer.mlp.dense_4h_to_h, all_reduce)
    model.register_forward_hook(_gather_logits(group, world_size))
    return model
