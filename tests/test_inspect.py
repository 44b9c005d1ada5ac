"""Probes on the demo model (glmkit.inspect): traces, the logit lens and activation patching, in one process and on
a 2-engine tensor-parallel CPU cluster, checked against the plain model run on generation's own inputs. Fuzzed
probe calls: tests/test_fuzz_inspect.py."""
from __future__ import annotations

import pickle
from pathlib import Path

import pytest
import torch

from glmkit.generate.tokens import Context, prefill_inputs
from glmkit.inspect import PATCHABLE, SITES

MASKED = "def [MASK](self, other):\n    return self.value + other.value"  # [MASK]: pinned positions
FEW_SHOT = "English: cheese\nGerman: Käse\nEnglish: house\nGerman:"  # no mask: [gMASK] appended
SHORT = "x = [MASK] + y"
pytestmark = pytest.mark.usefixtures("one_thread")  # conftest's: these tiny forward passes run faster on one thread


def first_context(pipeline, prompt: str) -> Context:
    """The context generate() fills the first blank from, built by generation's own code (not the probes')."""
    plan = pipeline.request(prompt).plans[0]
    mask = pipeline.tokenizer.mask_ids[plan.mask_name]
    return Context(plan.tokens + (pipeline.tokenizer.sop_id,), None if plan.uses_gmask else plan.tokens.index(mask))


def model_probs(pipeline, context: Context, causal: bool = False) -> torch.Tensor:
    """The plain model's next-token distribution (n, tokens) on prefill_inputs' ids, positions and GLM mask."""
    ids, positions, allowed, _ = prefill_inputs([context], "cpu")
    if causal:
        allowed = torch.ones_like(allowed).tril()
    with torch.no_grad():
        logits = pipeline.model(ids, positions, allowed)[0, :, :pipeline.tokenizer.num_tokens]
    return logits.float().softmax(dim=-1)


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


def hooks_of(model) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


# ----- the logit lens -----------------------------------------------------------------------------

@pytest.mark.parametrize("prompt", [MASKED, FEW_SHOT])
def test_lens_at_the_last_layer_is_the_models_next_token_distribution(pipeline, prompt):
    context = first_context(pipeline, prompt)
    expected = model_probs(pipeline, context)  # (n, tokens)
    target = int(expected[-1].argsort()[-3])  # the third likeliest next token after sop
    lens = pipeline.logit_lens(prompt, top_k=20, target=target)
    last = pipeline.model.config.num_layers - 1
    assert lens.ids == list(context.tokens) and lens.layers == tuple(range(last + 1))
    top = lens.top[lens.top["layer"] == last].sort_values(["position", "rank"])
    got = torch.tensor(top["prob"].to_numpy()).view(len(context.tokens), 20)
    values, ids = expected.double().topk(20, dim=-1)
    assert (got - values).abs().max().item() <= 1e-5
    assert torch.equal(torch.tensor(top["token_id"].to_numpy()).view_as(ids), ids)
    assert list(top["input_token"][top["rank"] == 1]) == [pipeline.tokenizer.token_text(i) for i in context.tokens]
    standing = lens.target[lens.target["layer"] == last].sort_values("position")
    assert (torch.tensor(standing["prob"].to_numpy()) - expected[:, target].double()).abs().max().item() <= 1e-5
    beaten = (expected > expected[:, target:target + 1]).sum(dim=-1) + 1
    assert standing["rank"].tolist() == beaten.tolist() and standing["rank"].iloc[-1] == 3
    # generate()'s own log probability of its first token agrees with the lens at sop.
    first = pipeline.generate(prompt, max_new_tokens=1, logprobs=True).blanks[0].logprobs[0]
    at_sop = top[(top["position"] == len(context.tokens) - 1) & (top["rank"] == 1)]
    assert int(at_sop["token_id"].iloc[0]) == first.token
    assert abs(float(at_sop["prob"].iloc[0]) - torch.tensor(first.logprob).exp().item()) <= 1e-5


def test_lens_along_a_generation_gives_what_generate_chose(pipeline):
    result = pipeline.generate(MASKED, max_new_tokens=5, logprobs=True)
    blank = result.blanks[0]
    lens = pipeline.logit_lens(MASKED, max_new_tokens=5, top_k=1, layers=-1)
    sop = lens.sop_index
    assert lens.generated == blank.tokens
    best = lens.top.set_index("position")
    for j, record in enumerate(blank.logprobs):  # the prediction at sop + j is generated token j
        assert best.loc[sop + j, "token_id"] == record.token
        assert abs(best.loc[sop + j, "prob"] - torch.tensor(record.logprob).exp().item()) <= 1e-5
    trace = pipeline.trace(MASKED, max_new_tokens=5, sites="residual", layers=0)
    mask_position = first_context(pipeline, MASKED).pinned_position
    assert trace.position_ids[sop:] == [mask_position] * (len(blank.tokens) + 1)  # pinned from sop on
    assert trace.table()["part"].tolist() == ["context"] * sop + ["sop"] + ["generated"] * len(blank.tokens)


def test_probes_use_glms_mask_and_positions_not_a_causal_mask(pipeline):
    context = first_context(pipeline, MASKED)
    n = len(context.tokens)
    trace = pipeline.trace(MASKED, sites="attention_probs")
    assert torch.equal(trace.allowed, prefill_inputs([context], "cpu")[2][0, 0])
    assert trace.position_ids == prefill_inputs([context], "cpu")[1][0].tolist()
    probs = trace["attention_probs"]  # (layers, heads, n, n)
    assert torch.all(probs[:, :, ~trace.allowed] == 0)
    assert torch.allclose(probs.sum(dim=-1), torch.ones(()), atol=1e-5)
    # Context tokens see the context after them (a causal mask would make this exactly zero): every context
    # token but the last puts weight on later ones, in some head.
    later_context = torch.ones(n, n, dtype=torch.bool).triu(1)
    later_context[:, n - 1:] = False
    later_weight = (probs * later_context).sum(dim=-1)[:, :, :n - 2]  # (layers, heads, context rows)
    assert later_weight.mean().item() > 0.1 and later_weight.amax(dim=(0, 1)).min().item() > 0.1
    # The lens follows the model under GLM's mask, and a causal mask would give something else.
    lens = pipeline.logit_lens(MASKED, layers=-1, top_k=1)
    glm_probs, causal_probs = model_probs(pipeline, context), model_probs(pipeline, context, causal=True)
    got = torch.tensor(lens.top.sort_values("position")["prob"].to_numpy())
    assert (got - glm_probs.max(dim=-1).values.double()).abs().max().item() <= 1e-5
    assert (got - causal_probs.max(dim=-1).values.double()).abs().max().item() > 1e-2


# ----- traces -------------------------------------------------------------------------------------

def test_traced_sites_are_the_values_the_model_computed(pipeline):
    """Each block's output rebuilt from the traced attention probabilities, branch outputs and residual stream
    with the model's own modules: the trace holds what the forward pass used."""
    trace = pipeline.trace(FEW_SHOT, sites=list(SITES))
    layers = pipeline.model.transformer.layers
    config = pipeline.model.config
    with torch.no_grad():
        embeddings = pipeline.model.transformer.word_embeddings(torch.tensor([trace.ids]))[0]
        for i, block in enumerate(layers):
            x = block.input_layernorm(None, trace.get("residual", i - 1) if i else embeddings, block.alpha)
            v = block.attention.query_key_value(x).view(len(trace.ids), config.num_attention_heads, 3, -1)[:, :, 2]
            context = trace.attention(i) @ v.transpose(0, 1)  # (heads, n, hd)
            attention = block.attention.dense(context.transpose(0, 1).reshape(len(trace.ids), -1))
            assert relative_error(trace.get("attention", i), attention) <= 1e-5
            y = block.post_attention_layernorm(x, trace.get("attention", i), block.alpha)
            assert relative_error(trace.get("mlp", i), block.mlp(y)) <= 1e-5
            assert relative_error(trace.get("residual", i), y * block.alpha + trace.get("mlp", i)) <= 1e-5


def test_trace_selects_sites_by_short_or_module_name_layers_and_positions(pipeline):
    full = pipeline.trace(MASKED, sites=list(SITES))
    n = len(full.ids)
    part = pipeline.trace(MASKED, sites=["transformer.layers.3.attention", "transformer.layers.-1", "attention_probs"],
                          layers=[1, -8], positions=[-1, 0, 2, 0])
    assert part.layers == {"residual": (7,), "attention": (3,), "attention_probs": (0, 1)}
    assert part.positions == (0, 2, n - 1)
    rows = list(part.positions)
    assert part["attention"].shape == (1, 3, 192) and part["attention_probs"].shape == (2, 8, 3, n)
    assert relative_error(part.get("residual", -1), full.get("residual", 7)[rows]) <= 1e-6
    assert relative_error(part.get("attention", 3), full.get("attention", 3)[rows]) <= 1e-6
    assert relative_error(part.attention(1), full.attention(1)[:, rows]) <= 1e-6
    with pytest.raises(KeyError, match="layers including 4"):
        part.get("attention", 4)
    norms = part.norms()
    assert set(norms["site"]) == {"residual", "attention"} and len(norms) == 6
    assert norms["input_token"].tolist()[:3] == [full.tokens[p] for p in rows]


def test_a_trace_too_large_to_ship_says_how_to_narrow_it(pipeline, forward_calls):
    with pytest.raises(ValueError, match=r"more than max_bytes=0\.1 MiB: narrow it with layers=, positions= or "
                                         r"fewer sites, or raise max_bytes") as refused:
        pipeline.trace(FEW_SHOT, sites=["residual", "attention_probs"], max_bytes=100_000)
    assert "attention_probs:" in str(refused.value) and "residual:" in str(refused.value)
    with pytest.raises(ValueError, match="max_bytes"):
        pipeline.logit_lens(FEW_SHOT, top_k=1000, max_bytes=2**20)
    assert not forward_calls
    narrowed = pipeline.trace(FEW_SHOT, sites=["residual", "attention_probs"], layers=[0], positions=[-1],
                              max_bytes=100_000)
    assert 0 < narrowed.nbytes <= 100_000


# ----- patching -----------------------------------------------------------------------------------

def test_patching_a_run_with_its_own_activations_changes_nothing(pipeline):
    target = pipeline.tokenizer.encode("value")[-1]
    for batch_size in (None, 7):  # one batch, and several padded ones
        sweep = pipeline.patch(SHORT, SHORT, target, sites=list(PATCHABLE), batch_size=batch_size)
        n, layers = len(first_context(pipeline, SHORT).tokens), pipeline.model.config.num_layers
        assert len(sweep) == len(PATCHABLE) * layers * n
        assert list(sweep.columns) == ["site", "layer", "position", "input_token", "logprob_change", "clean_logprob",
                                       "corrupted_logprob", "patched_logprob"]
        assert (sweep["logprob_change"] == 0).all()
        assert (sweep["patched_logprob"] - sweep["clean_logprob"]).abs().max() <= 1e-6  # the clean run: 1 row


def test_patching_moves_the_corrupted_prediction_towards_the_clean_one(pipeline):
    clean, corrupted = FEW_SHOT, FEW_SHOT.replace("house", "mouse")
    target = int(model_probs(pipeline, first_context(pipeline, clean))[-1].argmax())
    sweep = pipeline.patch(clean, corrupted, target, sites=["residual", "mlp"], layers=[0, 4, 7],
                           positions=range(-6, 0))
    clean_lp = sweep["clean_logprob"].iloc[0]
    corrupted_lp = sweep["corrupted_logprob"].iloc[0]
    assert abs(clean_lp - model_probs(pipeline, first_context(pipeline, clean))[-1, target].log().item()) <= 1e-5
    corrupted_probs = model_probs(pipeline, first_context(pipeline, corrupted))
    assert abs(corrupted_lp - corrupted_probs[-1, target].log().item()) <= 1e-5
    assert clean_lp - corrupted_lp > 0.1  # the corruption matters
    by_point = sweep.set_index(["site", "layer", "position"])
    n = len(first_context(pipeline, clean).tokens)
    # The residual stream after the last block at the predicting position is all the head sees.
    assert abs(by_point.loc[("residual", 7, n - 1), "patched_logprob"] - clean_lp) <= 1e-5
    assert sweep["input_token"].tolist()[:6] == [pipeline.tokenizer.token_text(i)
                                               for i in first_context(pipeline, clean).tokens[-6:]]
    assert (sweep["logprob_change"] - (sweep["patched_logprob"] - corrupted_lp)).abs().max() <= 1e-12
    # Batched runs are independent rows: one patch per batch gives the same numbers.
    one_by_one = pipeline.patch(clean, corrupted, target, sites=["residual", "mlp"], layers=[0, 4, 7],
                                positions=range(-6, 0), batch_size=1)
    assert (one_by_one["patched_logprob"] - sweep["patched_logprob"]).abs().max() <= 1e-5


# ----- bad requests, hooks --------------------------------------------------------------------------

BAD_CALLS = [
    ("trace", (FEW_SHOT,), dict(sites="resid"), "unknown site 'resid'"),
    ("trace", (FEW_SHOT,), dict(sites="transformer.layers.8.mlp"), r"sites \('transformer.layers.8.mlp'\): 8 is out"),
    ("trace", (FEW_SHOT,), dict(layers=8), "layers: 8 is out of range: the model has 8 layers"),
    ("trace", (FEW_SHOT,), dict(layers=[0, 1.5]), "layers takes an integer"),
    ("trace", (FEW_SHOT,), dict(positions=25), "positions: 25 is out of range: the prompt is 25 tokens"),
    ("trace", (FEW_SHOT,), dict(positions=30, max_new_tokens=2), "positions: 30 .* 27 with the 2 generated"),
    ("trace", (FEW_SHOT,), dict(max_new_tokens=-1), "max_new_tokens must be in"),
    ("trace", (["a", "b"],), {}, "prompt must be a string"),
    ("logit_lens", (FEW_SHOT,), dict(top_k=0), "top_k must be in"),
    ("logit_lens", (FEW_SHOT,), dict(target="house boat"), "target 'house boat' is"),
    ("logit_lens", (FEW_SHOT,), dict(target=10**6), "target id 1000000 is outside the vocabulary"),
    ("patch", (FEW_SHOT, FEW_SHOT + " x", 5), {}, r"clean is 25, corrupted 2[6-9]"),
    ("patch", (FEW_SHOT, FEW_SHOT, 5), dict(sites="attention_probs"), "sites this call takes are residual"),
    ("patch", (FEW_SHOT, FEW_SHOT, 5), dict(target_position=25), "target_position: 25 is out of range"),
    ("patch", (FEW_SHOT, FEW_SHOT, 5), dict(batch_size=0), "batch_size must be >= 1"),
    ("patch", (FEW_SHOT, 3, 5), {}, "corrupted must be a string"),
]


@pytest.mark.parametrize("method,args,kwargs,message", BAD_CALLS)
def test_bad_requests_fail_before_any_compute_naming_what_to_change(pipeline, forward_calls, method, args, kwargs,
                                                                     message):
    assert len(first_context(pipeline, FEW_SHOT).tokens) == 25  # the lengths the messages name
    with pytest.raises((ValueError, TypeError), match=message):
        getattr(pipeline, method)(*args, **kwargs)
    assert not forward_calls


def test_no_hook_outlives_a_probe_and_generation_is_unchanged(pipeline):
    before = pipeline.generate(MASKED, max_new_tokens=8).text
    hooks = hooks_of(pipeline.model)
    pipeline.trace(MASKED, sites=list(SITES), max_new_tokens=2)
    pipeline.logit_lens(MASKED, target=5)
    pipeline.patch(SHORT, SHORT, 5, layers=0, positions=0)
    from glmkit.inspect.capture import Probe

    probe = Probe(pipeline.model)  # a patch whose value does not fit fails inside the forward pass
    probe.patch("mlp", 2, torch.tensor([0]), torch.tensor([0]), torch.zeros(1, 7))
    with pytest.raises(RuntimeError):
        probe.run(prefill_inputs([first_context(pipeline, SHORT)], "cpu")[:3], stop_after=3)
    assert hooks_of(pipeline.model) == hooks
    assert pipeline.generate(MASKED, max_new_tokens=8).text == before


# ----- the 2-engine tensor-parallel cluster -----------------------------------------------------------

@pytest.fixture(scope="module")
def cluster():
    from glmkit.serve.cluster import GLMCluster

    with GLMCluster(config="glm-tiny", n=2) as running:
        yield running


def test_cluster_trace_equals_one_process_with_heads_in_order(cluster, pipeline):
    for kwargs in (dict(sites=list(SITES)), dict(sites=["attention_probs", "residual"], layers=[0, 7],
                                                  max_new_tokens=4, positions=[0, -1, -2])):
        remote, local = cluster.trace(MASKED, **kwargs), pipeline.trace(MASKED, **kwargs)
        assert remote.ids == local.ids and remote.positions == local.positions and remote.layers == local.layers
        assert torch.equal(remote.allowed, local.allowed) and remote.tokens == local.tokens
        for site, values in local.values.items():
            assert remote[site].shape == values.shape
            assert relative_error(remote[site], values) <= 1e-5, site
        assert remote.collective_bytes > 0 == local.collective_bytes  # the heads came from both ranks


def test_cluster_lens_equals_the_models_distribution_exchanging_no_vocabulary(cluster, pipeline):
    context = first_context(pipeline, FEW_SHOT)
    expected = model_probs(pipeline, context)
    target = int(expected[-1].argsort()[-2])
    remote = cluster.logit_lens(FEW_SHOT, top_k=10, target=target)
    local = pipeline.logit_lens(FEW_SHOT, top_k=10, target=target)
    assert (remote.top["token_id"] == local.top["token_id"]).all()
    assert (remote.top["prob"] - local.top["prob"]).abs().max() <= 1e-5
    assert (remote.target["rank"] == local.target["rank"]).all()
    last = remote.top[(remote.top["layer"] == 7)].sort_values(["position", "rank"])
    values = expected.double().topk(10, dim=-1).values
    assert (torch.tensor(last["prob"].to_numpy()).view_as(values) - values).abs().max().item() <= 1e-5
    # What the ranks exchanged for 8 layers x 25 positions is less than one layer's logits of one rank's slice.
    vocab_slice_bytes = 4 * len(context.tokens) * cluster.config.model.vocab_size // 2
    assert 0 < remote.collective_bytes < vocab_slice_bytes
    assert len(pickle.dumps(remote)) < 2 * len(pickle.dumps(local))


def test_cluster_patching_equals_one_process_and_self_patching_is_exact(cluster, pipeline):
    clean, corrupted = FEW_SHOT, FEW_SHOT.replace("house", "mouse")
    target = int(model_probs(pipeline, first_context(pipeline, clean))[-1].argmax())
    kwargs = dict(sites=list(PATCHABLE), layers=[0, 7], positions=[-1, -2, 5])
    remote = cluster.patch(clean, corrupted, target, **kwargs)
    local = pipeline.patch(clean, corrupted, target, **kwargs)
    labels = ["site", "layer", "position", "input_token"]
    assert remote[labels].equals(local[labels])
    # Two ranks sum each row-parallel matmul in halves, so fp32 rounds in another order: against the same model in
    # fp64 the one-process run is 4.8e-6 off and the cluster 9.5e-6 (logprobs near -7.4, 0.5e-6 an ulp), and the
    # gap between them follows the CPU's vector width (9.5e-6 on an AMD EPYC, 1.24e-5 on CI's machine).
    assert (remote["patched_logprob"] - local["patched_logprob"]).abs().max() <= 5e-5
    assert (remote["patched_logprob"] - remote["corrupted_logprob"]).abs().max() > 0.1  # patches took effect
    assert (cluster.patch(clean, clean, target, **kwargs)["logprob_change"] == 0).all()


def test_cluster_refuses_bad_probes_in_the_notebook_and_stays_usable(cluster):
    with pytest.raises(ValueError, match="layers: 9 is out of range"):
        cluster.trace(MASKED, layers=9)
    with pytest.raises(ValueError, match="clean and corrupted must be the same number of tokens"):
        cluster.patch(MASKED, MASKED + " extra", 5)
    assert cluster.generate(MASKED, max_new_tokens=3).blanks


def _lens_rank(rank: int, port: int, out_dir: str) -> None:
    """One of 2 gloo ranks: the lens on random models of two vocabulary sizes, and rank 0 also at TP 1."""
    import json
    from types import SimpleNamespace

    from glmkit.config import GLMConfig
    from glmkit.generate.request import Channel
    from glmkit.generate.tokens import Generator
    from glmkit.inspect import LensRequest
    from glmkit.lab.random_model import build_random_model
    from glmkit.parallel.comm import init_process_groups
    from glmkit.tokenizer import DEMO_TOKENIZER_DIR, GLMTokenizer

    torch.set_num_threads(1)
    groups = init_process_groups(rank, 2, torch.device("cpu"), "127.0.0.1", port)
    tokenizer = GLMTokenizer.load(DEMO_TOKENIZER_DIR)
    records = {}
    try:
        for vocab in (22400, 4 * 22400):
            config = GLMConfig(num_layers=2, hidden_size=64, num_attention_heads=4, inner_hidden_size=128,
                               vocab_size=vocab, max_sequence_length=64)
            request = LensRequest.build(tokenizer, config, "x = [MASK] + y", top_k=5, target=20004)
            model = build_random_model(config, torch.float32, "cpu", rank=rank, world_size=2, group=groups.data, seed=3)
            # What an engine's ShardWorker offers a request: its place in the group, tokenizer and generator.
            shard = SimpleNamespace(rank=rank, world_size=2, group=groups.data, tokenizer=tokenizer,
                                    generator=Generator(model, use_graphs=False))
            lens = request.run(shard, Channel())
            if rank == 0:
                whole = SimpleNamespace(rank=0, world_size=1, group=None, tokenizer=tokenizer, generator=Generator(
                    build_random_model(config, torch.float32, "cpu", seed=3), use_graphs=False))
                single = request.run(whole, Channel())
                records[vocab] = {"exchanged": lens.collective_bytes, "shipped": len(pickle.dumps(lens)),
                                  "same_tokens": bool((lens.top["token_id"] == single.top["token_id"]).all()),
                                  "same_ranks": bool((lens.target["rank"] == single.target["rank"]).all()),
                                  "prob_error": float((lens.top["prob"] - single.top["prob"]).abs().max())}
    finally:
        groups.close()
    if rank == 0:
        Path(out_dir, "lens.json").write_text(json.dumps(records))


def test_what_tensor_parallel_ranks_exchange_and_ship_does_not_grow_with_the_vocabulary(tmp_path):
    """Two gloo ranks on random weights (the same model at every TP size): a vocabulary 4x as large exchanges the
    same bytes and ships a result of about the same size, and the 2-rank lens equals the 1-rank one."""
    import json

    import torch.multiprocessing as mp

    from glmkit.parallel.comm import free_port

    mp.spawn(_lens_rank, args=(free_port(), str(tmp_path)), nprocs=2, join=True)
    small, large = json.loads((tmp_path / "lens.json").read_text()).values()
    assert small["exchanged"] == large["exchanged"] > 0
    assert abs(small["shipped"] - large["shipped"]) < 0.1 * small["shipped"]
    for record in (small, large):
        assert record["same_tokens"] and record["same_ranks"] and record["prob_error"] <= 1e-5
