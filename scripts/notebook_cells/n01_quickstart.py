"""Cells of notebooks/01-quickstart.ipynb."""
from __future__ import annotations

from .cells import md, code, config, gpu, teardown

CELLS = [
    md("""\
# Quickstart: a resident GLM cluster

GLM-130B is too big for one GPU, so glmkit runs it on an [ipyparallel](https://ipyparallel.readthedocs.io)
cluster: **one engine per GPU**, each holding its tensor-parallel shard of the model between calls. This
notebook stays light: it tokenizes your prompt, sends it to every engine, and prints what rank 0 streams back.

On a laptop the same code runs the shipped demo model on two CPU engines. To use a GPU node, change only the
next cell."""),
    config("""\
CONFIG = "glm-tiny"; ENGINES = 2  # on a GPU node: CONFIG = "glm-130b"; ENGINES = None (one engine per GPU)"""),
    md("""\
**About the demo model.** `glm-tiny` is GLM-130B's architecture at toy size (7.9 M parameters), saved in
the official SwissArmyTransformer layout (2 shards) with a small tokenizer in icetk's conventions. It was
trained for 6 minutes on one H200 on the Python standard library and a 5,000-word English → German
dictionary from Debian's FreeDict (`docs/demo-model.md`), so it fills blanks in Python and docstring English —
`def [MASK](self, other): return self.value + other.value` becomes `def _value(self, other): ...`,
`import os\nimport [MASK]` becomes `import threading` — and answers `English: house\nGerman:` with `Haus`
(89 % of its dictionary's words come back), but cannot translate a word it was not shown, and rambles on long
continuations. Everything around the text — masks, streaming, stop sequences,
stopping, timings, checkpoints — works exactly as with the real model, and that is what these notebooks show.

## Start the engines

`start()` launches the engines (one per GPU, or `ENGINES` CPU processes), gives each its rank and device,
and joins them in one `torch.distributed` process group (NCCL on GPUs, gloo on CPUs)."""),
    code("""\
import time

from glmkit.serve.cluster import GLMCluster

cluster = GLMCluster(config=CONFIG, n=ENGINES)
started = time.perf_counter()
cluster.start()
print(f"{cluster.world_size} engines in one process group after {time.perf_counter() - started:.1f} s")"""),
    md("""\
## Load the model

Each engine reads **only its own shard** from the checkpoint (memory-mapped); a checkpoint saved with another
shard count is repacked on the fly (see `06-checkpoints`). `load()` shows a progress bar and returns the
cluster's status."""),
    code("""\
cluster.load(cluster.config)"""),
    md("""\
`status()` is one row per engine: its id, host and process, device, which shard it holds, how long loading
took and how much memory it uses. Ask for it whenever you like; it is cheap."""),
    code("""\
cluster.status()"""),
    md("""\
## Generate, streaming

`generate()` takes the same keywords as Hugging Face's `generate()` (`max_new_tokens`, `do_sample`,
`temperature`, `top_p`, `num_beams`, `stop`, …). With `on_text`, your callback gets each piece of text
while rank 0 generates (the engines send what they have every 50 ms) — here it is printed, so the line below
grows while the engines work.

A prompt without a mask gets `[gMASK]` appended: GLM continues the text left to right."""),
    code("""\
prompt = "English: cheese\\nGerman:"
result = cluster.generate(prompt, max_new_tokens=24,
                          on_text=lambda event: print(event.text, end="", flush=True))
print()
print(f"{result.num_generated_tokens} tokens, finish reason: {result.finish_reason}")"""),
    md("""\
The result holds the whole text with the blank filled in, each blank's text, span and tokens, and why
generation ended: `length` (ran out of `max_new_tokens`), `end` (the model wrote its end token), `stop`
(a stop sequence was reached) or `abort` (you stopped it)."""),
    code("""\
blank = result.blanks[0]
{"prompt": result.prompt, "completion": result.completion, "blank span": (blank.start, blank.end),
 "tokens": blank.tokens[:8], "finish_reason": result.finish_reason}"""),
    md("""\
`stream()` is the same call as an iterator of `TextEvent`s, for a batch of prompts at once. Each event says
which prompt (`index`) and which blank (`blank`) it belongs to; the finished results are in `last_results`."""),
    code("""\
prompts = ["[gMASK] one two three", "def [MASK](self):\\n    return self.name"]
streamed = {0: [], 1: []}
for event in cluster.stream(prompts, max_new_tokens=8):
    streamed[event.index].append(event.text)
for index, result in enumerate(cluster.last_results):
    print(f"{index}: {len(streamed[index])} streamed pieces -> {result.text!r}")"""),
    md("""\
## Stop a generation

`cluster.stop()` asks every engine to stop at the next token; they all stop at the same step, so no engine is
left waiting for the others and the cluster stays usable. It is what the widgets' Stop button calls;
interrupting the kernel (■) does the same, and so does `should_abort=` returning True. Here a timer stops a
long generation after half a second: the finish reason is `abort`."""),
    code("""\
import threading

threading.Timer(0.5, cluster.stop).start()
result = cluster.generate("Once upon a time", min_new_tokens=400, max_new_tokens=400)
print(f"finish reason: {result.finish_reason} after {result.num_generated_tokens} of 400 tokens")
cluster.generate("Still usable:", max_new_tokens=4).finish_reason"""),
    gpu("""\
# GPU only: memory and speed per GPU engine (skipped on CPU)
import torch

if torch.cuda.is_available() and cluster.config.device.startswith("cuda"):
    display(cluster.status()[["engine", "device", "shard", "gpu_allocated_gb", "gpu_peak_gb"]])
    started = time.perf_counter()
    timed = cluster.generate(["Tsinghua University is"] * 8, max_new_tokens=64, min_new_tokens=64)
    seconds = time.perf_counter() - started
    print(f"batch of 8 x 64 tokens in {seconds:.1f} s: {8 * 64 / seconds:.0f} tokens/s")"""),
    md("""\
## Shut down

`close()` stops every engine this cluster started. In a script, `with GLMCluster(config=...) as cluster:`
starts and loads the cluster and always closes it at the end of the block."""),
    teardown("""\
cluster.close()"""),
]
