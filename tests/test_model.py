"""The plain GLM: GLM-130B math against an independent float64 reference, KV cache, dtypes, shard counts."""
from __future__ import annotations

import math

import pytest
import torch

from glmkit.checkpoint import load_rank_state_dict, repack_checkpoint
from glmkit.generate.tokens import Context, prefill_inputs
from glmkit.model import GLM, KVCache
from glmkit.generate.pipeline import load_model


def reference_logits(model: GLM, ids: list[int], positions: list[int], allowed: torch.Tensor) -> torch.Tensor:
    """GLM-130B's forward pass written out from GLM-NOTES, per head and in float64: (s, vocab)."""
    cfg = model.config
    sd = {k: v.double() for k, v in model.state_dict().items()}
    hd, heads, alpha = cfg.head_dim, cfg.num_attention_heads, math.sqrt(2 * cfg.num_layers)
    x = sd["transformer.word_embeddings.weight"][torch.tensor(ids)]  # (s, h)
    pos = torch.tensor(positions, dtype=torch.float64)
    inv_freq = 1.0 / (cfg.rotary_base ** (torch.arange(0, hd, 2, dtype=torch.float64) / hd))
    angle = pos[:, None] * inv_freq[None]  # (s, hd/2)
    cos, sin = angle.cos(), angle.sin()

    def rotate(v):  # (s, hd): pairs (i, i + hd/2) are rotated together
        a, b = v[:, : hd // 2], v[:, hd // 2:]
        return torch.cat([a * cos - b * sin, b * cos + a * sin], dim=1)

    def ln(v, name):
        return torch.nn.functional.layer_norm(v, (cfg.hidden_size,), sd[name + ".weight"], sd[name + ".bias"],
                                              cfg.layernorm_epsilon)

    for i in range(cfg.num_layers):
        p = f"transformer.layers.{i}."
        h = ln(x, p + "input_layernorm")
        qkv = h @ sd[p + "attention.query_key_value.weight"].T + sd[p + "attention.query_key_value.bias"]
        outs = []
        for head in range(heads):
            block = qkv[:, head * 3 * hd:(head + 1) * 3 * hd]
            q, k, v = rotate(block[:, :hd]), rotate(block[:, hd:2 * hd]), block[:, 2 * hd:]
            scores = (q @ k.T) / math.sqrt(hd)
            scores = scores.masked_fill(~allowed, -10000.0)
            outs.append(torch.softmax(scores, dim=-1) @ v)
        attn = torch.cat(outs, dim=1) @ sd[p + "attention.dense.weight"].T + sd[p + "attention.dense.bias"]
        x = h * alpha + attn
        y = ln(x, p + "post_attention_layernorm")
        inner = y @ sd[p + "mlp.dense_h_to_4h.weight"].T + sd[p + "mlp.dense_h_to_4h.bias"]
        a, g = inner.chunk(2, dim=1)
        x = y * alpha + (a * torch.nn.functional.gelu(g)) @ sd[p + "mlp.dense_4h_to_h.weight"].T \
            + sd[p + "mlp.dense_4h_to_h.bias"]
    x = ln(x, "transformer.final_layernorm")
    return x @ sd["transformer.word_embeddings.weight"].T


@pytest.mark.parametrize("pinned", [None, 3])
def test_forward_matches_float64_reference(small_model, pinned):
    tokens = (5, 17, 2, 90, 40, 7)  # the last one plays sop
    ids, positions, allowed, _ = prefill_inputs([Context(tokens, pinned)], "cpu")
    logits = small_model(ids, positions, allowed)[0].double()
    expected = reference_logits(small_model, list(tokens), positions[0].tolist(), allowed[0, 0])
    assert torch.allclose(logits, expected, atol=1e-4, rtol=1e-4), (logits - expected).abs().max()


def test_glm_mask_and_positions():
    ids, positions, allowed, pads = prefill_inputs([Context((1, 2, 3, 4), 1), Context((7, 8, 9), None)], "cpu")
    assert ids.tolist() == [[1, 2, 3, 4], [0, 7, 8, 9]]
    assert positions.tolist() == [[0, 1, 2, 1], [0, 0, 1, 2]]  # [MASK]: sop pinned to the mask's position
    assert pads.tolist() == [0, 1]
    first = allowed[0, 0].int().tolist()
    # context tokens see each other both ways but not sop; sop sees everything before it and itself
    assert first == [[1, 1, 1, 0], [1, 1, 1, 0], [1, 1, 1, 0], [1, 1, 1, 1]]
    assert allowed[1, 0, :, 0].tolist() == [False] * 4  # nobody attends to the left pad


def test_kv_cache_decoding_matches_full_forward(small_model):
    tokens = (5, 17, 2, 90, 40)  # context ending in sop, then two generated tokens
    n = len(tokens)
    ids = torch.tensor([tokens + (11, 12)])
    positions = torch.arange(n + 2)[None]
    allowed = torch.ones(1, 1, n + 2, n + 2, dtype=torch.bool).tril()
    allowed[..., : n - 1] = True  # GLM: the context before sop is visible to every query
    full = small_model(ids, positions, allowed)
    cache = KVCache.allocate(small_model, 1, 10)
    prefix = small_model(ids[:, :n], positions[:, :n], allowed[:, :, :n, :n], cache, torch.arange(n))
    assert torch.allclose(prefix, full[:, :n], atol=1e-5)
    for step in range(n, ids.shape[1]):
        one = small_model(ids[:, step:step + 1], positions[:, step:step + 1],
                          allowed[:, :, step:step + 1, :step + 1], cache, torch.tensor([step]))
        assert torch.allclose(one[:, 0], full[:, step], atol=1e-5)


def test_left_padded_batch_matches_single_sequences(small_model):
    contexts = [Context((3, 4, 5, 6, 7), None), Context((9, 7), 0)]
    ids, positions, allowed, pads = prefill_inputs(contexts, "cpu")
    batch = small_model(ids, positions, allowed, last_only=True)
    for row, context in enumerate(contexts):
        single = small_model(*prefill_inputs([context], "cpu")[:3], last_only=True)
        assert torch.allclose(batch[row], single[0], atol=1e-5)


# Relative to the largest logit: fp16 keeps 11 mantissa bits, bf16 only 8 (measured: 0.16 % and 2.7 %).
@pytest.mark.parametrize("dtype,tolerance", [(torch.float16, 0.005), (torch.bfloat16, 0.05)])
def test_half_precision_paths_track_fp32(demo_config, dtype, tolerance):
    fp32 = load_model(demo_config)
    half = load_model(demo_config.replace(dtype={torch.float16: "fp16", torch.bfloat16: "bf16"}[dtype]))
    assert half.transformer.word_embeddings.weight.dtype == dtype
    ids, positions, allowed, _ = prefill_inputs([Context(tuple(range(20000, 20040)), 12)], "cpu")
    expected = fp32(ids, positions, allowed)
    got = half(ids, positions, allowed).float()
    assert (got - expected).abs().max() < tolerance * expected.abs().max()
    assert (got.argmax(-1) == expected.argmax(-1)).float().mean() > 0.9


def test_shard_counts_load_identical_weights(demo_config, tmp_path):
    one = tmp_path / "one"
    four = tmp_path / "four"
    repack_checkpoint(demo_config.checkpoint, one, 1, demo_config.model)
    repack_checkpoint(one, four, 4, demo_config.model)
    shipped = load_model(demo_config)
    ids, positions, allowed, _ = prefill_inputs([Context(tuple(range(20100, 20130)), None)], "cpu")
    expected = shipped(ids, positions, allowed)
    for folder in (one, four):
        model = load_model(demo_config.replace(checkpoint=folder))
        assert torch.equal(model(ids, positions, allowed), expected)
    rank_state = load_rank_state_dict(four, demo_config.model, rank=1, world_size=2)
    assert rank_state["transformer.word_embeddings.weight"].shape[0] == demo_config.model.vocab_size // 2


def test_whole_cache_step_matches_growing_step(small_model):
    """A decode step over the whole fixed-size cache (what CUDA graphs replay), the slots not yet written
    masked, computes the logits of a step that attends over the filled slots only."""
    tokens = (5, 17, 2, 90, 40)
    ids, positions, allowed, _ = prefill_inputs([Context(tokens, None)], "cpu")
    growing, whole = KVCache.allocate(small_model, 1, 12), KVCache.allocate(small_model, 1, 12)
    whole.keys.normal_()  # garbage in unwritten slots must not matter
    for cache in (growing, whole):
        small_model(ids, positions, allowed, cache, torch.arange(len(tokens)))
    for step, token in enumerate((11, 12, 13)):
        at = len(tokens) + step
        one_id, one_pos, slot = torch.tensor([[token]]), torch.tensor([[at]]), torch.tensor([at])
        expected = small_model(one_id, one_pos, torch.ones(1, 1, 1, at + 1, dtype=torch.bool), growing, slot)
        row = (torch.arange(12) <= at)[None, None, None]
        got = small_model(one_id, one_pos, row, whole, slot)
        assert torch.allclose(got, expected, atol=1e-5)


def test_chunked_prefill_attention_changes_no_number(small_model, monkeypatch):
    """Prefill attention split into query chunks (long contexts) computes the same logits: each query is its
    own softmax row, so only the matmul kernels' blocking (fp32 summation order) can differ."""
    import glmkit.model as model_module

    ids, positions, allowed, _ = prefill_inputs([Context(tuple(range(3, 40)), None), Context((5, 6, 7), 1)], "cpu")
    whole = small_model(ids, positions, allowed)
    monkeypatch.setattr(model_module, "SCORE_CHUNK_ELEMENTS", 2 * 4 * 5 * ids.shape[1])  # 5 query rows a chunk
    chunked = small_model(ids, positions, allowed)
    assert torch.allclose(chunked, whole, rtol=0, atol=1e-6 * whole.abs().max().item())
