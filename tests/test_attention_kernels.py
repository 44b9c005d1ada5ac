"""The fused decode-attention kernel against glmkit's eager attention, on the CPU through Triton's interpreter."""
from __future__ import annotations

import json

import pytest
import torch

from glmkit.config import GLMConfig

# head_dim 18: not a power of two (the kernel pads it), like the demo model's 24
CONFIG = GLMConfig(num_layers=2, hidden_size=72, num_attention_heads=4, inner_hidden_size=96, vocab_size=300,
                   max_sequence_length=128)


def _attention_case(dtype: torch.dtype, generator: torch.Generator) -> dict:
    from glmkit.kernels import attention as attention_kernels
    from glmkit.kernels import FusedDecodeAttention
    from glmkit.model import KVCache, rotary_tables

    b, length, slot = 2, 300, 257  # 300 positions: a partial last block of BLOCK_T
    attention = FusedDecodeAttention(CONFIG, layer_id=1).to(dtype)
    with torch.no_grad():
        for param in attention.parameters():
            param.normal_(0.0, 0.3, generator=generator)
    shape = (1, b, CONFIG.num_attention_heads, length, CONFIG.head_dim)
    keys, values = torch.randn(shape, generator=generator).to(dtype), torch.randn(shape, generator=generator).to(dtype)
    x = torch.randn(b, 1, CONFIG.hidden_size, generator=generator).to(dtype)
    cos, sin = rotary_tables(torch.tensor([[slot], [40]]), CONFIG.head_dim, CONFIG.rotary_base, dtype)
    positions = torch.arange(length)
    pads = torch.tensor([0, 9])  # the second row is left-padded by 9
    allowed = ((positions >= pads[:, None]) & (positions <= slot))[:, None, None]
    results = {}
    for name, usable in (("kernel", lambda tensor: True), ("eager", lambda tensor: False)):
        cache = KVCache(keys.clone()[:, :, :, :, :].expand(2, *shape[1:]).clone(), values.expand(2, *shape[1:]).clone())
        attention_kernels.kernel_usable, saved = usable, attention_kernels.kernel_usable
        try:
            with torch.no_grad():
                out = attention(x, cos, sin, allowed, cache, torch.tensor([slot]))
        finally:
            attention_kernels.kernel_usable = saved
        results[name] = (out, cache)
    (out_k, cache_k), (out_e, cache_e) = results["kernel"], results["eager"]
    return {"dtype": str(dtype), "output_difference": (out_k.double() - out_e.double()).abs().max().item(),
            "output_scale": out_e.double().abs().max().item(),
            "keys_equal": torch.equal(cache_k.keys, cache_e.keys),
            "values_equal": torch.equal(cache_k.values, cache_e.values)}


def _generation_case() -> dict:
    # The trained demo model (random weights only echo their input), greedy, with and without the kernel.
    from glmkit.kernels import attention as attention_kernels
    from glmkit.config import load_config
    from glmkit.generate.pipeline import GLMPipeline
    from glmkit.generate.tokens import Generator

    pipeline = GLMPipeline.from_config(load_config("glm-tiny"))
    pipeline.generator = Generator(pipeline.model, use_graphs=False, kernels=True)  # fixed-shape steps, eager
    prompts = ["def read_config(path):\n    with open(path) as f:\n", "import os\nimport sys\n\n"]
    texts = {}
    for name, usable in (("kernel", lambda tensor: True), ("eager", lambda tensor: False)):
        attention_kernels.kernel_usable, saved = usable, attention_kernels.kernel_usable
        try:
            texts[name] = [r.text for r in pipeline.generate(prompts, max_new_tokens=8)]
        finally:
            attention_kernels.kernel_usable = saved
    return {"generation": texts}


def _split_case(dtype: torch.dtype, generator: torch.Generator) -> dict:
    # The cache cut into ranges (flash-decoding) against one program per (sequence, head), and against eager.
    from glmkit.kernels.attention import decode_attention
    from glmkit.model import attention_probabilities, rotary_tables, apply_rotary

    b, heads, hd, length, slot, coeff = 2, 3, CONFIG.head_dim, 300, 257, 2.0
    qkv = torch.randn(b, 1, heads, 3, hd, generator=generator).to(dtype)
    keys = torch.randn(b, heads, length, hd, generator=generator).to(dtype)
    values = torch.randn(b, heads, length, hd, generator=generator).to(dtype)
    cos, sin = rotary_tables(torch.tensor([[slot], [40]]), hd, CONFIG.rotary_base, dtype)
    pads = torch.tensor([0, 9])
    positions = torch.arange(length)
    allowed = ((positions >= pads[:, None]) & (positions <= slot))[:, None, None]
    outputs, caches = {}, {}
    for splits in (1, 3):
        k, v = keys.clone(), values.clone()
        outputs[splits] = decode_attention(qkv, cos, sin, k, v, torch.tensor([slot]), allowed, coeff, splits=splits)
        caches[splits] = (k, v)
    # Eager reference on the cache the kernel wrote (the step's k and v at `slot`).
    k, v = caches[1]
    q = apply_rotary(qkv[:, :, :, 0], cos, sin).transpose(1, 2)  # (b, heads, 1, hd)
    probs = attention_probabilities(q, k, allowed, layer_id=int(coeff) - 1)
    eager = torch.matmul(probs, v).transpose(1, 2).reshape(b, 1, heads * hd)
    scale = eager.double().abs().max().item()
    return {"dtype": str(dtype), "split_vs_single": (outputs[3].double() - outputs[1].double()).abs().max().item(),
            "split_vs_eager": (outputs[3].double() - eager.double()).abs().max().item(), "scale": scale,
            "caches_equal": all(torch.equal(a, b_) for a, b_ in zip(caches[1], caches[3]))}


def _run_cases() -> list[dict]:
    generator = torch.Generator().manual_seed(11)
    return ([_attention_case(dtype, generator) for dtype in (torch.float32, torch.float16)] + [_generation_case()]
            + [_split_case(dtype, generator) for dtype in (torch.float32, torch.float16)])


def test_kernel_matches_eager_attention_and_writes_the_same_cache(interpreted):
    for case in interpreted[:2]:
        assert case["keys_equal"] and case["values_equal"], case
        # fp32: summation order only; fp16: about one rounding of outputs a few units in size.
        tolerance = 1e-5 if case["dtype"] == "torch.float32" else 4e-3 * max(1.0, case["output_scale"])
        assert case["output_difference"] <= tolerance, case


def test_greedy_decoding_is_the_same_with_the_kernel(interpreted):
    texts = interpreted[2]["generation"]
    assert texts["kernel"] == texts["eager"]
    assert all(text.strip() for text in texts["kernel"])  # the demo model wrote something


def test_split_cache_ranges_match_one_program_and_eager(interpreted):
    for case in interpreted[3:5]:
        assert case["caches_equal"], case
        # Only the order of fp32 sums differs from one program; fp16 adds one rounding of the output.
        tolerance = 1e-5 if case["dtype"] == "torch.float32" else 4e-3 * max(1.0, case["scale"])
        assert case["split_vs_single"] <= tolerance, case
        assert case["split_vs_eager"] <= tolerance, case


def test_bad_shapes_are_clear_errors():
    from glmkit.kernels.attention import decode_attention

    qkv = torch.zeros(1, 2, 4, 3, 16)
    cache = torch.zeros(1, 4, 8, 16)
    with pytest.raises(ValueError, match=r"qkv of shape \(b, 1, heads, 3, head_dim\)"):
        decode_attention(qkv, torch.zeros(1, 1, 1, 16), torch.zeros(1, 1, 1, 16), cache, cache,
                         torch.zeros(1, dtype=torch.long), torch.ones(1, 1, 1, 8, dtype=torch.bool), 1.0)


if __name__ == "__main__":
    print(json.dumps(_run_cases()))


def test_range_count_follows_programs_per_sm_and_waves(monkeypatch):
    # The rule choose_splits applies on an H200 (132 SMs, GLM-130B's 96 heads), without needing the card:
    # few programs split to fill the SMs, one wave keeps one range, several waves cut long caches to 512.
    from glmkit.kernels import attention

    monkeypatch.setitem(attention._SM_COUNT, 0, 132)
    device = torch.device("cuda", 0)
    chosen = {(batch, length): attention.choose_splits(batch * 96, length, device)
              for batch in (1, 8, 32) for length in (512, 1984, 2048)}
    assert chosen[(1, 2048)] == 8 and chosen[(1, 512)] == 4  # 6 programs per SM, >= 128 positions a range
    assert chosen[(8, 512)] == chosen[(8, 2048)] == 1  # 768 programs: one wave
    assert chosen[(32, 2048)] == chosen[(32, 1984)] == 4 and chosen[(32, 512)] == 1  # 3,072 programs: waves
    assert attention.choose_splits(96, 2048, torch.device("cpu")) == 1
