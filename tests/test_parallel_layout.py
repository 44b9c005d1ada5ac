"""The tensor-parallel layout of GLM's parameters (glmkit.parallel.layout): the style of every parameter and scale,
and splitting, merging and resharding tensors between any shard counts. Checkpoint files: tests/test_checkpoint.py."""
from __future__ import annotations

import pytest
import torch

from glmkit.checkpoint import expected_shapes
from glmkit.parallel.layout import merge_tensors, reshard, shard_shape, shard_style, source_ranks, split_tensor

from test_checkpoint import H2H, QKV, TINY

def test_styles_cover_every_parameter_and_scales():
    styles = {name: shard_style(name) for name in expected_shapes(TINY)}
    assert styles["transformer.word_embeddings.weight"] == "vocab"
    assert styles[QKV] == "column"
    assert styles[H2H] == "column_glu"
    assert styles["transformer.layers.0.mlp.dense_h_to_4h.bias"] == "column_glu"
    assert styles["transformer.layers.0.mlp.dense_4h_to_h.weight"] == "row"
    assert styles["transformer.layers.0.mlp.dense_4h_to_h.bias"] == "replicate"
    assert styles["transformer.layers.0.attention.dense.bias"] == "replicate"
    assert styles["transformer.final_layernorm.weight"] == "replicate"
    assert shard_style(QKV + "_scale") == "column"
    assert shard_style(H2H + "_scale") == "column_glu"
    assert shard_style("transformer.layers.0.attention.dense.weight_scale") == "replicate"
    for bad in ("transformer.layers.0.attention.foo.weight", "lm_head.weight",
                "transformer.layers.x.mlp.dense_4h_to_h.weight", "transformer.final_layernorm.weight_scale_scale"):
        with pytest.raises(ValueError, match="no tensor-parallel style"):
            shard_style(bad)


def test_glu_rank_keeps_matching_halves():
    inner, h, world = 48, 32, 4
    x1, x2 = torch.randn(inner, h), torch.randn(inner, h)
    full = torch.cat([x1, x2])  # (2*inner, h)
    chunk = inner // world
    for r in range(world):
        expected = torch.cat([x1[r * chunk:(r + 1) * chunk], x2[r * chunk:(r + 1) * chunk]])
        assert torch.equal(split_tensor(H2H, full, r, world), expected)
    # Resharding 4 -> 2 keeps them matched too.
    for r, shard in enumerate(reshard(H2H, [split_tensor(H2H, full, r, 4) for r in range(4)], 2)):
        expected = torch.cat([x1[r * 24:(r + 1) * 24], x2[r * 24:(r + 1) * 24]])
        assert torch.equal(shard, expected)


def test_scales_follow_their_weights():
    scale = torch.arange(96.0)  # one scale per output row of a (96, 48) GeGLU weight
    assert torch.equal(split_tensor(H2H + "_scale", scale, 1, 2), torch.cat([scale[24:48], scale[72:96]]))
    row_scale = torch.arange(32.0)
    name = "transformer.layers.0.mlp.dense_4h_to_h.weight_scale"
    assert all(torch.equal(s, row_scale) for s in reshard(name, [row_scale], 4))


def test_column_split_keeps_whole_heads():
    heads, head_dim, h = 4, 8, 32
    full = torch.randn(heads, 3, head_dim, h).reshape(3 * h, h)  # output dim laid out [heads, 3, head_dim]
    shard = split_tensor(QKV, full, 1, 2)
    assert torch.equal(shard.reshape(2, 3, head_dim, h), full.reshape(heads, 3, head_dim, h)[2:4])


def test_row_split_and_merge_inverse():
    name = "transformer.layers.0.attention.dense.weight"
    full = torch.randn(32, 32)
    shards = [split_tensor(name, full, r, 4) for r in range(4)]
    assert torch.equal(shards[3], full[:, 24:])
    assert torch.equal(merge_tensors(name, shards), full)


@pytest.mark.parametrize("old,new", [(1, 2), (2, 4), (4, 2), (2, 3), (3, 2), (2, 1), (3, 6), (6, 4)])
def test_reshard_any_counts(old, new):
    full = torch.randn(2 * 24, 12)  # 2*inner with inner=24, divisible by 1,2,3,4,6
    for name in (H2H, QKV, "transformer.layers.0.mlp.dense_4h_to_h.weight"):
        t = full if shard_style(name) != "row" else full.T.contiguous()
        shards = reshard(name, [split_tensor(name, t, r, old) for r in range(old)], new)
        assert shards == [] or all(s.shape == shard_shape(name, t.shape, new) for s in shards)
        for r in range(new):
            assert torch.equal(shards[r], split_tensor(name, t, r, new))
        assert torch.equal(merge_tensors(name, shards), t)


def test_source_ranks():
    assert source_ranks(0, 1, 8) == range(0, 8)
    assert source_ranks(3, 8, 1) == range(0, 1)
    assert source_ranks(1, 4, 8) == range(2, 4)
    assert source_ranks(1, 3, 2) == range(0, 2)  # the middle third straddles both halves
    assert source_ranks(2, 3, 2) == range(1, 2)
    with pytest.raises(ValueError, match="out of range"):
        source_ranks(3, 3, 2)


def test_uneven_split_is_refused():
    with pytest.raises(ValueError, match="cannot be split 5 ways"):
        split_tensor(QKV, torch.zeros(96, 32), 0, 5)
