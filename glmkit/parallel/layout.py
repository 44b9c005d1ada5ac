"""Tensor-parallel layout of GLM parameters: one table of per-parameter styles, and tensor split/merge/reshard.

The same table drives checkpoint loading, offline repacking and sharding a live model
(`glmkit.parallel.transform`).

Styles (Megatron layout, see GLM-NOTES.md):
  vocab       split dim 0 (rows of the embedding are vocabulary entries)
  column      split dim 0 (output features; query_key_value is laid out [heads, 3, head_dim], so a contiguous
              split keeps whole heads with their q, k and v)
  column_glu  split dim 0 of each GeGLU half separately: rank r keeps [first_half chunk r ; second_half chunk r]
  row         split dim 1 (input features)
  replicate   every rank holds the whole tensor (LayerNorms, biases of row-parallel layers)

Quantized checkpoints store `<weight name>_scale` with one entry per output row: it follows a column-parallel
weight's split along dim 0 and is replicated for a row-parallel weight (whose output rows are all local).
An INT4 weight is stored packed (out, in/2), two adjacent input features per byte, so splitting its dim 1
is the same split as for the unpacked weight as long as every shard gets whole bytes.
"""
from __future__ import annotations

import re
from collections.abc import Sequence

import torch

# Order does not matter: every name matches at most one pattern. `{i}` stands for a layer index.
SHARD_TABLE: tuple[tuple[str, str], ...] = (
    ("transformer.word_embeddings.weight", "vocab"),
    ("transformer.layers.{i}.input_layernorm.weight", "replicate"),
    ("transformer.layers.{i}.input_layernorm.bias", "replicate"),
    ("transformer.layers.{i}.attention.query_key_value.weight", "column"),
    ("transformer.layers.{i}.attention.query_key_value.bias", "column"),
    ("transformer.layers.{i}.attention.dense.weight", "row"),
    ("transformer.layers.{i}.attention.dense.bias", "replicate"),
    ("transformer.layers.{i}.post_attention_layernorm.weight", "replicate"),
    ("transformer.layers.{i}.post_attention_layernorm.bias", "replicate"),
    ("transformer.layers.{i}.mlp.dense_h_to_4h.weight", "column_glu"),
    ("transformer.layers.{i}.mlp.dense_h_to_4h.bias", "column_glu"),
    ("transformer.layers.{i}.mlp.dense_4h_to_h.weight", "row"),
    ("transformer.layers.{i}.mlp.dense_4h_to_h.bias", "replicate"),
    ("transformer.final_layernorm.weight", "replicate"),
    ("transformer.final_layernorm.bias", "replicate"),
)

STYLES = ("vocab", "column", "column_glu", "row", "replicate")

# How a `<weight>_scale` tensor is laid out given its weight's style: scales index output rows.
_SCALE_STYLE = {"vocab": "vocab", "column": "column", "column_glu": "column_glu",
                "row": "replicate", "replicate": "replicate"}

_COMPILED = tuple((re.compile(re.escape(pattern).replace(re.escape("{i}"), r"\d+")), style)
                  for pattern, style in SHARD_TABLE)


def _table_style(name: str) -> str | None:
    for regex, style in _COMPILED:
        if regex.fullmatch(name):
            return style
    return None


def shard_style(name: str) -> str:
    """Return the tensor-parallel style of parameter `name` (ValueError for a name not in the table)."""
    style = _table_style(name)
    if style is None and name.endswith("_scale"):
        base = _table_style(name[: -len("_scale")])
        style = None if base is None else _SCALE_STYLE[base]
    if style is not None:
        return style
    raise ValueError(f"no tensor-parallel style for parameter {name!r}; it is not a GLM parameter name "
                     f"(add a pattern to glmkit.parallel.layout.SHARD_TABLE if it should be one)")


def _split_dim(style: str) -> int | None:
    return {"vocab": 0, "column": 0, "column_glu": 0, "row": 1, "replicate": None}[style]


def shard_shape(name: str, shape: Sequence[int], world_size: int) -> tuple[int, ...]:
    """Shape of one rank's shard of parameter `name` whose full shape is `shape`."""
    dim = _split_dim(shard_style(name))
    shape = tuple(shape)
    if dim is None or world_size == 1:
        return shape
    # A column_glu tensor is two halves each split `world_size` ways, so its size must divide by 2*world_size.
    parts = 2 * world_size if shard_style(name) == "column_glu" else world_size
    if shape[dim] % parts:
        raise ValueError(f"{name}: dim {dim} of size {shape[dim]} cannot be split {world_size} ways; "
                         f"choose a shard count that divides it")
    return shape[:dim] + (shape[dim] // world_size,) + shape[dim + 1:]


def source_ranks(rank: int, world_size: int, num_source_shards: int) -> range:
    """Source shards (of `num_source_shards`) whose slices overlap target `rank` of a `world_size`-way split."""
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is out of range for world size {world_size}")
    if num_source_shards < 1:
        raise ValueError(f"need at least one source shard, got {num_source_shards}")
    # In units of 1/(world_size*num_source_shards) of the tensor, target r covers [r*N, (r+1)*N) and source j
    # covers [j*M, (j+1)*M); j overlaps when j*M < (r+1)*N and (j+1)*M > r*N.
    first = rank * num_source_shards // world_size
    stop = -(-(rank + 1) * num_source_shards // world_size)  # ceil division
    return range(first, stop)


def _reshard_dim(sources: Sequence[torch.Tensor], first_source: int, num_source_shards: int,
                 rank: int, world_size: int, dim: int) -> torch.Tensor:
    """Cut target `rank`'s slice along `dim` out of consecutive source shards starting at `first_source`."""
    source_size = sources[0].shape[dim]
    full_size = source_size * num_source_shards
    if full_size % world_size:
        raise ValueError(f"dim {dim} of total size {full_size} cannot be split {world_size} ways")
    target_size = full_size // world_size
    start, stop = rank * target_size, (rank + 1) * target_size  # global coordinates of the target slice
    pieces = []
    for j, shard in enumerate(sources, start=first_source):
        lo, hi = max(start, j * source_size), min(stop, (j + 1) * source_size)
        if lo < hi:
            pieces.append(shard.narrow(dim, lo - j * source_size, hi - lo))
    # A single piece stays a view (of a possibly memory-mapped source); several are copied by cat.
    return pieces[0] if len(pieces) == 1 else torch.cat(pieces, dim=dim)


def reshard_tensor(name: str, sources: Sequence[torch.Tensor], num_source_shards: int,
                   rank: int, world_size: int) -> torch.Tensor:
    """Target `rank` of a `world_size`-way split of `name`, built from the source shards source_ranks() lists.

    `sources` are the shards of ranks `source_ranks(rank, world_size, num_source_shards)`, in rank order. The
    result may be a view of a source tensor; clone it if the sources must be freed.
    """
    expected = source_ranks(rank, world_size, num_source_shards)
    if len(sources) != len(expected):
        raise ValueError(f"{name}: target rank {rank}/{world_size} needs source shards {list(expected)} "
                         f"of {num_source_shards}, got {len(sources)} tensors")
    style = shard_style(name)
    dim = _split_dim(style)
    if dim is None:
        # Replicated: every source holds the full tensor; they are assumed equal and not compared (cost).
        return sources[0]
    for shard in sources[1:]:
        if shard.shape != sources[0].shape:
            raise ValueError(f"{name}: source shards have different shapes "
                             f"{[tuple(s.shape) for s in sources]}")
    if style != "column_glu":
        return _reshard_dim(sources, expected.start, num_source_shards, rank, world_size, dim)
    # GeGLU: each shard is [x1 chunk ; x2 chunk]; reshard the x1 chunks and the x2 chunks separately.
    half = sources[0].shape[0] // 2
    firsts = [s.narrow(0, 0, half) for s in sources]  # (2*inner/N/2, ...) each
    seconds = [s.narrow(0, half, half) for s in sources]
    x1 = _reshard_dim(firsts, expected.start, num_source_shards, rank, world_size, 0)
    x2 = _reshard_dim(seconds, expected.start, num_source_shards, rank, world_size, 0)
    return torch.cat([x1, x2], dim=0)  # (2*inner/M, ...)


def split_tensor(name: str, tensor: torch.Tensor, rank: int, world_size: int) -> torch.Tensor:
    """Rank `rank`'s shard of the full tensor `name` in a `world_size`-way split (may be a view)."""
    shard_shape(name, tensor.shape, world_size)  # raises a clear error when the split is uneven
    return reshard_tensor(name, [tensor], 1, rank, world_size)


def merge_tensors(name: str, tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """Full tensor `name` from all its shards in rank order (the first one for replicated tensors)."""
    if not tensors:
        raise ValueError(f"{name}: no shards to merge")
    return reshard_tensor(name, list(tensors), len(tensors), 0, 1)


def reshard(name: str, tensors: Sequence[torch.Tensor], new_world_size: int) -> list[torch.Tensor]:
    """All `new_world_size` shards of `name` from its current shards (any old and new counts that divide it)."""
    n = len(tensors)
    return [reshard_tensor(name, [tensors[j] for j in source_ranks(r, new_world_size, n)], n, r, new_world_size)
            for r in range(new_world_size)]
