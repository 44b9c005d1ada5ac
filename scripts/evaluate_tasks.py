"""Evaluate a model (by default the shipped demo model) on tasks and print / save the summaries.

    python scripts/evaluate_tasks.py [--config glm-tiny] [--tasks stdlib-mc stdlib-completion] \
        [--shots 0,1,4] [--seed 0] [--cache artifacts/eval-cache] [--out docs/evaluation/glm-tiny.json]

Runs glmkit.evaluation.evaluate in this process (GLMPipeline); with --cache, finished examples are kept on
disk, so an interrupted run resumes. The JSON holds each task's summary (per group, template and k, with
95 % Wilson intervals), the pooled accuracy over its groups, baselines that need no model, the report over
templates, the summary by item source (held-out or training file) and the command's settings.
"""
from __future__ import annotations

import argparse
import json
import re
import sys
import time
from collections import Counter
from pathlib import Path

import torch

from glmkit.evaluation import EvalCache, evaluate, load_task, wilson_interval
from glmkit.generate.pipeline import GLMPipeline


def baselines(task) -> dict:
    """Accuracies that need no model, per group: multiple choice: chance (1 / choices) and always the choice
    that is most often right in the group; generation: the group's most common answer, and a name drawn
    uniformly from the context's distinct words (the blank's answer is often one of them)."""
    out = {}
    for group, rows in task.eval_rows.groupby("group"):
        if task.kind == "mul":
            gold = Counter(c[i] for c, i in zip(rows["choices"], rows["label"]))
            picks = [max(c, key=lambda x: (gold[x], -c.index(x))) for c in rows["choices"]]
            out[group] = {"chance": float((1 / rows["choices"].map(len)).mean()),
                          "most_often_right": sum(p == c[i] for p, c, i in zip(picks, rows["choices"], rows["label"]))
                          / len(rows)}
        else:
            common = Counter(t[0] for t in rows["targets"]).most_common(1)[0][0]
            words = [set(re.findall(r"\w+", x.replace("[MASK]", " "))) for x in rows["inputs"]]
            out[group] = {"most_common_answer": common,
                          "most_common_answer_accuracy": float(rows["targets"].map(lambda t: common in t).mean()),
                          "word_from_context": sum(1 / len(w) for w, t in zip(words, rows["targets"]) if t[0] in w)
                          / len(rows)}
    return out


def pooled(rows, metric: str) -> list[dict]:
    """The metric over every group together, per template and k, with its 95 % Wilson interval."""
    out = []
    for (template, k), part in rows.groupby(["template", "k"], sort=False):
        hits, n = int(part[metric].sum()), len(part)
        low, high = wilson_interval(hits, n)
        out.append({"template": template, "k": int(k), "n": n, metric: hits / n, f"{metric}_low": low,
                    f"{metric}_high": high})
    return out


def main(argv: list[str] | None = None) -> None:
    """Evaluate, print each task's summary, and write the JSON record with --out."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default="glm-tiny")
    p.add_argument("--dtype", choices=["fp32", "fp16", "bf16"])
    p.add_argument("--device")
    p.add_argument("--tasks", nargs="+", default=["stdlib-mc", "stdlib-completion"])
    p.add_argument("--shots", default="0,1,4", help="comma-separated k values")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--limit", type=int, help="examples per group (default: all)")
    p.add_argument("--cache", type=Path, help="folder of the on-disk cache (resumes an interrupted run)")
    p.add_argument("--out", type=Path, help="write the summaries as JSON here")
    args = p.parse_args(argv)
    overrides = {k: v for k, v in (("dtype", args.dtype), ("device", args.device)) if v}
    pipeline = GLMPipeline.from_config(args.config, **overrides)
    shots = [int(k) for k in args.shots.split(",")]
    cache = EvalCache(args.cache) if args.cache else EvalCache()
    record = {"command": " ".join(["python", "scripts/evaluate_tasks.py", *(argv or sys.argv[1:])]),
              "config": args.config, "dtype": pipeline.config.dtype, "device": pipeline.config.device,
              "torch": torch.__version__, "shots": shots, "seed": args.seed, "tasks": {}}
    for name in args.tasks:
        task = load_task(name)
        started = time.perf_counter()
        result = evaluate(pipeline, task, shots=shots, seed=args.seed, batch_size=args.batch_size, cache=cache,
                          by=["source"] if "source" in task.rows.columns else (), limit=args.limit)
        overall = evaluate(pipeline, task, shots=shots, seed=args.seed, batch_size=args.batch_size, cache=cache,
                           limit=args.limit, progress=False)  # from the cache: the summary without the split
        seconds = time.perf_counter() - started
        metric = "correct" if task.kind == "mul" else "exact"
        print(f"\n{task.name}: {len(result.rows)} rows in {seconds:.0f} s ({result.cached} from the cache)")
        print(overall.summary.to_string(index=False))
        print(f"all groups ({metric}):", json.dumps(pooled(overall.rows, metric)))
        print("baselines:", json.dumps(baselines(task)))
        record["tasks"][task.name] = {"kind": task.kind, "examples": len(task.eval_rows), "seconds": round(seconds),
                                      "complete": overall.complete, "summary": overall.summary.to_dict("records"),
                                      "all_groups": pooled(overall.rows, metric), "baselines": baselines(task),
                                      "by_source": result.summary.to_dict("records"),
                                      "templates": overall.templates.to_dict("records")}
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(record, indent=1, default=float) + "\n")


if __name__ == "__main__":
    main()
