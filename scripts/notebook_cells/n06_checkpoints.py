"""Cells of notebooks/06-checkpoints.ipynb."""
from __future__ import annotations

from .cells import md, code, config, gpu, teardown

CELLS = [
    md("""\
# Checkpoints: inspect and repack shard counts

GLM-130B is released as 8 tensor-parallel SwissArmyTransformer shards (`mp_rank_00_model_states.pt` …
`mp_rank_07_…`), for 8 GPUs. With 4 GPUs you need 4 shards; `glmkit.checkpoint` repacks a checkpoint to any
shard count that divides the heads, the vocabulary and the MLP width, in the official layout, so the original
GLM-130B code can load the result too. The same is on the command line: `glmkit inspect DIR`,
`glmkit repack SRC DST --shards N --config NAME`.

This notebook repacks the demo checkpoint 2 → 1 → 4 shards and checks that the model is unchanged. For
GLM-130B change only the next cell (each copy of the checkpoint is about 260 GB)."""),
    config("""\
CONFIG = "glm-tiny"; REPACK_TO = (1, 4); WORKDIR = None  # None: a temporary folder, deleted at the end
# on a GPU node: CONFIG = "glm-130b"; REPACK_TO = (4,); WORKDIR = "/data/glmkit-repacks"
"""),
    code("""\
import shutil
import tempfile
import time
from pathlib import Path

import pandas as pd
import torch

from glmkit import load_config
from glmkit.checkpoint import (expected_shapes, inspect_checkpoint, load_rank_state_dict, read_shard,
                               repack_checkpoint)
from glmkit.parallel.layout import shard_style

config = load_config(CONFIG)
work = Path(WORKDIR) if WORKDIR else Path(tempfile.mkdtemp(prefix="glmkit-repack-"))
work.mkdir(parents=True, exist_ok=True)
config.model"""),
    md("""\
## What is in a checkpoint folder

`latest` names the iteration folder; it holds one `mp_rank_XX_model_states.pt` per tensor-parallel rank,
each a torch-pickled `{"module": state_dict}`. `inspect_checkpoint` reads no tensors."""),
    code("""\
def describe(folder):
    \"\"\"The shard files of a checkpoint folder, with their sizes.\"\"\"
    info = inspect_checkpoint(folder)
    print(f"{info.dir}: iteration {info.iteration!r}, {info.num_shards} shard(s)")
    return pd.DataFrame({"file": [p.name for p in info.shard_paths],
                         "MB": [round(p.stat().st_size / 2**20, 2) for p in info.shard_paths]})


describe(config.checkpoint)"""),
    md("""\
## How each parameter is split

The parameter names are SAT's. One table in `glmkit.parallel.layout` says how each is split across ranks —
the same table drives loading, repacking and the live tensor-parallel model:

- `vocab` / `column`: split along the output rows (whole attention heads stay together);
- `column_glu`: GeGLU's two halves are split separately, so each rank keeps matching halves;
- `row`: split along the input columns (the layer's output is summed over ranks);
- `replicate`: every rank holds the whole tensor (LayerNorms, biases of row-split layers).

Per-rank shapes for each shard count used here (layer 0 stands for every layer):"""),
    code("""\
shard_counts = sorted({1, inspect_checkpoint(config.checkpoint).num_shards, *REPACK_TO})
shapes = {n: expected_shapes(config.model, n) for n in shard_counts}
names = [name for name in shapes[1] if ".layers." not in name or ".layers.0." in name]
pd.DataFrame({"style": [shard_style(name) for name in names],
              **{f"{n} shard(s)": [shapes[n][name] for name in names] for n in shard_counts}},
             index=names)"""),
    md("""\
The files hold exactly those shapes. Shards are read memory-mapped and only as safe tensors (no arbitrary
unpickling), so looking at shapes costs almost nothing even for GLM-130B:"""),
    code("""\
def file_shapes(folder, names=names):
    \"\"\"Shapes of some parameters in every shard file of a checkpoint (one column per rank).\"\"\"
    info = inspect_checkpoint(folder)
    shards = [read_shard(path) for path in info.shard_paths]
    return pd.DataFrame({f"rank {rank}": [tuple(shard[name].shape) for name in names]
                         for rank, shard in enumerate(shards)}, index=names)


original = inspect_checkpoint(config.checkpoint)
assert all(file_shapes(config.checkpoint)[f"rank {r}"].tolist() == [shapes[original.num_shards][n] for n in names]
           for r in range(original.num_shards))
file_shapes(config.checkpoint)"""),
    md("""\
## Repack

`repack_checkpoint(src, dst, n, config)` writes one target shard at a time, reading only the (memory-mapped)
source shards it overlaps, so peak memory stays near one shard. Each repack below starts from the previous
result: 2 → 1 → 4."""),
    code("""\
folders = [config.checkpoint]
for n in REPACK_TO:
    target = work / f"{n}-shards"
    started = time.perf_counter()
    repack_checkpoint(folders[-1], target, n, config.model)
    print(f"{inspect_checkpoint(folders[-1]).num_shards} -> {n} shard(s) in {time.perf_counter() - started:.2f} s")
    folders.append(target)
describe(folders[-1])"""),
    code("""\
file_shapes(folders[-1])"""),
    md("""\
## Is it the same model?

A rank of a tensor-parallel model can load from a checkpoint of any shard count; glmkit reshards on the fly.
Rank by rank, the 2-way state dicts loaded from the original and from the repacked copy must be identical:"""),
    code("""\
for rank in range(2):
    a = load_rank_state_dict(config.checkpoint, config.model, rank, 2)
    b = load_rank_state_dict(folders[-1], config.model, rank, 2)
    assert a.keys() == b.keys() and all(torch.equal(a[name], b[name]) for name in a)
    print(f"rank {rank} of 2: {len(a)} tensors, identical")
    del a, b"""),
    md("""\
And the logits: the model loaded (in this kernel) from the original and from the last repacked copy gives
bit-for-bit the same next-token logits for a prompt. A model as big as GLM-130B does not fit one process:
the cell after this one checks it on the cluster instead."""),
    code("""\
import glmkit
from glmkit.generate.tokens import Context, prefill_inputs
from glmkit.generate.blanks import plan_prompt


def logits(checkpoint, prompt="def [MASK](self, other):\\n    return self.value + other.value"):
    \"\"\"Next-token logits at the sop that starts the blank, for the model in `checkpoint`.\"\"\"
    glm = glmkit.load(config.replace(checkpoint=checkpoint))
    plan = plan_prompt(glm.tokenizer, prompt, config.model.max_sequence_length)
    context = Context(plan.tokens + (glm.tokenizer.sop_id,), plan.tokens.index(glm.tokenizer.mask_id))
    ids, positions, allowed, _ = prefill_inputs([context], glm.model.transformer.word_embeddings.weight.device)
    with torch.inference_mode():
        return glm.model(ids, positions, allowed)[0, -1].float().cpu()  # (vocab,)


if config.model.num_parameters() < 2e9:
    before, after = logits(config.checkpoint), logits(folders[-1])
    print(f"{len(before)} logits; identical: {torch.equal(before, after)}; "
          f"largest difference {(before - after).abs().max().item():.3g}")
    assert torch.equal(before, after)
else:
    print("too large for one process: see the GPU cell below")"""),
    gpu("""\
# GPU only: the same check on the cluster (each engine loads its shard), for models too big for one GPU
import torch

if torch.cuda.is_available() and config.device.startswith("cuda"):
    from glmkit.serve.cluster import GLMCluster

    prompt = "Tsinghua University is located in [MASK]."
    with GLMCluster(config=config) as cluster:
        before = cluster.generate(prompt, max_new_tokens=8, top_logprobs=5)
        cluster.load(config.replace(checkpoint=folders[-1]))
        after = cluster.generate(prompt, max_new_tokens=8, top_logprobs=5)
    pairs = list(zip(before.blanks[0].logprobs, after.blanks[0].logprobs))
    assert before.text == after.text and all(a.token == b.token for a, b in pairs)
    assert all(abs(x - y) < 1e-3 for a, b in pairs for (_, x), (_, y) in zip(a.top, b.top))
    print(f"same {len(pairs)} tokens and top-5 log probabilities from both checkpoints: {after.text!r}")"""),
    md("""\
## Clean up

The repacked copies were written to a temporary folder (unless you set `WORKDIR`); this removes them."""),
    teardown("""\
if WORKDIR is None:
    shutil.rmtree(work)"""),
]
