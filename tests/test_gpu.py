"""GPU-only checks (marker `gpu`, skipped without CUDA): CUDA-graph decoding, the fused kernels against the eager
ops, the quantized kernels against dequantize + matmul, and the resident cluster on GPU engines.

Run them on a GPU machine with `python -m pytest -m gpu tests/test_gpu.py` (README, developer section).
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import ClassVar

import ipyparallel as ipp
import pytest
import torch

from glmkit.config import GLMConfig, load_config
from glmkit.generate.pipeline import GLMPipeline, load_model, load_tokenizer
from glmkit.generate.sampling import GenerationSettings
from glmkit.generate.tokens import Context, Generator, prefill_inputs

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

PROMPTS = ["def read_config(path):\n    with open(path) as f:\n", "import os\nimport [MASK]\n",
           "Return True if the [MASK] is empty, False otherwise."]


@pytest.fixture(scope="module")
def gpu_config():
    return load_config("glm-tiny").replace(device="cuda", dtype="fp16")


def _random_glm(layers=2, hidden=256, heads=2, inner=512, vocab=1024, dtype=torch.float16):
    """A random GLM with head dim 128 (GLM-130B's) on the GPU, fan-in scaled as glmkit.lab.random_model does."""
    from glmkit.lab.random_model import build_random_model

    config = GLMConfig(num_layers=layers, hidden_size=hidden, num_attention_heads=heads, inner_hidden_size=inner,
                       vocab_size=vocab, max_sequence_length=2048)
    return build_random_model(config, dtype, torch.device("cuda"), seed=1)


def test_graph_replay_and_kernels_generate_what_eager_ops_generate(gpu_config):
    tokenizer = load_tokenizer(gpu_config)
    fast = GLMPipeline(load_model(gpu_config), tokenizer)  # CUDA graphs + fused kernels (the default on GPU)
    plain = GLMPipeline(load_model(gpu_config), tokenizer)
    plain.generator = Generator(plain.model, use_graphs=False, kernels=False)
    assert fast.generator.steps.use_graphs and fast.generator.lookahead
    for _ in range(2):  # the second round replays the captured graphs over dirty caches
        got = [r.text for r in fast.generate(PROMPTS, max_new_tokens=24)]
        assert got == [r.text for r in plain.generate(PROMPTS, max_new_tokens=24)]
    assert any(step.graph is not None for step in fast.generator.steps.steps.values())


def test_decode_step_logits_with_kernels_track_eager_ops():
    model = _random_glm()
    generator = Generator(model, use_graphs=True, kernels=True)
    contexts = [Context(tuple(range(10, 300)), None), Context(tuple(range(50, 90)), 20)]
    step, logits, pads = generator.prefill(contexts, new_tokens=4)
    ids = logits.argmax(-1)[:, None]
    positions = torch.tensor([[290], [20]])
    fused = step(ids, positions, 290, pads).float().clone()
    from glmkit.kernels import remove_decode_kernels

    remove_decode_kernels(model)
    eager = step.run_eager().float()  # the same inputs and cache slot, the plain model's ops
    scale = eager.abs().max().item()
    assert (fused - eager).abs().max().item() <= 1e-2 * scale
    assert torch.equal(fused.argmax(-1), eager.argmax(-1))


@pytest.mark.parametrize("batch", [1, 8, 32])
def test_decode_attention_over_split_cache_ranges_matches_one_program(batch):
    # GLM-130B's head count and head dim at a 2,000-position cache, the long-context case the split serves.
    from glmkit.kernels.attention import choose_splits, decode_attention
    from glmkit.model import rotary_tables

    heads, hd, length, slot = 96, 128, 2048, 1990
    generator = torch.Generator(device="cuda").manual_seed(3)
    qkv = torch.randn(batch, 1, heads, 3, hd, device="cuda", generator=generator).half()
    keys = torch.randn(batch, heads, length, hd, device="cuda", generator=generator).half()
    values = torch.randn_like(keys)
    cos, sin = rotary_tables(torch.full((batch, 1), slot, device="cuda"), hd, 10000.0, torch.float16)
    allowed = (torch.arange(length, device="cuda") <= slot).expand(batch, 1, 1, length)
    if batch != 8:
        assert choose_splits(batch * heads, length, qkv.device) > 1  # the automatic choice splits here
    single = decode_attention(qkv, cos, sin, keys.clone(), values.clone(), torch.tensor([slot], device="cuda"),
                              allowed, 7.0, splits=1).float()
    split = decode_attention(qkv, cos, sin, keys, values, torch.tensor([slot], device="cuda"), allowed, 7.0,
                             splits=None if batch != 8 else 4).float()
    assert (split - single).abs().max().item() <= 2e-3 * single.abs().max().item()


def test_lookahead_decoding_gives_the_tokens_of_step_by_step_decoding():
    model = _random_glm()
    contexts = [Context(tuple(range(10, 60)), None), Context(tuple(range(70, 80)), 5)]
    settings = GenerationSettings(max_new_tokens=32)
    ahead = Generator(model)
    tokens = [o.tokens for o in ahead.generate(contexts, settings, end_tokens=())]
    ahead.lookahead = False
    assert tokens == [o.tokens for o in ahead.generate(contexts, settings, end_tokens=())]


def test_chunked_prefill_attention_matches_one_chunk(monkeypatch):
    import glmkit.model as model_module

    model = _random_glm(layers=1)
    ids, positions, allowed, _ = prefill_inputs([Context(tuple(i % 1000 for i in range(5, 1500)), None)], "cuda")
    with torch.inference_mode():
        whole = model(ids, positions, allowed).float()
        monkeypatch.setattr(model_module, "SCORE_CHUNK_ELEMENTS", 2 * 1495 * 100)  # 100 queries a chunk
        chunked = model(ids, positions, allowed).float()
    assert (chunked - whole).abs().max().item() <= 1e-3 * whole.abs().max().item()


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("rows", [1, 16, 300])
def test_quantized_kernels_match_dequantize_then_matmul(bits, rows):
    from glmkit.kernels import quant as quant_kernels
    from glmkit.quantization import dequantize_weight, quantize_weight

    generator = torch.Generator(device="cuda").manual_seed(bits * 1000 + rows)
    w = torch.randn(3072, 1024, device="cuda", generator=generator)
    q, scale = quantize_weight(w, bits)
    x = torch.randn(rows, 1, 1024, device="cuda", generator=generator, dtype=torch.float16)
    bias = torch.randn(3072, device="cuda", generator=generator, dtype=torch.float16)
    expected = x.float() @ dequantize_weight(q, scale, bits, torch.float32).T + bias.float()
    got = quant_kernels.int_linear(x, q, scale, bias, bits).float()
    assert (got - expected).abs().max().item() <= 2e-3 * expected.abs().max().item()
    assert torch.equal(quant_kernels.dequantize(q, scale, bits, torch.float16),
                       dequantize_weight(q, scale, bits, torch.float16))


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("dtype, magnitude", [(torch.float16, 1.0), (torch.float16, 30000.0),
                                              (torch.bfloat16, 1.0), (torch.float32, 1.0)])
def test_word_gemv_ptx_modes_match_the_portable_one(bits, dtype, magnitude):
    """The word GEMV's PTX paths (fp16 products for fp16 x, exact fp32 for bf16/fp32) against its shift path
    and dequantize + matmul, with ragged tiles and K splits; fp16 inputs near the top of fp16's range must not
    overflow the fp16 partial sums."""
    from glmkit.kernels import gemv, quant as quant_kernels
    from glmkit.quantization import dequantize_weight, quantize_weight

    generator = torch.Generator(device="cuda").manual_seed(int(magnitude))
    # weights scaled down with x, so that the outputs fit fp16 while x's products would not
    q, scale = quantize_weight(torch.randn(1000, 12288 + 8, device="cuda", generator=generator) / magnitude, bits)
    x = (torch.randn(1, 12288 + 8, device="cuda", generator=generator) * magnitude).clamp(-65000, 65000)
    x = x.to(dtype)
    expected = x.double() @ dequantize_weight(q, scale, bits, torch.float64).T
    assert gemv.math_mode(x, True) == (2 if dtype == torch.float16 else 1)
    for config in (quant_kernels.INT4_GEMV_DEFAULT, quant_kernels.KernelConfig(block_m=1, block_n=64,
                                                                                 block_k=256, split_k=3)):
        fast = quant_kernels.int_linear(x, q, scale, None, bits, config).double()
        portable = quant_kernels.int_linear(x, q, scale, None, bits, replace(config, fast_unpack=False)).double()
        assert torch.isfinite(fast).all()
        size = expected.abs().max().item()
        assert (fast - expected).abs().max().item() <= 4e-3 * size  # output rounding (bf16: 2^-8)
        assert (fast - portable).abs().max().item() <= 4e-3 * size


def test_one_engine_cluster_on_the_gpu_generates_what_the_pipeline_does(gpu_config):
    from glmkit.serve.cluster import GLMCluster

    pipeline = GLMPipeline.from_config(gpu_config)
    expected = [r.text for r in pipeline.generate(PROMPTS, max_new_tokens=16)]
    del pipeline
    with GLMCluster(config=gpu_config, n=1) as cluster:
        events = []
        got = cluster.generate(PROMPTS, max_new_tokens=16, on_text=events.append)
        assert [r.text for r in got] == expected
        assert "".join(e.text for e in events if e.index == 0) == got[0].completion


@ipp.interactive
def _add_sys_path(path):
    import sys

    if path not in sys.path:
        sys.path.insert(0, path)


@dataclass(frozen=True)
class CurrentDevice:
    """The CUDA device current where the request runs, per rank."""

    reduction: ClassVar[str] = "all"

    def run(self, worker, channel) -> int:
        return torch.cuda.current_device()


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs")
def test_two_engine_nccl_cluster_generates_what_one_process_does(gpu_config):
    from glmkit.serve.cluster import GLMCluster

    pipeline = GLMPipeline.from_config(gpu_config)
    expected = [r.text for r in pipeline.generate(PROMPTS, max_new_tokens=16)]
    del pipeline
    with GLMCluster(config=gpu_config, n=2) as cluster:
        assert [r.text for r in cluster.generate(PROMPTS, max_new_tokens=16)] == expected
        # Requests run in each engine's request thread: on that rank's own GPU.
        cluster._client[:].apply_sync(_add_sys_path, str(Path(__file__).parent))
        assert cluster.call(CurrentDevice()) == [0, 1]


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs")
def test_symmetric_all_reduce_sums_like_nccl():
    import torch.multiprocessing as mp

    from glmkit.parallel.comm import free_port

    mp.spawn(_all_reduce_rank, args=(2, free_port()), nprocs=2, join=True)


def _all_reduce_rank(rank: int, world_size: int, port: int) -> None:
    import torch.distributed as dist

    from glmkit.parallel.comm import AllReduce, init_process_groups

    device = torch.device("cuda", rank)
    torch.cuda.set_device(device)
    groups = init_process_groups(rank, world_size, device, "127.0.0.1", port)
    try:
        for dtype in (torch.float16, torch.bfloat16, torch.float32):
            reduce = AllReduce.setup(groups.data, device, dtype)
            x = torch.full((4, 12288), float(rank + 1), dtype=dtype, device=device)
            expected = x.clone()
            dist.all_reduce(expected, group=groups.data)
            assert torch.equal(reduce(x), expected)
    finally:
        groups.close()


def test_scoring_on_the_gpu_tracks_fp32_on_the_cpu_and_the_gpu_generate(gpu_config):
    from glmkit.generate.scoring import Tokens

    gpu = GLMPipeline.from_config(gpu_config)  # fp16, fused kernels
    cpu = GLMPipeline.from_config(load_config("glm-tiny"))
    choices = [["os", "sys", "re"], "empty", ["list", "string"]]
    for options in ({}, {"use_task_mask": True, "include_end": True}):
        for got, expected in zip(gpu.score(PROMPTS, choices, **options), cpu.score(PROMPTS, choices, **options)):
            pairs = zip(got, expected) if isinstance(got, list) else [(got, expected)]
            for a, b in pairs:
                assert a.tokens == b.tokens
                assert max(abs(x - y) for x, y in zip(a.token_logprobs, b.token_logprobs)) < 0.15  # fp16 vs fp32
    blank = gpu.generate(PROMPTS[1], max_new_tokens=8, logprobs=True).blanks[0]
    score = gpu.score(PROMPTS[1], Tokens(blank.tokens), append_eos=True)  # generate's layout of a mid-text mask
    assert max(abs(x - r.logprob) for x, r in zip(score.token_logprobs, blank.logprobs)) < 0.05


def test_score_bench_on_the_gpu_reports_a_matmul_fraction():
    from glmkit.lab.score_bench import ScoreBenchOptions, run_score_bench

    config = GLMConfig(num_layers=2, hidden_size=1024, num_attention_heads=8, inner_hidden_size=2048,
                       vocab_size=4096, max_sequence_length=1024)
    result = run_score_bench(ScoreBenchOptions(config=config, device="cuda", batch_tokens=2048, context_tokens=256,
                                               repeats=2, matmul_size=4096))
    assert result["logprobs_finite"] and result["matmul_dtype"] == "fp16"
    assert 0 < result["matmul_fraction"] < 1.5 and result["peak_gpu_bytes"] > 0


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


def _compare_probes(fast, reference, tolerance: float, prompt: str = PROMPTS[1]) -> None:
    """trace, logit_lens and patch on two backends (on the prompt and along a generation) agree to `tolerance`."""
    from glmkit.inspect import PATCHABLE, SITES

    for kwargs in ({}, {"max_new_tokens": 8}):
        a, b = fast.trace(prompt, sites=list(SITES), **kwargs), reference.trace(prompt, sites=list(SITES), **kwargs)
        assert a.ids == b.ids and torch.equal(a.allowed, b.allowed)
        for site, values in b.values.items():
            assert _relative(a[site], values) <= tolerance, site
        la, lb = fast.logit_lens(prompt, target=a.ids[-1], **kwargs), reference.logit_lens(prompt, target=a.ids[-1],
                                                                                              **kwargs)
        last = [lens.top[(lens.top["layer"] == lens.layers[-1]) & (lens.top["rank"] == 1)] for lens in (la, lb)]
        assert (last[0]["token_id"].to_numpy() == last[1]["token_id"].to_numpy()).all()
        assert (la.top["prob"] - lb.top["prob"]).abs().max() <= tolerance
        assert (la.target["prob"] - lb.target["prob"]).abs().max() <= tolerance
    clean, corrupted = PROMPTS[1], PROMPTS[1].replace("os", "sys", 1)  # the same token count
    kwargs = dict(sites=list(PATCHABLE), layers=[0, 3, -1], positions=[0, 2, -2, -1])
    pa, pb = fast.patch(clean, corrupted, 20004, **kwargs), reference.patch(clean, corrupted, 20004, **kwargs)
    assert (pa["patched_logprob"] - pb["patched_logprob"]).abs().max() <= 10 * tolerance
    assert (fast.patch(clean, clean, 20004, **kwargs)["logprob_change"] == 0).all()


def test_probes_on_cuda_with_fused_kernels_match_the_cpu(gpu_config):
    """fp32 on the GPU, CUDA graphs and fused kernels applied (the default there), against the CPU's eager ops;
    the decode graphs captured before the probes still generate the same text after them."""
    from glmkit.kernels import FusedAddLayerNorm, FusedDecodeAttention

    cpu = GLMPipeline.from_config(load_config("glm-tiny"))
    gpu = GLMPipeline.from_config(gpu_config.replace(dtype="fp32"))
    block = gpu.model.transformer.layers[0]
    assert isinstance(block.attention, FusedDecodeAttention) and isinstance(block.input_layernorm, FusedAddLayerNorm)
    texts = [r.text for r in gpu.generate(PROMPTS, max_new_tokens=16)]
    hooks = sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in gpu.model.modules())
    _compare_probes(gpu, cpu, 1e-4)
    assert sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in gpu.model.modules()) == hooks
    assert [r.text for r in gpu.generate(PROMPTS, max_new_tokens=16)] == texts


def test_fp16_probes_with_fused_kernels_track_the_eager_ops(gpu_config):
    tokenizer = load_tokenizer(gpu_config)
    fast = GLMPipeline(load_model(gpu_config), tokenizer)
    plain = GLMPipeline(load_model(gpu_config), tokenizer)
    plain.generator = Generator(plain.model, use_graphs=False, kernels=False)
    _compare_probes(fast, plain, 1e-2)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs")
def test_two_engine_nccl_cluster_probes_equal_one_process(gpu_config):
    from glmkit.serve.cluster import GLMCluster

    cpu = GLMPipeline.from_config(load_config("glm-tiny"))
    with GLMCluster(config=gpu_config.replace(dtype="fp32"), n=2) as cluster:
        _compare_probes(cluster, cpu, 1e-4)
