"""nnsight interop: glmkit's GLM is a plain nn.Module, so `nnsight.NNsight(pipeline.model)` traces it.

The model input comes from glmkit's own `plan_prompt` and `prefill_inputs` (the GLM mask and pinned positions),
what nnsight saves is compared with glmkit's own capture (a plain forward hook, and glmkit's probes: `trace`
and `patch`), and a patch written in nnsight must give exactly the logits of the same patch done with a hook,
and the log probability glmkit's patching sweep reports for it. NNsight instruments every module of the model it
wraps, in place and for good (a `forward` attribute, inert outside a trace), so these tests wrap a copy of the
session's demo model; importing nnsight also adds `.save` to every object in this process, which nothing here
or in glmkit looks for.
"""
from __future__ import annotations

import copy
import importlib.util
import os

import pytest
import torch

from glmkit.generate.blanks import plan_prompt
from glmkit.generate.pipeline import GLMPipeline
from glmkit.generate.tokens import Context, prefill_inputs

CLEAN = "def [MASK](self, other):\n    return self.value + other.value"
CORRUPTED = "def [MASK](self, other):\n    return self.count + other.count"  # same length, other names
LAYER = 3


@pytest.fixture(scope="module")
def nnsight():
    if importlib.util.find_spec("nnsight") is None:
        if os.environ.get("CI"):
            pytest.fail("CI must run the nnsight tests, but nnsight is not installed: pip install -e '.[test]'",
                        pytrace=False)
        pytest.skip("nnsight is not installed: pip install -e '.[test]'")
    import nnsight

    return nnsight


@pytest.fixture(scope="module")
def wrapped(pipeline, nnsight):
    """A copy of the demo model in its own pipeline, and that model wrapped by nnsight."""
    model = copy.deepcopy(pipeline.model)
    return GLMPipeline(model, pipeline.tokenizer), nnsight.NNsight(model)


def model_inputs(pipeline, prompt: str):
    """ids, positions and the (1, 1, s, s) GLM mask of a one-blank prompt, as glmkit's generation builds them."""
    tokenizer = pipeline.tokenizer
    plan = plan_prompt(tokenizer, prompt, pipeline.model.config.max_sequence_length)
    pinned = None if plan.uses_gmask else plan.tokens.index(tokenizer.mask_ids[plan.mask_name])
    ids, positions, allowed, _ = prefill_inputs([Context(plan.tokens + (tokenizer.sop_id,), pinned)], "cpu")
    return ids, positions, allowed


def hooked_forward(model, inputs, layer: int, replace=None):
    """glmkit's own capture: the logits and block `layer`'s output pair (y, m) through a plain forward hook;
    `replace(output) -> output` edits that output on its way to the next block."""
    captured = {}

    def hook(module, args, output):
        captured["block"] = tuple(t.clone() for t in output)
        return replace(output) if replace is not None else None

    handle = model.transformer.layers[layer].register_forward_hook(hook)
    try:
        with torch.no_grad():
            logits = model(*inputs)
    finally:
        handle.remove()
    return logits, captured["block"]


def test_nnsight_saves_the_block_output_that_a_forward_hook_sees(pipeline, wrapped):
    local, traced = wrapped
    inputs = model_inputs(local, CLEAN)
    logits, (y, m) = hooked_forward(local.model, inputs, LAYER)
    with torch.no_grad(), traced.trace(*inputs):
        block = traced.transformer.layers[LAYER].output.save()
        # The next block's first input is this block's pair: y (normalised, scaled by alpha there) and m.
        following = traced.transformer.layers[LAYER + 1].input_layernorm.inputs.save()
        saved_logits = traced.output.save()
    assert isinstance(block, tuple) and len(block) == 2
    assert torch.equal(block[0], y) and torch.equal(block[1], m)
    args, _ = following
    assert torch.equal(args[0], y) and torch.equal(args[1], m)
    assert torch.equal(saved_logits, logits)
    # The residual stream after the block, as the next LayerNorm adds it up: (1, s, hidden).
    residual = block[0] * local.model.config.deepnorm_alpha + block[1]
    assert residual.shape == (1, inputs[0].shape[1], local.model.config.hidden_size)


def test_an_nnsight_patch_gives_the_logits_of_the_same_patch_done_with_a_hook(wrapped):
    local, traced = wrapped
    clean, corrupted = model_inputs(local, CLEAN), model_inputs(local, CORRUPTED)
    assert clean[0].shape == corrupted[0].shape and not torch.equal(clean[0], corrupted[0])
    position = int((clean[0][0] != corrupted[0][0]).nonzero()[0])  # the first 'value', now 'count'
    clean_logits, _ = hooked_forward(local.model, clean, LAYER)
    corrupted_logits, (cy, cm) = hooked_forward(local.model, corrupted, LAYER)

    def patch(output):
        y, m = (t.clone() for t in output)
        y[:, position], m[:, position] = cy[:, position], cm[:, position]
        return y, m

    expected, _ = hooked_forward(local.model, clean, LAYER, replace=patch)
    with torch.no_grad(), traced.trace(*clean):
        block = traced.transformer.layers[LAYER].output
        block[0][:, position] = cy[:, position]  # in place, as nnsight edits a value on its way
        block[1][:, position] = cm[:, position]
        patched = traced.output.save()
    assert torch.equal(patched, expected)
    last = -1  # sop: where the blank's first token is predicted
    assert not torch.allclose(patched[0, last], clean_logits[0, last])  # the patch changed the prediction
    with torch.no_grad(), traced.trace(*clean):  # the whole pair replaced: the corrupted run from here on
        traced.transformer.layers[LAYER].output = (cy, cm)
        replaced = traced.output.save()
    assert torch.equal(replaced, corrupted_logits)


def test_nnsight_reads_attention_probabilities_inside_the_attention_module(wrapped):
    local, traced = wrapped
    inputs = model_inputs(local, CLEAN)
    with torch.no_grad(), traced.trace(*inputs):
        # attention_probabilities is a function the forward calls, reached through nnsight's source view.
        probs = traced.transformer.layers[2].attention.source.attention_probabilities_0.output.save()
    s = inputs[0].shape[1]
    assert probs.shape == (1, local.model.config.num_attention_heads, s, s)
    allowed = inputs[2].expand_as(probs)
    torch.testing.assert_close(probs.sum(-1), torch.ones(probs.shape[:-1]))
    assert probs[~allowed].max() < 1e-30 and probs[allowed].min() > 0  # the GLM mask, as glmkit built it


def test_nnsight_reads_what_glmkits_probes_read(wrapped):
    local, traced = wrapped
    inputs = model_inputs(local, CLEAN)
    with torch.no_grad(), traced.trace(*inputs):
        probs = traced.transformer.layers[2].attention.source.attention_probabilities_0.output.save()
        y, m = traced.transformer.layers[LAYER].output
        residual = (y * local.model.config.deepnorm_alpha + m).save()
    ours = local.trace(CLEAN, sites=["residual", "attention_probs"], layers=[2, LAYER])
    assert ours.ids == inputs[0][0].tolist()  # the probe sees the sequence prefill_inputs builds
    # The same ops on the same weights: bit for bit.
    assert torch.equal(residual[0], ours.get("residual", LAYER))
    assert torch.equal(probs[0], ours.get("attention_probs", 2))


def test_an_nnsight_patch_gives_the_log_probability_glmkits_patching_sweep_reports(wrapped):
    local, traced = wrapped
    tokenizer = local.tokenizer
    clean, corrupted = "English: house\nGerman:", "English: water\nGerman:"
    target = local.generate(clean, max_new_tokens=1).blanks[0].tokens[0]  # the clean answer's first token
    sweep = local.patch(clean, corrupted, target, sites="residual", layers=[1, 6])
    clean_inputs, corrupted_inputs = model_inputs(local, clean), model_inputs(local, corrupted)
    word = int((clean_inputs[0][0] != corrupted_inputs[0][0]).nonzero()[0])  # 'ho' of house, 'wa' of water
    for layer in (1, 6):
        with torch.no_grad(), traced.trace(*clean_inputs):
            clean_y, clean_m = (t.clone().save() for t in traced.transformer.layers[layer].output)
        with torch.no_grad(), traced.trace(*corrupted_inputs):
            block = traced.transformer.layers[layer].output
            block[0][:, word] = clean_y[:, word]
            block[1][:, word] = clean_m[:, word]
            logits = traced.output.save()
        ours = torch.log_softmax(logits[0, -1].float(), dim=-1)[target].item()  # at sop, the first new token
        row = sweep.query("layer == @layer and position == @word").iloc[0]
        assert row["input_token"] == tokenizer.token_text(int(clean_inputs[0][0, word]))
        # The sweep runs its patches as rows of one batch: a batched matmul rounds a little differently.
        assert ours == pytest.approx(row["patched_logprob"], abs=5e-5)
    assert sweep.query("position == @word")["logprob_change"].abs().max() > 0.1  # the word matters


def test_wrapping_changes_no_generation(pipeline, wrapped):
    local, _ = wrapped
    settings = dict(max_new_tokens=6)
    assert local.generate(CLEAN, **settings).text == pipeline.generate(CLEAN, **settings).text


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_nnsight_on_a_gpu_pipeline_with_glmkits_kernels_and_graphs(nnsight):
    """On a GPU the pipeline's model carries glmkit's fused kernels and decodes through CUDA graphs: nnsight
    wraps that model as it is, module outputs still equal glmkit's trace, and generation is unchanged."""
    reference = GLMPipeline.from_config("glm-tiny", device="cuda", dtype="fp16")
    fast = GLMPipeline.from_config("glm-tiny", device="cuda", dtype="fp16")
    traced = nnsight.NNsight(fast.model)  # wrapped before any generation: its graphs are captured wrapped
    assert type(fast.model.transformer.layers[0].attention).__name__ == "FusedDecodeAttention"
    inputs = [t.to("cuda") for t in model_inputs(fast, CLEAN)]
    with torch.no_grad(), traced.trace(*inputs):
        y, m = traced.transformer.layers[LAYER].output
        residual = (y * fast.model.config.deepnorm_alpha + m).save()
    ours = fast.trace(CLEAN, sites="residual", layers=[LAYER]).get("residual", LAYER)
    assert torch.equal(residual[0].float().cpu(), ours)
    for _ in range(2):  # the second round replays the graphs captured through nnsight's controllers
        assert fast.generate(CLEAN, max_new_tokens=12).text == reference.generate(CLEAN, max_new_tokens=12).text
    assert any(step.graph is not None for step in fast.generator.steps.steps.values())
