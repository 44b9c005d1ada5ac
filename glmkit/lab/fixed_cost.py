"""`python -m glmkit.lab.fixed_cost`: what a call costs through GLMCluster beyond its tokens, on CPU engines.

`glmkit bench --engines N` separates per-token and fixed cost from two call lengths on the GPU. This measures
the fixed part directly, where the model costs next to nothing (a 1-layer random GLM, or the demo model with
--demo): the same prepared request run by `GLMPipeline.run` and `GLMCluster.call`, for a 1-token and an N-token
generate and an empty request (the call path alone), medians and minima over many calls (the CPU is shared, so
the minimum is the least disturbed; cluster and pipeline calls take turns, so both see the same load). The
breakdown says where the cluster's time goes: time per call inside named notebook-side methods (nested
calls count in both; a method missing from this version of the code is left out), the run on rank 0 as the
engine timed it, and engine-side costs (the per-token stop check in the TCP store, pickling).
"""
from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import os
import pickle
import statistics
import time
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from ..config import GLMConfig, KitConfig, load_config
from ..generate.pipeline import GLMPipeline
from ..generate.request import Channel
from ..tokenizer import DEMO_TOKENIZER_DIR, GLMTokenizer
from .engine_bench import RandomWeightsRequest
from .random_model import build_random_model

# A GLM of negligible compute whose vocabulary holds the demo tokenizer's ids (and splits over 2 ranks).
TINY = GLMConfig(num_layers=1, hidden_size=64, num_attention_heads=4, inner_hidden_size=128, vocab_size=22400,
                 max_sequence_length=256)
# Notebook-side methods whose time per call is reported ("module:Class.method"), old and new call paths.
PROBES = ["glmkit.serve.cluster:GLMCluster._ensure_alive", "glmkit.serve.cluster:GLMCluster._check_alive",
          "ipyparallel.client.view:View.apply_async", "ipyparallel.client.asyncresult:AsyncResult.wait",
          "ipyparallel.client.asyncresult:AsyncResult.get", "ipyparallel.client.client:Client.purge_local_results",
          "glmkit.serve.channel:ClientChannel.send", "glmkit.serve.channel:ClientChannel.receive"]


@dataclass(frozen=True)
class EmptyRequest:
    """Does nothing on every rank: what remains of its call is the call path itself."""

    reduction: ClassVar[str] = "rank0"
    needs_model: ClassVar[bool] = False

    def run(self, shard, channel) -> None:
        return None


@dataclass(frozen=True)
class TimedRequest:
    """Runs `inner` and returns (its result, the seconds its run took on this rank)."""

    inner: Any
    reduction: ClassVar[str] = "rank0"

    def run(self, shard, channel):
        started = time.perf_counter()
        result = self.inner.run(shard, channel)
        return result, time.perf_counter() - started


@dataclass(frozen=True)
class EngineCostsRequest:
    """Per rank: microseconds of one stop check in the TCP store, and of pickling `inner` and its result."""

    inner: Any
    repeats: int = 200
    reduction: ClassVar[str] = "all"

    def run(self, worker, channel) -> dict:
        def us(fn) -> float:
            started = time.perf_counter()
            for _ in range(self.repeats):
                fn()
            return (time.perf_counter() - started) / self.repeats * 1e6

        result = self.inner.run(worker, Channel())  # nothing streamed
        costs = {"store_check_us": us(lambda: worker.groups.store.check(["glmkit/abort/none"]))}
        for name, value in (("request", self.inner), ("result", result)):
            data = pickle.dumps(value)
            costs[f"{name}_bytes"] = len(data)
            costs[f"{name}_pickle_us"] = us(lambda: pickle.loads(pickle.dumps(value)))
        return costs


@dataclass(frozen=True)
class ThreadsRequest:
    """Set every rank's torch intra-op threads (a shared CPU: threads that wait on each other's cores add noise)."""

    threads: int
    reduction: ClassVar[str] = "all"
    needs_model: ClassVar[bool] = False

    def run(self, worker, channel) -> int:
        torch.set_num_threads(self.threads)
        return torch.get_num_threads()


@contextlib.contextmanager
def probed(targets: list[str]):
    """Patch each existing target method to add its wall seconds and calls to the yielded dict."""
    totals, undo = {}, []
    for target in targets:
        module_name, _, path = target.partition(":")
        cls_name, _, method = path.partition(".")
        try:
            cls = getattr(importlib.import_module(module_name), cls_name)
            original = cls.__dict__[method]
        except (ImportError, AttributeError, KeyError):
            continue
        totals[path] = [0.0, 0]

        def timed(*args, __original=original, __path=path, **kwargs):
            started = time.perf_counter()
            try:
                return __original(*args, **kwargs)
            finally:
                totals[__path][0] += time.perf_counter() - started
                totals[__path][1] += 1

        setattr(cls, method, timed)
        undo.append((cls, method, original))
    try:
        yield totals
    finally:
        for cls, method, original in undo:
            setattr(cls, method, original)


def _wall_ms(fn) -> float:
    started = time.perf_counter()
    fn()
    return (time.perf_counter() - started) * 1e3


def _summary(walls: list[float]) -> dict:
    return {"median_ms": round(statistics.median(walls), 3), "min_ms": round(min(walls), 3)}


def measure(engines: int, *, demo: bool = False, tokens: int = 8, repeats: int = 40, threads: int = 1,
            seed: int = 0) -> dict:
    """Fixed cost of cluster calls against the pipeline, with the cluster's breakdown, at `engines` CPU engines."""
    from ..serve.cluster import GLMCluster

    torch.set_num_threads(threads)
    if demo:
        kit = load_config("glm-tiny")
        pipeline = GLMPipeline.from_config(kit)
    else:
        kit = KitConfig(name="tiny-random", model=TINY, tokenizer=DEMO_TOKENIZER_DIR, dtype="fp32", device="cpu")
        pipeline = GLMPipeline(build_random_model(TINY, torch.float32, "cpu", seed=seed),
                               GLMTokenizer.load(DEMO_TOKENIZER_DIR))
    requests = {f"generate_{n}": pipeline.request("Hello world", max_new_tokens=n, min_new_tokens=n)
                for n in (1, tokens)}
    requests["empty"] = EmptyRequest()
    out: dict = {"engines": engines, "model": kit.name, "repeats": repeats, "threads": threads, "pipeline": {},
                 "cluster": {}}
    cluster = GLMCluster(config=kit, n=engines)
    try:
        cluster.load(kit, weights=None if demo else RandomWeightsRequest(TINY, "fp32", DEMO_TOKENIZER_DIR, seed=seed,
                                                                         copy_bytes=2**20))
        if cluster.call(ThreadsRequest(threads)) != [threads] * engines:
            raise RuntimeError(f"the engines did not take {threads} threads")
        for name, request in requests.items():
            backends = {"pipeline": lambda: pipeline.run(request), "cluster": lambda: cluster.call(request)}
            walls = {backend: [] for backend in backends}
            for fn in backends.values():
                fn()  # warm-up
            for _ in range(repeats):  # interleaved, so that both see the same load on a shared CPU
                for backend, fn in backends.items():
                    walls[backend].append(_wall_ms(fn))
            for backend in backends:
                out[backend][name] = _summary(walls[backend])
            out["cluster"][name]["over_pipeline_median_ms"] = round(
                statistics.median(c - p for c, p in zip(walls["cluster"], walls["pipeline"])), 3)
        timed = TimedRequest(requests["generate_1"])
        cluster.call(timed)
        engine_ms = []
        with probed(PROBES) as totals:
            for _ in range(repeats):
                engine_ms.append(cluster.call(timed)[1] * 1e3)
        out["breakdown_generate_1"] = {
            "rank0_run_ms": _summary(engine_ms),
            "ms_per_call_in": {path: round(s / repeats * 1e3, 3) for path, (s, _) in totals.items()},
            "calls_per_call": {path: count / repeats for path, (_, count) in totals.items()},
            "engine": cluster.call(EngineCostsRequest(requests["generate_1"]))}
        ids = [r["engine"] for r in cluster._ranks]
        out["ipyparallel_apply_sync_noop"] = _summary([_wall_ms(lambda: cluster._client[ids].apply_sync(int))
                                                       for _ in range(repeats)])
    finally:
        cluster.close()
    return out


def main(argv: list[str] | None = None) -> None:
    """Print one JSON object per engine count."""
    parser = argparse.ArgumentParser(prog="python -m glmkit.lab.fixed_cost", description=__doc__.splitlines()[0])
    parser.add_argument("--engines", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--demo", action="store_true", help="the shipped demo model instead of a 1-layer random GLM")
    parser.add_argument("--tokens", type=int, default=8, help="new tokens of the longer generate")
    parser.add_argument("--repeats", type=int, default=40)
    parser.add_argument("--threads", type=int, default=1, help="torch threads here and on each engine")
    args = parser.parse_args(argv)
    for engines in args.engines:
        with open(os.devnull, "w") as quiet, contextlib.redirect_stderr(quiet):  # progress bars
            result = measure(engines, demo=args.demo, tokens=args.tokens, repeats=args.repeats,
                             threads=args.threads)
        print(json.dumps(result, indent=1), flush=True)


if __name__ == "__main__":
    # Run from the package, so the request kinds pickle as glmkit.lab.fixed_cost's, which engines can import.
    from glmkit.lab.fixed_cost import main as package_main

    package_main()
