"""Per-example metrics (answer normalisation, exact match, token F1, the choice a score picks) and the Wilson
score interval of an accuracy.

Exact match and F1 follow GLM-130B's evaluation/metrics.py, which follows SQuAD: lower-case, drop
punctuation and the articles a/an/the, collapse whitespace; F1 over the words that remain; both the best
over the accepted answers. `exact` is the strict form: the answer equals a target once surrounding
whitespace is stripped (what code completions need: `_os` is not `os`).
"""
from __future__ import annotations

import math
import re
import string
from collections import Counter

Z95 = 1.959963984540054  # the standard normal's 97.5 % quantile: a two-sided 95 % interval
_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCTUATION = str.maketrans("", "", string.punctuation)


def normalize_answer(text: str) -> str:
    """SQuAD's normalisation: lower case, no punctuation, no articles, single spaces."""
    text = _ARTICLES.sub(" ", text.lower().translate(_PUNCTUATION))
    return " ".join(text.split())


def exact_match(prediction: str, targets: list[str] | tuple[str, ...]) -> bool:
    """Whether the normalised prediction equals any normalised target (GLM-130B's EM)."""
    answer = normalize_answer(prediction)
    return any(answer == normalize_answer(t) for t in targets)


def exact(prediction: str, targets: list[str] | tuple[str, ...]) -> bool:
    """Whether the prediction equals a target exactly, surrounding whitespace aside."""
    return any(prediction.strip() == t.strip() for t in targets)


def token_f1(prediction: str, targets: list[str] | tuple[str, ...]) -> float:
    """The best word-overlap F1 between the normalised prediction and a normalised target."""
    best = 0.0
    words = normalize_answer(prediction).split()
    for target in targets:
        gold = normalize_answer(target).split()
        common = sum((Counter(words) & Counter(gold)).values())
        if common:
            precision, recall = common / len(words), common / len(gold)
            best = max(best, 2 * precision * recall / (precision + recall))
    return best


def choice_scores(logprobs: list[float], num_tokens: list[int], choices: list[str]) -> dict[str, list[float]]:
    """A choice's score three ways: its log probability (`raw`), per scored token (`token_norm`) and per
    character of the choice's text (`char_norm`)."""
    return {"raw": list(logprobs),
            "token_norm": [lp / max(1, n) for lp, n in zip(logprobs, num_tokens)],
            "char_norm": [lp / max(1, len(c)) for lp, c in zip(logprobs, choices)]}


def argmax(values: list[float]) -> int:
    """The index of the largest value (the first of ties); -1 for an empty list."""
    return max(range(len(values)), key=lambda i: (values[i], -i)) if values else -1


def wilson_interval(successes: int, trials: int, z: float = Z95) -> tuple[float, float]:
    """The Wilson score interval of a proportion (95 % by default); (nan, nan) with no trials."""
    if trials <= 0:
        return math.nan, math.nan
    p = successes / trials
    denominator = 1 + z * z / trials
    centre = (p + z * z / (2 * trials)) / denominator
    half = z * math.sqrt(p * (1 - p) / trials + z * z / (4 * trials * trials)) / denominator
    return max(0.0, centre - half), min(1.0, centre + half)
