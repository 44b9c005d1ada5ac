"""The plain GLM: GLM-130B math against an independent float64 reference, KV cache, dtypes, shard counts,
and rotary tables against SAT's own (bit for bit) with a long-context model that shows the difference."""
from __future__ import annotations

import importlib.util
import math
import warnings
from pathlib import Path

import pytest
import torch

from glmkit.checkpoint import load_rank_state_dict, repack_checkpoint
from glmkit.config import GLMConfig, load_config
from glmkit.generate.tokens import Context, prefill_inputs
from glmkit.model import GLM, KVCache, rotary_tables
from glmkit.generate.pipeline import load_model


def reference_logits(model: GLM, ids: list[int], positions: list[int], allowed: torch.Tensor,
                     rotary: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """GLM-130B's forward pass written out from GLM-NOTES, per head and in float64: (s, vocab).

    `rotary` is (cos, sin), each (s, hd/2), for the positions; default: exact float64 rotary.
    """
    cfg = model.config
    sd = {k: v.double() for k, v in model.state_dict().items()}
    hd, heads, alpha = cfg.head_dim, cfg.num_attention_heads, math.sqrt(2 * cfg.num_layers)
    x = sd["transformer.word_embeddings.weight"][torch.tensor(ids)]  # (s, h)
    if rotary is None:
        pos = torch.tensor(positions, dtype=torch.float64)
        inv_freq = 1.0 / (cfg.rotary_base ** (torch.arange(0, hd, 2, dtype=torch.float64) / hd))
        angle = pos[:, None] * inv_freq[None]  # (s, hd/2)
        cos, sin = angle.cos(), angle.sin()
    else:
        cos, sin = (t.double() for t in rotary)

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


# ---- rotary tables: the official model's numbers (issue 13, item 11) ----

def sat_rotary_module():
    """SAT 0.4.12's rotary_embeddings.py loaded on its own (it needs only torch; the sat package's
    __init__ pulls in far more and takes many seconds to import)."""
    spec = importlib.util.find_spec("sat")
    if spec is None:
        pytest.skip("SwissArmyTransformer is not installed")
    path = Path(spec.submodule_search_locations[0]) / "model" / "position_embedding" / "rotary_embeddings.py"
    loader = importlib.util.spec_from_file_location("sat_rotary_embeddings", path)
    module = importlib.util.module_from_spec(loader)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # its torch.jit.script decorators
        loader.loader.exec_module(module)
    return module


def sat_tables(dtype: torch.dtype, length: int, precision: torch.dtype | None = None):
    """SAT's cos/sin tables (length, 1, 128) as GLM130B(args).half() (or .bfloat16(), .float()) builds them."""
    cast = {torch.float16: "half", torch.bfloat16: "bfloat16", torch.float32: "float"}[dtype]
    rotary = getattr(sat_rotary_module().RotaryEmbedding(128, precision=precision or dtype), cast)()
    # GLM130B's attention calls it with the value layer (the model dtype) and seq_len = max position + 1.
    return rotary(torch.zeros(1, 1, 128, dtype=dtype), seq_dim=0, seq_len=length)


@pytest.mark.parametrize("dtype,precision", [(torch.float16, torch.float16), (torch.bfloat16, torch.bfloat16),
                                             (torch.bfloat16, torch.float32), (torch.float32, torch.float32)])
def test_rotary_tables_are_sats_bit_for_bit(dtype, precision):
    sat_cos, sat_sin = sat_tables(dtype, 2048, precision)  # (2048, 1, 128)
    cos, sin = rotary_tables(torch.arange(2048)[None], 128, 10000.0, dtype)  # (1, 2048, 1, 128)
    assert cos.dtype == sat_cos.dtype == dtype
    assert torch.equal(cos[0], sat_cos) and torch.equal(sin[0], sat_sin)
    # SAT looks positions up in its table (F.embedding); glmkit computes them per position: the same
    # numbers for any batch of position ids, e.g. pinned [MASK] positions.
    positions = torch.randint(0, 2048, (3, 40), generator=torch.Generator().manual_seed(0))
    cos, sin = rotary_tables(positions, 128, 10000.0, dtype)
    assert torch.equal(cos[:, :, 0], sat_cos[positions, 0]) and torch.equal(sin[:, :, 0], sat_sin[positions, 0])


def test_fp32_rotary_option_is_exact():
    positions = torch.arange(2048)
    exact = (positions[:, None].double() / 10000.0 ** (torch.arange(0, 128, 2).double() / 128)).cos()
    fp32, _ = rotary_tables(positions[None], 128, 10000.0, torch.float16, precision="fp32")
    sat, _ = rotary_tables(positions[None], 128, 10000.0, torch.float16)
    assert (fp32[0, :, 0, :64].double() - exact).abs().max() < 1e-3  # fp16 rounding of cos, no more
    assert (sat[0, :, 0, :64].double() - exact).abs().max() > 0.4  # the official fp16 tables near 2048
    with pytest.raises(ValueError, match="rotary_precision must be one of"):
        GLMConfig(num_layers=1, hidden_size=128, num_attention_heads=1, inner_hidden_size=32, vocab_size=64,
                  rotary_precision="fp16")


def test_rotary_precision_in_yaml(tmp_path):
    path = tmp_path / "exact.yaml"
    path.write_text("model:\n  preset: glm-130b\n  rotary_precision: fp32\n")
    assert load_config(path).model.rotary_precision == "fp32"
    assert load_config("glm-tiny").model.rotary_precision == "sat"


HEAD_DIM, OFFSET, LENGTH = 128, 1000, 1150


def offset_head_model(precision: str) -> GLM:
    """A 1-layer, 1-head fp16 GLM (head dim 128) whose attention copies the tokens OFFSET and OFFSET+1 back.

    q and k are constant (biases only), so the score between positions m > n is a sum over frequency pairs
    i of a_i * cos((m - n) * theta_i - phase_i): rotary alone decides where attention goes. The phases put
    the peak half-way between offsets 1000 and 1001, and the weights a_i are large (peak score 60), so
    attention splits about evenly between those two keys and is near zero elsewhere. At that knife edge the
    frequencies' rounding decides the split: fp16-rounded frequencies move each angle by offset x
    rounding error, most for pair 1 (theta 0.87, 0.24 rad at offset 1000), which is why it gets the largest
    weight; the low-frequency pairs keep the peak in place. Values copy the (normalised) token embedding and
    the tied output layer reads it back, so the split shows in the logits.
    """
    config = GLMConfig(num_layers=1, hidden_size=HEAD_DIM, num_attention_heads=1, inner_hidden_size=32,
                       vocab_size=64, max_sequence_length=2048, rotary_precision=precision)
    model = GLM(config)
    state = {name: torch.zeros_like(t) for name, t in model.state_dict().items()}  # MLP stays zero
    state["transformer.word_embeddings.weight"] = 0.1 * torch.randn(64, HEAD_DIM,
                                                                    generator=torch.Generator().manual_seed(0))
    for name in state:
        if name.endswith("layernorm.weight"):
            state[name] = torch.ones(HEAD_DIM)
    half = HEAD_DIM // 2
    weight = torch.zeros(half, dtype=torch.float64)
    weight[1] = 20.0
    weight[4:] += 40.0 / (half - 4)
    key = torch.zeros(HEAD_DIM, dtype=torch.float64)
    key[:half] = (weight * math.sqrt(HEAD_DIM)).sqrt()  # q.k / sqrt(head_dim) = sum of weights at the peak
    angle = -(OFFSET + 0.5) / 10000.0 ** (torch.arange(0, HEAD_DIM, 2, dtype=torch.float64) / HEAD_DIM)
    query = torch.cat([key[:half] * angle.cos() - key[half:] * angle.sin(),
                       key[half:] * angle.cos() + key[:half] * angle.sin()])  # key rotated back by 1000.5
    p = "transformer.layers.0.attention."
    state[p + "query_key_value.bias"] = torch.cat([query.float(), key.float(), torch.zeros(HEAD_DIM)])
    state[p + "query_key_value.weight"] = torch.cat([torch.zeros(2 * HEAD_DIM, HEAD_DIM), torch.eye(HEAD_DIM)])
    state[p + "dense.weight"] = 3.0 * torch.eye(HEAD_DIM)
    model.load_state_dict(state)
    return model.half().eval().requires_grad_(False)


def test_long_context_logits_follow_sats_rotary_tables():
    tokens = tuple(torch.randint(0, 64, (LENGTH,), generator=torch.Generator().manual_seed(1)).tolist())
    ids, positions, allowed, _ = prefill_inputs([Context(tokens, None)], "cpu")
    model = offset_head_model("sat")
    sat_cos, sat_sin = sat_tables(torch.float16, LENGTH)  # (L, 1, 128); both halves hold the same values
    index = positions[0]
    with_sat_tables = reference_logits(model, list(tokens), index.tolist(), allowed[0, 0],
                                       (sat_cos[index, 0, :64], sat_sin[index, 0, :64]))
    exact = reference_logits(model, list(tokens), index.tolist(), allowed[0, 0])
    far = slice(OFFSET + 1, LENGTH)  # queries that have a key OFFSET back
    scale = with_sat_tables[far].abs().max()  # about 13
    # The test can fail: exact rotary against SAT's fp16 tables moves these logits by whole units.
    assert (exact[far] - with_sat_tables[far]).abs().max() > 0.2 * scale
    default = model(ids, positions, allowed)[0].double()
    assert (default[far] - with_sat_tables[far]).abs().max() < 0.005 * scale  # fp16 rounding (0.05 %)
    assert torch.equal(default[far].argmax(-1), with_sat_tables[far].argmax(-1))
    exact_option = offset_head_model("fp32")(ids, positions, allowed)[0].double()
    # Looser: at the exact tables' even split fp16 noise in the scores moves the split a little (1.2 %).
    assert (exact_option[far] - exact[far]).abs().max() < 0.05 * scale


def test_logits_at_projects_only_the_chosen_positions(small_model):
    ids, positions, allowed, _ = prefill_inputs([Context((3, 4, 5, 6, 7), None), Context((9, 7), 0)], "cpu")
    full = small_model(ids, positions, allowed)  # (2, 5, vocab)
    at = torch.tensor([[4, 0, 2], [3, 3, 1]])
    picked = small_model(ids, positions, allowed, logits_at=at)
    assert picked.shape == (2, 3, full.shape[-1])
    assert torch.allclose(picked, full.gather(1, at[:, :, None].expand(-1, -1, full.shape[-1])), atol=1e-6)
