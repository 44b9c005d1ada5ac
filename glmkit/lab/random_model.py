"""Random GLMs made directly on the device, for benchmarks at shapes whose weights nobody ships.

Two properties matter for a benchmark:
  - the host never holds the model: it is built on the meta device, then each parameter is drawn and
    filled on the device one tensor at a time;
  - the weights are the same model at every tensor-parallel size: each tensor is drawn whole from a seed
    that depends only on its name, and a rank keeps its slice (`glmkit.parallel.layout.split_tensor`), so greedy
    output can be compared across TP sizes on the same weights.

Scale. A linear weight drawn with a fixed std such as 0.02 has a gain of 0.02 * sqrt(fan_in): 2.2 at
GLM-130B's width. Such a network is chaotic: rounding differences (fp16 against fp32, one reduction order
against another) grow layer by layer until the logits of two correct implementations differ by as much as
their spread (measured: fp32 against bf16 logits 11 apart after 12 layers). Trained models are not like
that, and a benchmark whose tokens depend on rounding can check nothing. So linear weights are drawn with
std LINEAR_GAIN / sqrt(fan_in); the tied embedding keeps std 0.02, which gives logits of std 0.02 * sqrt(h)
(2.2 at GLM-130B's width), peaked enough for greedy choices to be stable.
"""
from __future__ import annotations

import zlib

import torch
from torch import nn

from ..config import QUANTIZATION_BITS, GLMConfig
from ..generate.tokens import Context
from ..model import GLM
from ..quantization import convert_for_runtime, quantize_weight
from ..parallel.transform import parallelize, resize_for_rank
from ..parallel.layout import split_tensor

LINEAR_GAIN = 0.5  # std * sqrt(fan_in) of every linear weight: well below the chaotic regime (> 1)
EMBEDDING_STD = 0.02


def _set_param(model: nn.Module, name: str, tensor: torch.Tensor) -> None:
    path, _, attr = name.rpartition(".")
    setattr(model.get_submodule(path), attr, nn.Parameter(tensor, requires_grad=False))


def _own_slice(name: str, full: torch.Tensor, rank: int, world_size: int) -> torch.Tensor:
    """Rank `rank`'s part of `full` in its own contiguous storage, so the full tensor can be freed."""
    part = split_tensor(name, full, rank, world_size)
    return part if part.numel() == full.numel() else part.clone(memory_format=torch.contiguous_format)


def random_fill(tensor: torch.Tensor, name: str, generator: torch.Generator) -> torch.Tensor:
    """Fill the full (unsharded) tensor `name` in place; never zeros (they can run faster than real data)."""
    if "layernorm" in name and name.endswith("weight"):
        return tensor.normal_(1.0, 0.1, generator=generator)
    if name.endswith("word_embeddings.weight"):
        return tensor.normal_(0.0, EMBEDDING_STD, generator=generator)
    if tensor.dim() == 2:  # a linear weight (out, in)
        return tensor.normal_(0.0, LINEAR_GAIN / tensor.shape[1] ** 0.5, generator=generator)
    return tensor.normal_(0.0, 0.02, generator=generator)  # biases


@torch.no_grad()
def build_random_model(config: GLMConfig, dtype: torch.dtype, device: str | torch.device, *,
                       quantization: str | None = None, rank: int = 0, world_size: int = 1, group=None,
                       seed: int = 0, symmetric_all_reduce: bool = True) -> GLM:
    """A GLM (or rank `rank` of a `world_size`-way tensor-parallel one) with random weights made on `device`.

    Each tensor is drawn whole on `device` (the largest, the embedding, is 3.7 GB at GLM-130B's size) and
    the rank keeps its slice, so the device holds at most the rank's model plus one full tensor. With
    `quantization`, the four linear weights of each layer are drawn in `dtype` and quantized whole (scales
    over full rows, as glmkit quantizes checkpoints) before slicing.
    """
    device = torch.device(device)
    with torch.device("meta"):
        model = GLM(config)
    full_shapes = {name: tuple(p.shape) for name, p in model.named_parameters()}
    bits = None if quantization is None else QUANTIZATION_BITS[quantization]
    if bits is not None:
        convert_for_runtime(model, bits)
    if world_size > 1:
        resize_for_rank(model, world_size)
    generator = torch.Generator(device=device)
    for name, param in list(model.named_parameters()):
        if name.endswith("_scale"):
            continue  # made together with its weight
        # The seed depends on the name only: every rank and every TP size draws the same full tensor.
        generator.manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))
        full = random_fill(torch.empty(full_shapes[name], dtype=dtype, device=device), name, generator)
        if param.dtype == torch.int8:  # a quantized weight: quantize the whole float weight here
            q, scale = quantize_weight(full, bits)
            del full
            _set_param(model, name, _own_slice(name, q, rank, world_size))
            _set_param(model, name + "_scale", _own_slice(name + "_scale", scale, rank, world_size))
            continue
        _set_param(model, name, _own_slice(name, full, rank, world_size))
    return parallelize(model.eval(), rank, world_size, group, symmetric_all_reduce=symmetric_all_reduce)


def weight_bytes(model: nn.Module) -> int:
    """Bytes of all parameters and buffers of `model` (one rank's share when tensor-parallel)."""
    tensors = list(model.parameters()) + list(model.buffers())
    return sum(t.numel() * t.element_size() for t in tensors)


def random_contexts(config: GLMConfig, batch: int, length: int, seed: int) -> list[Context]:
    """`batch` random prompts of `length` ids (the same on every rank: they come from `seed`)."""
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, config.vocab_size, (batch, length), generator=generator)
    return [Context(tuple(row)) for row in ids.tolist()]
