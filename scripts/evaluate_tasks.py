"""Evaluate a model (by default the shipped demo model) on tasks and print / save the summaries.

    python scripts/evaluate_tasks.py [--config glm-tiny] [--tasks stdlib-mc stdlib-completion] \
        [--shots 0,1,4] [--seed 0] [--cache artifacts/eval-cache] [--out docs/evaluation/glm-tiny.json]

Runs glmkit.evaluation.evaluate in this process (GLMPipeline); with --cache, finished examples are kept on
disk, so an interrupted run resumes. The JSON holds each task's summary (per group, template and k, with
95 % Wilson intervals), the report over templates, the summary by item source (held-out or training file)
and the command's settings.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from glmkit.evaluation import EvalCache, evaluate, load_task
from glmkit.generate.pipeline import GLMPipeline


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
        print(f"\n{task.name}: {len(result.rows)} rows in {seconds:.0f} s ({result.cached} from the cache)")
        print(overall.summary.to_string(index=False))
        record["tasks"][task.name] = {"kind": task.kind, "examples": len(task.eval_rows), "seconds": round(seconds),
                                      "complete": overall.complete, "summary": overall.summary.to_dict("records"),
                                      "by_source": result.summary.to_dict("records"),
                                      "templates": overall.templates.to_dict("records")}
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(record, indent=1, default=float) + "\n")


if __name__ == "__main__":
    main()
