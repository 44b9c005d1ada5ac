"""Fuzzed `generate` calls on the demo model (issue 13's acceptance): every call returns its results or raises
glmkit's own ValueError/TypeError naming the offending parameter, and none hangs.

Each call is built from parts that are known, by construction, to be valid or invalid (never by asking the
code under test), so the test knows which parameter an error must name and which calls must succeed.
"""
from __future__ import annotations

import math
import random

from glmkit.generate.blanks import GenerationResult

from fuzzing import FuzzCall, fuzz

SEED = 20261201
CALLS = 1000
PER_CALL_S = 20.0  # a valid call takes well under a second here; a hang is caught long before CI's limit

# Settings: (valid values, invalid values). Ranges are the documented ones of GenerationSettings.
SETTINGS = {
    "max_new_tokens": ([1, 2, 3], [0, -1, 2.5, "4", None, True]),
    "min_new_tokens": ([0, 1, 2], [-1, 1.5, "1"]),
    "do_sample": ([True, False], ["no", 1, None]),
    "temperature": ([0, 1e-45, 0.7, 1.0, 5.0, 1e300], [-1, math.nan, math.inf, "hot", None]),
    "top_k": ([0, 1, 5, 10**9], [-1, 2.0]),
    "top_p": ([1e-9, 0.5, 1.0], [0, 1.5, math.nan]),
    "num_beams": ([1, 2], [0, -2, 1.0, 10**6]),  # 10**6 beams cannot fit: refused, naming num_beams
    "length_penalty": ([-10, 0, 1.0, 10], [11, 1e308, -1e308, math.nan]),
    "no_repeat_ngram_size": ([0, 1, 2], [-1, 0.5]),
    "repetition_penalty": ([1e-300, 0.5, 1.0, 1.3, 1e300], [0, -1, math.inf]),
    "frequency_penalty": ([-2, 0, 0.5, 2], [-1e308, 2.5, math.nan]),
    "presence_penalty": ([-2, 0, 0.5, 2], [-1e308, -2.01, math.inf]),
    "stop": ([None, "x", ["\n", "zz"], ("a",), [], ["\ud800"]], [5, {"e"}, [""], [3], b"x"]),
    "seed": ([None, 0, 7, 2**64 - 1], [-1, 2**64, 1.5, "7"]),
    "logprobs": ([True, False], ["no", 1]),
    "top_logprobs": ([0, 3, 20], [21, -1]),
}
UNKNOWN_KEYWORDS = ["max_length", "temprature", "beams", "prompt"]

# Characters for random text: ASCII (without the brackets masks are made of), accents, CJK, emoji (astral),
# combining marks, controls (NUL, BEL, CR, tab, newline), zero-width and bidi marks, a BOM, private use.
_ALPHABET = ([chr(c) for c in range(32, 127) if chr(c) not in "[]"] + list("éßøñüçЖжπΩ中文字日本語한국")
             + ["\U0001f600", "\U0001f9ea", "\U00010348", "\u0301", "\u0308", "\x00", "\x07", "\r", "\t", "\n",
                "\u200b", "\u200d", "\u202e", "\ufeff", "\ue000", "\u00a0"] + [" "] * 12)
_WORDS = ["def", "return", "x", "=", "import", "os", "Hello", "world", "the", "(", ")", ":", "    ", "\n", "1"]


def random_text(rng: random.Random, longest: int = 16) -> str:
    if rng.random() < 0.5:
        return "".join(rng.choice(_ALPHABET) for _ in range(rng.randint(0, longest)))
    return " ".join(rng.choice(_WORDS) for _ in range(rng.randint(0, longest // 3)))


def random_prompt(rng: random.Random) -> tuple[str, int, str | None]:
    """A prompt, how many blanks it has, and the error message fragment it must raise (None if valid)."""
    case = rng.random()
    if case < 0.08:
        return "", 1, None
    if case < 0.14:  # mixed kinds
        return f"{random_text(rng)}[MASK]{random_text(rng)}[gMASK]", 0, "prompt"
    if case < 0.20:  # a look-alike of a mask
        fake = rng.choice(["[mask]", "[ MASK ]", "[xMASK]", "[MASK", "[Smask]", "[gmask]"])
        return f"{random_text(rng)} {fake} {random_text(rng)}", 0, "prompt"
    if case < 0.27:  # a lone surrogate at a known index
        before = random_text(rng)
        return before + rng.choice(["\ud800", "\udfff", "\udc00"]) + random_text(rng), 0, \
            f"prompt holds a lone surrogate .* at character {len(before)}"
    if case < 0.32:  # far longer than the demo model's 512 positions
        return " ".join(rng.choice(["word", "x", "1"]) for _ in range(rng.randint(600, 900))), 0, "prompt"
    if case < 0.34:  # long, but fits (each "w" and space is one piece: at most ~300 tokens)
        return " ".join(["w"] * rng.randint(200, 300)) + " [MASK]", 1, None
    kind = rng.choice(["[MASK]", "[sMASK]", "[gMASK]"])
    masks = rng.randint(0, 2) if kind != "[gMASK]" else rng.randint(0, 1)
    parts = [random_text(rng) for _ in range(masks + 1)]
    return kind.join(parts), max(masks, 1), None


def random_prompts(rng: random.Random):
    """What is passed as `prompts`, the blank count of each, and the fragment an error must contain."""
    case = rng.random()
    if case < 0.05:
        return rng.choice([None, 5, b"x", {"a"}]), [], "prompts"
    if case < 0.08:
        return [], [], "no prompts"
    if case < 0.11:
        return ["ok", rng.choice([3, None, b"x"])], [], r"prompts\[1\]"
    planned = [random_prompt(rng) for _ in range(1 if case < 0.75 else 2)]
    texts = [p for p, _, _ in planned]
    problem = next((bad for _, _, bad in planned if bad), None)
    value = texts[0] if len(texts) == 1 and rng.random() < 0.7 else (texts if rng.random() < 0.8 else tuple(texts))
    return value, [n for _, n, _ in planned], problem


def random_call(rng: random.Random):
    """(prompts, kwargs, blanks per prompt, the names an error may give; empty when the call is valid)."""
    prompts, blanks, problem = random_prompts(rng)
    kwargs, wrong = {}, []
    for name, (valid, invalid) in SETTINGS.items():
        if rng.random() < 0.35:
            bad = rng.random() < 0.12
            kwargs[name] = rng.choice(invalid if bad else valid)
            if bad:
                wrong.append(name)
    if rng.random() < 0.03:
        name = rng.choice(UNKNOWN_KEYWORDS)
        kwargs[name] = 1
        wrong.append(name)
    kwargs.setdefault("max_new_tokens", rng.choice([1, 2]))
    # Combinations that are invalid although each value alone is fine (`type(...) is int`: not a bool).
    low, high = kwargs.get("min_new_tokens", 0), kwargs["max_new_tokens"]
    if type(low) is int and type(high) is int and low > high >= 1:
        wrong += ["min_new_tokens", "max_new_tokens"]
    beams = kwargs.get("num_beams", 1)
    if type(beams) is int and beams > 1 and kwargs.get("do_sample") is True:
        wrong += ["num_beams", "do_sample"]
    if rng.random() < 0.15:
        kwargs["on_text"] = rng.choice([5, "print"]) if rng.random() < 0.3 else (lambda event: None)
        if not callable(kwargs["on_text"]):
            wrong.append("on_text")
    # An abort before the first blank allocates nothing, so 10**6 beams would then return: keep them apart.
    if rng.random() < 0.15 and kwargs.get("num_beams") != 10**6:
        if rng.random() < 0.3:
            kwargs["should_abort"] = 5
            wrong.append("should_abort")
        else:
            stop_after = rng.randint(0, 4)
            checks = iter(range(10**6))
            kwargs["should_abort"] = lambda: next(checks) >= stop_after
    if problem:
        wrong.append(problem)
    return prompts, kwargs, blanks, wrong


def check_results(results, prompts, kwargs, blanks, not_text: set[int]) -> None:
    single = isinstance(prompts, str)
    results = [results] if single else results
    assert isinstance(results, list) and len(results) == len(blanks)
    for result, count in zip(results, blanks):
        assert isinstance(result, GenerationResult)
        assert len(result.blanks) + result.unfilled_blanks == count
        assert result.finish_reason in {"end", "stop", "length", "abort"}
        for blank in result.blanks:
            assert result.text[blank.start:blank.end] == blank.text
            assert len(blank.tokens) <= kwargs["max_new_tokens"]
            assert not set(blank.tokens) & not_text


def test_random_calls_return_or_name_the_parameter(pipeline, time_limit, one_thread):
    tokenizer = pipeline.tokenizer
    not_text = set(range(20000)) | (set(tokenizer.special_ids.values()) - {tokenizer.eop_id})

    def make_call(rng):
        prompts, kwargs, blanks, wrong = random_call(rng)
        return FuzzCall(f"generate({prompts!r:.120}, **{kwargs!r:.400})",
                        lambda: pipeline.generate(prompts, **kwargs), wrong,
                        lambda results: check_results(results, prompts, kwargs, blanks, not_text))

    outcomes = fuzz(SEED, CALLS, make_call, time_limit=time_limit, seconds=PER_CALL_S)
    # Both outcomes must be exercised often, or the fuzzing tests only one side.
    assert min(outcomes.values()) >= CALLS // 5, outcomes
