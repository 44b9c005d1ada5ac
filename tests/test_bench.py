"""`glmkit bench` on CPU with tiny shapes: every documented key, byte counts, floor arithmetic, TP, SAT errors."""
from __future__ import annotations

import dataclasses
import json
import sys

import pytest
import torch

from glmkit.lab import bench
from glmkit.lab.bench import BATCH_KEYS, RESULT_KEYS, BenchOptions, context_limits, prefill_workspace_bytes
from glmkit.cli import main
from glmkit.config import GLMConfig, load_config
from glmkit.generate.tokens import Context, generate_tokens, prefill_inputs
from glmkit.lab.random_model import build_random_model, random_contexts, weight_bytes
from glmkit.generate.sampling import GenerationSettings

TINY = GLMConfig(num_layers=2, hidden_size=64, num_attention_heads=4, inner_hidden_size=96, vocab_size=256,
                 max_sequence_length=128)
FAST = ["--device", "cpu", "--tokens", "3", "--prompt-tokens", "6", "--repeats", "1", "--copy-mib", "4"]


@pytest.fixture(scope="module")
def tiny_result():
    """One CLI run on the shipped glm-tiny config (fp32 on CPU), batches 1 and 2, with the context check."""
    import contextlib
    import io
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert main(["bench", "--config", "glm-tiny", "--batches", "1,2", "--verify-context", *FAST]) == 0
    return json.loads(out.getvalue())


def test_json_has_every_documented_key_with_sane_values(tiny_result):
    r = tiny_result
    assert set(RESULT_KEYS) <= set(r), set(RESULT_KEYS) - set(r)
    assert [b["batch"] for b in r["batches"]] == [1, 2]
    for record in r["batches"]:
        assert set(BATCH_KEYS) <= set(record), set(BATCH_KEYS) - set(record)
        for key in ("ms_per_token", "step_ms", "eager_step_ms", "prefill_ms", "tokens_per_s"):
            assert record[key] > 0, key
        assert record["tokens_per_s"] == pytest.approx(record["batch"] * 1e3 / record["ms_per_token"])
        assert record["python_overhead_ms"] == pytest.approx(record["ms_per_token"] - record["step_ms"])
        assert record["cache_length"] >= r["prompt_tokens"] + r["new_tokens"]
        assert record["peak_gpu_bytes"] is None  # CPU
    assert r["device"] == "cpu" and r["dtype"] == "fp32" and r["tp"] == 1 and r["quantization"] is None
    assert r["config_name"] == "glm-tiny" and r["config"] == dataclasses.asdict(load_config("glm-tiny").model)
    assert r["logits_finite"] is True
    assert r["sat"] is None and r["speedup_vs_sat"] is None
    # The host has room for far more than the model's positions: the check runs at that limit.
    assert r["context_check"]["tokens"] == r["config"]["max_sequence_length"] and r["context_check"]["fits"]
    assert 0 < r["copy_bandwidth_gbs"] and 0 < r["read_bandwidth_gbs"]
    assert r["device_memory_bytes"] > 0 and r["max_context_tokens"] >= r["max_context_tokens_with_prefill"] > 0


def test_bytes_and_floor_arithmetic(tiny_result):
    r = tiny_result
    config = load_config("glm-tiny").model
    assert r["parameters_per_gpu"] == config.num_parameters()
    assert r["weight_bytes_per_gpu"] == 4 * config.num_parameters()  # fp32
    assert r["copy_bytes"] == 4 * 2**20
    assert r["copy_read_only_equivalent_gbs"] == pytest.approx(r["copy_bandwidth_gbs"] / 2)
    floor = r["weight_bytes_per_gpu"] / (r["copy_bandwidth_gbs"] * 1e9) * 1e3
    assert r["bandwidth_floor_ms"] == pytest.approx(floor)
    assert r["floor_fraction"] == pytest.approx(floor / r["ms_per_token"])
    assert r["floor_fraction_step"] == pytest.approx(floor / r["step_ms"])
    one, two = r["batches"]
    assert r["ms_per_token"] == one["ms_per_token"] and r["prefill_ms"] == one["prefill_ms"]
    assert two["throughput_vs_batch1"] == pytest.approx(two["tokens_per_s"] / one["tokens_per_s"])
    assert r["batch_throughput_ratio"] == two["throughput_vs_batch1"] and r["batch_throughput_ratio_batch"] == 2
    # KV cache: keys and values of every layer, hidden_size wide, fp32.
    assert r["kv_cache_bytes_per_token"] == 2 * config.num_layers * config.hidden_size * 4
    assert one["kv_cache_bytes"] == r["kv_cache_bytes_per_token"] * one["cache_length"]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_random_model_is_on_the_device_and_bytes_match_parameters(dtype):
    model = build_random_model(TINY, dtype, "cpu", seed=1)
    params = list(model.parameters())
    assert all(p.device.type == "cpu" and p.dtype == dtype and not p.requires_grad for p in params)
    assert weight_bytes(model) == sum(p.numel() * p.element_size() for p in params)
    assert weight_bytes(model) == TINY.num_parameters() * torch.empty(0, dtype=dtype).element_size()
    assert all(p.float().std() > 0 for p in params)  # random, never zeros
    again = build_random_model(TINY, dtype, "cpu", seed=1)
    assert all(torch.equal(a, b) for a, b in zip(params, again.parameters()))  # the seed fixes the weights


def test_tensor_parallel_shards_split_and_replicate():
    ranks = [build_random_model(TINY, torch.float32, "cpu", rank=r, world_size=2) for r in range(2)]
    names = dict(ranks[0].named_parameters())
    other = dict(ranks[1].named_parameters())
    assert sum(weight_bytes(m) for m in ranks) < 2 * 4 * TINY.num_parameters()
    assert torch.equal(names["transformer.layers.0.input_layernorm.weight"],
                       other["transformer.layers.0.input_layernorm.weight"])  # replicated: equal on every rank
    assert names["transformer.layers.0.attention.query_key_value.weight"].shape == (3 * 64 // 2, 64)
    assert not torch.equal(names["transformer.word_embeddings.weight"], other["transformer.word_embeddings.weight"])


@pytest.mark.parametrize("quantization", [None, "int8", "int4"])
def test_random_weights_are_one_model_at_every_tp_size(quantization):
    # Each rank holds its slice of the same full tensors, so runs at different TP sizes are comparable.
    from glmkit.parallel.layout import merge_tensors
    full = dict(build_random_model(TINY, torch.float16, "cpu", quantization=quantization, seed=2).named_parameters())
    for world_size in (2, 4):
        ranks = [dict(build_random_model(TINY, torch.float16, "cpu", quantization=quantization, seed=2,
                                         rank=r, world_size=world_size).named_parameters())
                 for r in range(world_size)]
        assert set(ranks[0]) == set(full)
        for name, tensor in full.items():
            assert torch.equal(merge_tensors(name, [rank[name] for rank in ranks]), tensor), (world_size, name)


def test_random_weights_are_not_chaotic():
    # GLM-130B's width with std 0.02 made fp32 and bf16 logits differ by ~11 after 12 layers (rounding
    # amplified layer by layer); the fan-in scaled weights must keep two precisions in agreement.
    config = GLMConfig(num_layers=6, hidden_size=1024, num_attention_heads=8, inner_hidden_size=2688,
                       vocab_size=4096, max_sequence_length=64)
    contexts = random_contexts(config, 2, 24, seed=5)
    logits = {}
    for dtype in (torch.float32, torch.bfloat16):
        model = build_random_model(config, dtype, "cpu", seed=4)
        ids, positions, allowed, _ = prefill_inputs(contexts, "cpu")
        with torch.no_grad():
            logits[dtype] = model(ids, positions, allowed, last_only=True).float()
        for name, param in model.named_parameters():  # what keeps it stable at any width: gain < 1
            if param.dim() == 2 and "word_embeddings" not in name:
                assert param.float().std() * param.shape[1] ** 0.5 == pytest.approx(0.5, rel=0.05), name
    exact, rounded = logits[torch.float32], logits[torch.bfloat16]
    assert exact.std() > 0.3  # peaked enough to choose tokens
    assert (exact - rounded).abs().max() < 0.1 * exact.std()
    assert torch.equal(exact.argmax(-1), rounded.argmax(-1))


@pytest.mark.parametrize("mode,bits", [("int8", 8), ("int4", 4)])
def test_quantized_random_model_bytes(mode, bits):
    model = build_random_model(TINY, torch.float16, "cpu", quantization=mode)
    h, f = TINY.hidden_size, TINY.inner_hidden_size
    linear = 3 * h * h + h * h + 2 * f * h + f * h  # the four quantized weights of a layer
    rows = 3 * h + h + 2 * f + h  # one fp16 scale per output row
    float_elements = TINY.num_parameters() - TINY.num_layers * linear
    expected = 2 * float_elements + TINY.num_layers * (linear * bits // 8 + 2 * rows)
    assert weight_bytes(model) == expected


def test_quantized_bench_runs_end_to_end():
    options = BenchOptions(config=TINY, dtype="fp32", device="cpu", quantization="int4", batches=(1,),
                           prompt_tokens=4, new_tokens=3, repeats=1, copy_bytes=2**20)
    r = bench.run_bench(options)
    assert r["quantization"] == "int4" and r["ms_per_token"] > 0 and r["logits_finite"]
    assert r["weight_bytes_per_gpu"] < 4 * TINY.num_parameters() / 2
    assert r["kv_cache_bytes_per_token"] == 2 * TINY.num_layers * TINY.hidden_size * 4  # activations stay fp32


def test_context_limits_arithmetic():
    decode, with_prefill = context_limits(TINY, 1, memory_free=10_000_000, workspace=1_000_000, kv_per_token=1000,
                                          element=2)
    assert decode == 9000
    budget = 9_000_000
    cost = lambda n: n * 1000 + prefill_workspace_bytes(TINY, 1, n, 2)  # noqa: E731
    assert cost(with_prefill) <= budget < cost(with_prefill + 1)
    assert context_limits(TINY, 1, 100, 1000, 10, 2) == (0, 0)  # nothing left


def test_tensor_parallel_two_processes_on_cpu():
    options = BenchOptions(config=TINY, config_name="tiny", dtype="fp32", device="cpu", tp=2, batches=(1,),
                           prompt_tokens=4, new_tokens=3, repeats=1, copy_bytes=2**20)
    r = bench.run_bench(options)
    assert r["tp"] == 2 and len(r["peak_gpu_bytes_per_rank"]) == 2
    assert r["weight_bytes_per_gpu"] < 4 * TINY.num_parameters()
    assert r["ms_per_token"] > 0 and r["logits_finite"]
    assert r["kv_cache_bytes_per_token"] == 2 * TINY.num_layers * TINY.hidden_size // 2 * 4
    assert r["all_reduce"] == "nccl"  # gloo on CPU: symmetric memory is for GPUs
    collective = r["batches"][0]
    assert 0 < collective["collective_ms"] and collective["collective_share"] == pytest.approx(
        collective["collective_ms"] / collective["step_ms"])
    single = bench.run_bench(dataclasses.replace(options, tp=1))
    assert single["batches"][0]["collective_ms"] is None
    assert r["batches"][0]["greedy_tokens"] == single["batches"][0]["greedy_tokens"]  # same weights, same tokens
    ours, theirs = (dict(run["prefill_top_logits"]) for run in (r, single))
    assert list(ours) == list(theirs) and len(ours) == 16  # the same 16 tokens in the same order
    assert all(abs(ours[t] - theirs[t]) < 1e-4 for t in ours)
    assert len(single["batches"][0]["greedy_tokens"]) == options.new_tokens


def test_options_are_checked_before_any_work(capsys):
    with pytest.raises(ValueError, match="exceeds max_sequence_length"):
        BenchOptions(config=TINY, prompt_tokens=100, new_tokens=64)
    with pytest.raises(ValueError, match="do not divide"):
        BenchOptions(config=TINY, tp=3)
    with pytest.raises(ValueError, match="fp16"):
        BenchOptions(config=TINY, dtype="fp32", against="sat", prompt_tokens=8, new_tokens=8)
    assert main(["bench", "--config", "glm-tiny", "--batches", "1,x", *FAST]) == 2
    assert "--batches" in capsys.readouterr().err
    assert main(["bench", "--config", "no-such-config", *FAST]) == 2
    assert "neither a preset" in capsys.readouterr().err


def test_layers_override_of_a_preset():
    name, config, kit = bench.resolve_config("glm-130b", layers=12)
    assert name == "glm-130b" and config.num_layers == 12 and config.hidden_size == 12288


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error on a machine without CUDA")
def test_against_sat_without_cuda_is_a_clear_error(capsys):
    assert main(["bench", "--config", "glm-tiny", "--dtype", "fp16", "--against", "sat", *FAST]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and ("CUDA" in err or "not importable" in err), err


def test_against_sat_without_sat_is_a_clear_error(monkeypatch, capsys):
    for name in [m for m in sys.modules if m == "sat" or m.startswith("sat.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "sat", None)  # `import sat` now raises ImportError
    assert main(["bench", "--config", "glm-tiny", "--dtype", "fp16", "--against", "sat", *FAST]) == 2
    err = capsys.readouterr().err
    assert "SwissArmyTransformer is not importable" in err and "pip install --no-deps" in err


def test_against_sat_on_cpu_dry_run(monkeypatch):
    """SAT's GLM130B adopts glmkit's tensors and decodes the same greedy tokens (SAT pointed at the CPU)."""
    pytest.importorskip("sat.model.official.glm130B_model")
    import logging
    # SAT's logger keeps the stderr it found at import, which may be an earlier test's closed capture.
    for handler in logging.getLogger("sat").handlers:
        handler.stream = sys.stderr  # (setStream would flush the closed one)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: "cpu")  # SAT allocates buffers there
    from glmkit.lab import sat_reference

    # Stronger weights than bench's default so greedy choices are not near ties in fp16.
    config = dataclasses.replace(TINY, vocab_size=1024)
    options = BenchOptions(config=config, dtype="fp16", device="cpu", batches=(1, 2), prompt_tokens=6,
                           new_tokens=4, repeats=1, copy_bytes=2**20, against="sat")
    r = bench.bench_process(options)
    assert r["sat"]["prefill_max_abs_diff"] < 0.05, r["sat"]
    assert [b["batch"] for b in r["sat"]["batches"]] == [1, 2]
    assert r["sat"]["ms_per_token"] > 0 and r["speedup_vs_sat"] > 0

    import torch.distributed as dist
    model = build_random_model(config, torch.float16, "cpu", seed=3)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "layernorm" not in name:
                param.mul_(15)
    sat_reference.init_distributed(0, 1, _port(), "gloo")
    try:
        reference = sat_reference.load_sat_state_dict(config, model.state_dict(), 1, "cpu")
        assert reference.transformer.word_embeddings.weight.data_ptr() == \
            model.transformer.word_embeddings.weight.data_ptr()  # shared, not copied
        contexts = [Context(tuple(range(40, 50))), Context(tuple(range(300, 310)))]
        theirs = sat_reference.sat_decode_loop(reference, contexts, 6, "cpu")
    finally:
        sat_reference.close_distributed()
    assert not dist.is_initialized()
    ours = generate_tokens(model, contexts, GenerationSettings(max_new_tokens=6), end_tokens=())
    assert theirs["tokens"].tolist() == [o.tokens for o in ours]
    assert len(theirs["step_ms"]) == 5 and len(theirs["forward_ms"]) == 5


def _port() -> int:
    from glmkit.parallel.comm import free_port
    return free_port()



def test_python_overhead_is_not_negative_on_a_cpu_that_stalls(monkeypatch):
    """A shared CPU stalls now and then; ms_per_token (a median of intervals) drops the stalls, so step_ms
    must be the same statistic, or the overhead between them comes out negative (issue 16, defect 8).

    A virtual clock makes it exact: each decode step takes 1 ms, one step in four stalls 40 ms more, and
    nothing else takes time, so the host overhead is 0.
    """
    import time as time_module

    from glmkit.generate.graphs import DecodeStep
    from glmkit.generate.tokens import Generator
    from glmkit.lab.timing import Clock

    now = {"s": 0.0, "steps": 0}
    run = DecodeStep.run_eager

    def timed_run(self):
        now["steps"] += 1
        now["s"] += 0.001 + (0.04 if now["steps"] % 4 == 0 else 0.0)
        return run(self)

    monkeypatch.setattr(DecodeStep, "run_eager", timed_run)
    monkeypatch.setattr(time_module, "perf_counter", lambda: now["s"])
    options = BenchOptions(config=TINY, dtype="fp32", device="cpu", batches=(1,), prompt_tokens=6, new_tokens=8,
                           repeats=3)
    model = build_random_model(TINY, torch.float32, torch.device("cpu"), seed=0)
    record = bench.measure_batch(Generator(model, use_graphs=False), 1, options, Clock(torch.device("cpu")))
    assert record["ms_per_token"] == pytest.approx(1.0) and record["step_ms"] == pytest.approx(1.0), record
    assert record["python_overhead_ms"] == pytest.approx(0.0, abs=1e-9), record


def test_engine_bench_times_the_cluster_and_the_pipeline_on_the_same_weights():
    """`glmkit bench --engines`: random weights installed on 2 CPU engines by a request and in a pipeline; both
    generate the same greedy text from them (one model at every TP size), and every documented key is there."""
    from glmkit.config import load_config
    from glmkit.lab.engine_bench import CALL_KEYS, ENGINE_KEYS, run_engine_bench

    kit = load_config("glm-tiny")
    result = run_engine_bench(kit.model, engines=2, dtype="fp32", device="cpu", tokenizer=kit.tokenizer,
                              prompt_tokens=24, new_tokens=10, short_tokens=3, repeats=1, copy_bytes=2**20)
    assert set(result) == set(ENGINE_KEYS)
    for backend in ("pipeline", "cluster", "cluster_streaming"):
        record = result[backend]
        assert set(CALL_KEYS) <= set(record)
        assert record["generated"] == [3, 10] and record["ms_per_token"] > 0
    assert result["cluster"]["text"] == result["pipeline"]["text"] == result["cluster_streaming"]["text"]
    assert result["engines"] == 2 and result["weight_bytes_per_gpu"] > 0


def test_probe_bench_times_the_lens_and_a_patching_sweep_on_both_backends(capsys):
    """`glmkit bench --probe`: the lens over every layer and position and a layers x positions patching sweep,
    through 2 CPU engines and the pipeline on the same random weights; what each call ships and exchanges."""
    from glmkit.lab.probe_bench import CALL_KEYS, PROBE_KEYS

    assert main(["bench", "--config", "glm-tiny", "--layers", "2", "--probe", "--engines", "2", "--device", "cpu",
                 "--dtype", "fp32", "--prompt-tokens", "24", "--patch-positions", "4", "--repeats", "1"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert set(result) == set(PROBE_KEYS)
    assert result["engines"] == 2 and result["config"]["num_layers"] == 2 and result["device"] == "cpu"
    assert result["lens_cells"] == 2 * result["prompt_tokens"] and result["patch_runs"] == 2 * 4
    for backend in ("cluster", "pipeline"):
        for call in ("lens", "patch"):
            record = result[backend][call]
            assert set(record) == set(CALL_KEYS) and record["wall_s"] > 0 and record["result_bytes"] > 0
    for call in ("lens", "patch"):  # the same result from both backends, built from the ranks' small exchanges
        assert result["cluster"][call]["collective_bytes"] > 0 == result["pipeline"][call]["collective_bytes"]
        assert abs(result["cluster"][call]["result_bytes"] - result["pipeline"][call]["result_bytes"]) < 100
    # A sweep wider than the prompt fails before any engine starts.
    assert main(["bench", "--config", "glm-tiny", "--probe", "--device", "cpu", "--prompt-tokens", "24",
                 "--patch-positions", "99"]) == 2
    assert "patch_positions must be in [1, 26]" in capsys.readouterr().err
