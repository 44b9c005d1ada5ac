"""Fuzzed probe calls on the demo model (glmkit.inspect's trace, logit_lens and patch): every call returns a result
of the asked-for shape, or raises glmkit's own ValueError/TypeError naming the bad argument before any forward
pass; none hangs (the verdict: tests/fuzzing.py)."""
from __future__ import annotations

import re

import torch

from glmkit.inspect import PATCHABLE, SITES

from fuzzing import FuzzCall, fuzz
from test_inspect import FEW_SHOT, MASKED, SHORT, first_context

FUZZ_SEED = 20261202
FUZZ_CALLS = 150
FUZZ_PROMPTS = [MASKED, FEW_SHOT, SHORT, "", "a [sMASK] b"]
BAD_PROMPTS = [(None, "prompt"), (["x"], "prompt"), ("x [mask] y", "malformed mask")]


def _indices(rng, length, valid: bool, name: str, beyond: int = 0):
    """(value for an index selector over `length` items, the normalised indices it picks); an invalid value lies
    outside `length + beyond` (a generation's tokens may follow the prompt's)."""
    if valid:
        case = rng.random()
        if case < 0.25:
            return None, list(range(length))
        picked = [rng.randrange(-length, length) for _ in range(1 if case < 0.5 else rng.randint(1, 3))]
        value = picked[0] if case < 0.5 else (picked if case < 0.8 else tuple(picked))
        return value, sorted({p % length for p in picked})
    bound = length + beyond
    return rng.choice([bound, -bound - 1, [0, bound], [], 1.5, "0", True, [None]]), name


def random_probe(rng, pipeline):
    """(method, args, kwargs, the names an error may give (empty: a valid call), what a valid call must give)."""
    layers_n = pipeline.model.config.num_layers
    method = rng.choice(["trace", "logit_lens", "patch"])
    wrong, expect = [], {}
    bad = rng.random() < 0.4
    spots = ["prompt", "layers", "positions", "other"]
    spot = rng.choice(spots) if bad else None
    if spot == "prompt":
        prompt, problem = rng.choice(BAD_PROMPTS)
        wrong.append("clean" if method == "patch" and problem == "prompt" else problem)
    else:
        prompt = rng.choice(FUZZ_PROMPTS)
    n = len(first_context(pipeline, prompt).tokens) if isinstance(prompt, str) and spot != "prompt" else 5
    kwargs = {}
    value, expect["layers"] = _indices(rng, layers_n, spot != "layers", "layers")
    if spot == "layers":
        wrong.append("layers")
    if value is not None or spot == "layers":
        kwargs["layers"] = value
    if method != "patch" and rng.random() < 0.3:
        kwargs["max_new_tokens"] = rng.randint(0, 2)
    value, expect["positions"] = _indices(rng, n, spot != "positions", "positions", kwargs.get("max_new_tokens", 0))
    if spot == "positions":
        wrong.append("positions")
    if value is not None or spot == "positions":
        kwargs["positions"] = value
    if method == "patch":
        # Keep sweeps small: at most 2 layers and 3 positions.
        if "layers" not in kwargs or kwargs["layers"] is None:
            kwargs["layers"], expect["layers"] = [0, -1], [0, layers_n - 1]
        if "positions" not in kwargs or kwargs["positions"] is None:
            kwargs["positions"], expect["positions"] = [-1], [n - 1]
        sites = rng.sample(list(PATCHABLE), rng.randint(1, 2))
        args = [prompt, prompt, rng.randrange(pipeline.tokenizer.num_tokens)]
        if spot == "other":
            name, value = rng.choice([("sites", "attention_probs"), ("sites", "resid"), ("target", -1),
                                      ("target", ""), ("target_position", n), ("batch_size", 0),
                                      ("corrupted", prompt + " one more")])
            if name == "corrupted":
                args[1], name = value, "clean and corrupted"
            elif name == "target":
                args[2] = value
            else:
                kwargs[name] = value
            wrong.append(name)
        kwargs.setdefault("sites", sites)
        expect["sites"] = [s for s in PATCHABLE if s in kwargs["sites"]]
        return method, args, kwargs, wrong, expect
    if method == "trace":
        sites = rng.sample(list(SITES), rng.randint(1, 4))
        kwargs["sites"] = sites
        expect["sites"] = sites
        if spot == "other":
            name, value = rng.choice([("sites", "resid"), ("sites", []), ("sites", [3]), ("max_bytes", 16),
                                      ("max_bytes", 0), ("max_new_tokens", -1), ("max_new_tokens", 1.5)])
            kwargs[name] = value
            wrong.append(name)
    else:
        kwargs["top_k"] = rng.choice([1, 3, 20])
        if rng.random() < 0.5:
            token = rng.randrange(pipeline.tokenizer.num_tokens)
            kwargs["target"] = rng.choice([token, pipeline.tokenizer.id_to_piece(token), "<eop>"])
        if spot == "other":
            name, value = rng.choice([("top_k", 0), ("top_k", 10**6), ("top_k", 2.5), ("target", -3),
                                      ("target", "two words"), ("target", 1.5), ("max_bytes", 100)])
            kwargs[name] = value
            wrong.append(name)
    return method, [prompt], kwargs, wrong, expect


def check_probe(method, result, kwargs, expect, pipeline) -> None:
    hidden = pipeline.model.config.hidden_size
    n = len(result.ids) if method != "patch" else None
    positions = expect["positions"]
    if method != "patch" and kwargs.get("max_new_tokens"):  # the sequence may be longer than the prompt
        value = kwargs.get("positions")
        picked = [value] if isinstance(value, int) else value
        positions = list(range(n)) if value is None else sorted({p % n for p in picked if -n <= p < n})
    if method == "trace":
        assert sorted(result.values) == sorted(set(expect["sites"]))
        for site, values in result.values.items():
            assert list(result.layers[site]) == expect["layers"]
            shape = (len(expect["layers"]), len(positions), hidden) if site != "attention_probs" else \
                (len(expect["layers"]), pipeline.model.config.num_attention_heads, len(positions), n)
            assert tuple(values.shape) == shape and torch.isfinite(values).all()
    elif method == "logit_lens":
        k = kwargs["top_k"]
        assert len(result.top) == len(expect["layers"]) * len(positions) * k
        assert result.top["prob"].between(0, 1).all() and set(result.top["rank"]) == set(range(1, k + 1))
        assert (result.target is None) == ("target" not in kwargs)
    else:
        assert len(result) == len(expect["sites"]) * len(expect["layers"]) * len(expect["positions"])
        assert (result["logprob_change"] == 0).all()  # clean and corrupted are the same prompt


def test_random_probe_calls_return_or_name_the_argument(pipeline, forward_calls, time_limit, one_thread):
    def make_call(rng):
        method, args, kwargs, wrong, expect = random_probe(rng, pipeline)
        forward_calls.clear()  # a refusal must come before any forward pass of this call
        return FuzzCall(f"{method}(*{args!r:.100}, **{kwargs!r:.200})",
                        lambda: getattr(pipeline, method)(*args, **kwargs), [re.escape(name) for name in wrong],
                        lambda result: check_probe(method, result, kwargs, expect, pipeline),
                        refused_after_compute=lambda: bool(forward_calls))

    outcomes = fuzz(FUZZ_SEED, FUZZ_CALLS, make_call, time_limit=time_limit, seconds=20.0)
    assert outcomes["returned"] > 40 and outcomes["refused"] > 30, outcomes
