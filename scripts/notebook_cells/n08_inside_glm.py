"""Cells of notebooks/08-inside-glm.ipynb."""
from __future__ import annotations

from .cells import md, code, config, teardown

CELLS = [
    md("""\
# 08 · Inside GLM: logit lens, attention, activation patching, nnsight

Generation shows what the model says; this notebook looks at how it gets there, on one blank:

- the **logit lens** reads the residual stream after every block through the model's own final LayerNorm and
  output embedding: which token would the model predict if it stopped at layer *i*?
- **attention** shows, per layer and head, which tokens each position reads, under GLM's mask (the context
  sees itself both ways; from `sop` on, each token sees only what comes before it);
- **activation patching** copies one activation of a *clean* run into a *corrupted* one and asks how much of
  the clean answer comes back: where does the model keep what decides it?

glmkit's probes run where the model is: in this kernel for the demo model, or on every engine of the cluster,
where each rank holds a slice of the heads and of the vocabulary and only small tables travel back. Last,
**nnsight** traces the same plain `nn.Module`. On a GPU node, change only the next cell."""),
    config("""\
CONFIG = "glm-tiny"; CLUSTER = False; ENGINES = 2
# on a GPU node: CONFIG = "glm-130b"; CLUSTER = True; ENGINES = None (one engine per GPU)"""),
    code("""\
import pandas as pd
import torch

import glmkit
from glmkit.widgets import AttentionView, LogitLensGrid, PatchingHeatmap

if CLUSTER:
    from glmkit.serve.cluster import GLMCluster

    glm = GLMCluster(config=CONFIG, n=ENGINES)
    glm.start()
    glm.load(glm.config)
else:
    glm = glmkit.load(CONFIG)
tokenizer = glm.tokenizer"""),
    md("""\
## The blank

The demo model learnt Python's standard library, and names a method from its body:"""),
    code("""\
PROMPT = "def [MASK](self, other):\\n    return self.value + other.value"
result = glm.generate(PROMPT, max_new_tokens=8)
fill = result.blanks[0]
print("fill:", repr(fill.text))
print("tokens:", [tokenizer.token_text(t) for t in fill.tokens])"""),
    md("""\
## The logit lens

`logit_lens` runs the prompt (and, with `max_new_tokens`, the model's own greedy continuation, so the
generated positions are there too) and applies the final LayerNorm and the output head after every block. In
the grid, each column is a position — the prediction there is for the *next* token — and each row a layer, the
top row being the model's output. Hover a cell for the top tokens and their probabilities; with a `target`,
switch to its probability or rank."""),
    code("""\
texts = [tokenizer.token_text(t) for t in fill.tokens]
watch = len(texts) - 1  # the fill's last token: 'value' on the demo model
lens = glm.logit_lens(PROMPT, max_new_tokens=len(fill.tokens), top_k=5, target=fill.tokens[watch])
lens_grid = LogitLensGrid(lens)
lens_grid"""),
    md("""\
**In which layer does each token of the fill become the top prediction?** The position that predicts the
fill's token *k* is `sop` + *k*; `first_layer` finds the lowest layer from which that token stays on top all
the way up to the output. The target column follows the fill's last token, `value` (its rank at the
position that predicts it, layer by layer; switch the grid to *target rank* to see it everywhere). On the
demo model the fill reaches the top only in the upper layers (5 to 7 of 0–7), while its rank climbs through
the lower ones: a small model decides late. In the lowest layers the lens mostly shows each position's *own*
token: the output embedding is the input embedding (tied), and little has been added to it yet."""),
    code("""\
rows = []
for step, token in enumerate(fill.tokens):
    position = lens.sop_index + step
    rows.append({"position": position, "input": repr(lens.tokens[position]),
                 "predicts": repr(tokenizer.token_text(token)),
                 "first layer": lens_grid.first_layer(position, token_id=token),
                 "top a layer below": repr(lens_grid.cell(lens.layers[-2], position)["token"])})
print(pd.DataFrame(rows).to_string(index=False))
at = lens.sop_index + watch  # the position that predicts it
ranks = lens.target[lens.target["position"] == at]
print(f"rank of {texts[watch]!r} by layer:", dict(zip(ranks["layer"], ranks["rank"])))"""),
    md("""\
## Attention

`trace` reads sites inside the model along the same sequence; `attention_probs` are the probabilities of every
head. Pick a layer and a head (or their mean); masked query–key pairs are grey and hatched, so "may not look"
never reads as "looks away". On the cluster each rank computes its own heads and the trace gathers them in
head order."""),
    code("""\
trace = glm.trace(PROMPT, sites="attention_probs", max_new_tokens=len(fill.tokens))
attention_view = AttentionView.from_trace(trace)
attention_view"""),
    md("""\
## Activation patching

A clean prompt the model answers, and a corrupted one of the same token length that it answers differently.
Each (site, layer, position) of the clean run is copied, one at a time, into the corrupted run, and the change
in log p(the clean answer's first token) at `sop` is recorded: the residual stream after each block, and the
attention and MLP branch outputs. Red cells are where the clean activation brings the answer back."""),
    code("""\
CLEAN, CORRUPTED = "English: house\\nGerman:", "English: water\\nGerman:"
for prompt in (CLEAN, CORRUPTED):
    print(repr(prompt), "->", repr(glm.generate(prompt, max_new_tokens=4).text[len(prompt):]))
answer = glm.generate(CLEAN, max_new_tokens=1).blanks[0].tokens[0]  # ' H', the start of ' Haus'
sweep = glm.patch(CLEAN, CORRUPTED, target=answer, sites=["residual", "attention", "mlp"])
patching = PatchingHeatmap(sweep)
patching"""),
    md("""\
Read the residual-stream site first. Which position carries the answer, layer by layer? (On the demo model:
the word's own tokens through the lower layers; then one layer's attention copies it to `sop`, where the
answer is read out — the `attention` site shows which layer does the copying.)"""),
    code("""\
residual = sweep[sweep["site"] == "residual"]
carrier = residual.loc[residual.groupby("layer")["logprob_change"].idxmax()]
print("where the answer lives, layer by layer (residual stream):")
print(carrier[["layer", "position", "input_token", "logprob_change"]].to_string(index=False))
mover = sweep[(sweep["site"] == "attention") & (sweep["position"] == sweep["position"].max())]
print("attention output at sop: the largest change is in layer",
      int(mover.loc[mover["logprob_change"].idxmax(), "layer"]))"""),
    md("""\
## nnsight

glmkit's `GLM` is a plain `nn.Module`, so [nnsight](https://nnsight.net) can trace it: wrap the model, feed it
what glmkit's generation feeds it (ids, GLM's positions, the GLM mask, from `prefill_inputs`), and read or
write any module's output by its name in `glmkit/model.py`. nnsight wraps a model in this process, so on the
cluster this section uses the demo model here (`docs/inside-glm.md` says more). Wrapping instruments the
modules in place, so it wraps a copy."""),
    code("""\
import copy

import nnsight

from glmkit.generate.blanks import plan_prompt
from glmkit.generate.tokens import Context, prefill_inputs

local = glm if not CLUSTER else glmkit.load("glm-tiny")
local_tokenizer = local.tokenizer
model = copy.deepcopy(local.model)
traced = nnsight.NNsight(model)


def inputs(prompt):
    plan = plan_prompt(local_tokenizer, prompt, model.config.max_sequence_length)
    pinned = None if plan.uses_gmask else plan.tokens.index(local_tokenizer.mask_ids[plan.mask_name])
    context = Context(plan.tokens + (local_tokenizer.sop_id,), pinned)
    return prefill_inputs([context], model.transformer.word_embeddings.weight.device)[:3]


clean_inputs = inputs(CLEAN)
with torch.no_grad(), traced.trace(*clean_inputs):
    y, m = traced.transformer.layers[3].output  # the block's pair, standing for y * alpha + m
    residual = (y * model.config.deepnorm_alpha + m).save()
    clean_logits = traced.output.save()

ours = local.trace(CLEAN, sites="residual", layers=[3]).get("residual", 3)
print("nnsight's residual after block 3 equals glmkit's trace:", torch.equal(residual[0], ours))"""),
    md("""\
A patch in nnsight: the corrupted run, with block 3's output at the word's positions taken from the clean
run. glmkit's `patch` found the same kind of effect one position at a time."""),
    code("""\
with torch.no_grad(), traced.trace(*clean_inputs):
    clean_y, clean_m = (t.clone().save() for t in traced.transformer.layers[3].output)  # bind each saved value

corrupted_inputs = inputs(CORRUPTED)
word = (clean_inputs[0][0] != corrupted_inputs[0][0]).nonzero()[:, 0]  # the positions where the prompts differ
with torch.no_grad(), traced.trace(*corrupted_inputs):
    block = traced.transformer.layers[3].output
    block[0][:, word] = clean_y[:, word]
    block[1][:, word] = clean_m[:, word]
    patched_logits = traced.output.save()
with torch.no_grad():
    corrupted_logits = model(*corrupted_inputs)
local_answer = local.generate(CLEAN, max_new_tokens=1).blanks[0].tokens[0]

runs = {"clean": clean_logits, "corrupted": corrupted_logits, "corrupted, block 3 patched": patched_logits}
for name, logits in runs.items():
    logprob = torch.log_softmax(logits[0, -1].float(), -1)[local_answer].item()
    print(f"{name:>28}: log p({local_tokenizer.token_text(local_answer)!r}) = {logprob:.2f}")"""),
    teardown("""\
if CLUSTER:
    glm.close()  # stops the engines; the in-process model goes with the kernel"""),
]
