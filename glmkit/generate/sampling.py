"""Generation settings (Hugging Face `generate()` names), their validation, and logits processing."""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class GenerationSettings:
    """Everything that steers one generation call; validated on construction, before any compute.

    Names follow Hugging Face `generate()` where one exists. `temperature=0` means greedy.
    `max_new_tokens` and `min_new_tokens` count tokens per filled blank. `stop` strings end a
    blank before the stop string. `top_logprobs=N` returns, for every generated token, its log
    probability and the N most likely alternatives under the model's raw distribution.
    """

    max_new_tokens: int = 64
    min_new_tokens: int = 0
    do_sample: bool = False
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    num_beams: int = 1
    length_penalty: float = 1.0
    no_repeat_ngram_size: int = 0
    repetition_penalty: float = 1.0
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    stop: tuple[str, ...] = ()
    seed: int | None = None
    logprobs: bool = False
    top_logprobs: int = 0

    def __post_init__(self):
        _check_int("max_new_tokens", self.max_new_tokens, minimum=1)
        _check_int("min_new_tokens", self.min_new_tokens, minimum=0)
        if self.min_new_tokens > self.max_new_tokens:
            raise ValueError(f"min_new_tokens ({self.min_new_tokens}) must not exceed "
                             f"max_new_tokens ({self.max_new_tokens})")
        _check_float("temperature", self.temperature)
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0 (0 means greedy), got {self.temperature}")
        _check_int("top_k", self.top_k, minimum=0)
        _check_float("top_p", self.top_p)
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        _check_int("num_beams", self.num_beams, minimum=1)
        if self.num_beams > 1 and self.do_sample:
            raise ValueError("beam search with sampling is not supported: set do_sample=False "
                             "or num_beams=1")
        _check_float("length_penalty", self.length_penalty)
        _check_int("no_repeat_ngram_size", self.no_repeat_ngram_size, minimum=0)
        _check_float("repetition_penalty", self.repetition_penalty)
        if self.repetition_penalty <= 0:
            raise ValueError(f"repetition_penalty must be > 0 (1 means none), got {self.repetition_penalty}")
        _check_float("frequency_penalty", self.frequency_penalty)
        _check_float("presence_penalty", self.presence_penalty)
        if isinstance(self.stop, str):
            object.__setattr__(self, "stop", (self.stop,))
        if not all(isinstance(s, str) and s for s in self.stop):
            raise ValueError(f"stop must be a string or a list of non-empty strings, got {self.stop!r}")
        object.__setattr__(self, "stop", tuple(self.stop))
        if self.seed is not None:
            _check_int("seed", self.seed, minimum=0)
        _check_int("top_logprobs", self.top_logprobs, minimum=0)
        if self.top_logprobs > 20:
            raise ValueError(f"top_logprobs must be at most 20, got {self.top_logprobs}")

    @classmethod
    def from_kwargs(cls, **kwargs) -> "GenerationSettings":
        """Build settings from keyword arguments, naming any unknown keyword and the known ones."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(kwargs) - known)
        if unknown:
            raise TypeError(f"unknown generation arguments {unknown}; known: {sorted(known)}")
        if "stop" in kwargs and kwargs["stop"] is None:
            kwargs["stop"] = ()
        if isinstance(kwargs.get("stop"), list):
            kwargs["stop"] = tuple(kwargs["stop"])
        return cls(**kwargs)

    @property
    def greedy(self) -> bool:
        return not self.do_sample or self.temperature == 0

    @property
    def wants_logprobs(self) -> bool:
        return self.logprobs or self.top_logprobs > 0


# One line per GenerationSettings field, for the help of every surface that exposes the settings (the
# `glmkit generate` flags are built from the fields and these lines, so a new field cannot be forgotten).
DESCRIPTIONS = {
    "max_new_tokens": "most tokens generated per blank",
    "min_new_tokens": "fewest tokens per blank before an end token may be chosen",
    "do_sample": "sample (temperature, top-k, top-p) instead of taking the likeliest token",
    "temperature": "sampling temperature; 0 means greedy",
    "top_k": "sample among the k likeliest tokens only (0: all)",
    "top_p": "sample among the smallest set of tokens whose probability reaches p (nucleus), in (0, 1]",
    "num_beams": "beam search with this many beams (1: none); not with sampling",
    "length_penalty": "beam search: exponent of the length that normalises a beam's log probability",
    "no_repeat_ngram_size": "never repeat an n-gram of this size (0: off)",
    "repetition_penalty": "Hugging Face repetition penalty over prompt and output (1: none, >1 discourages)",
    "frequency_penalty": "OpenAI frequency penalty: subtracted per earlier occurrence in the output",
    "presence_penalty": "OpenAI presence penalty: subtracted once for any token already in the output",
    "stop": "stop strings: a blank ends before the first of them",
    "seed": "random seed, for reproducible sampling",
    "logprobs": "return each generated token's log probability under the raw model",
    "top_logprobs": "return the N likeliest alternatives of each generated token too (at most 20)",
}


def _check_int(name, value, minimum):
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name} must be an integer, got {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")


def _check_float(name, value):
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value!r}")


def apply_penalties(logits: torch.Tensor, history: list[list[int]], generated: list[list[int]],
                    settings: GenerationSettings) -> torch.Tensor:
    """Repetition (HF: over prompt and output), frequency and presence (OpenAI: over output) penalties."""
    if (settings.repetition_penalty == 1.0 and settings.frequency_penalty == 0.0
            and settings.presence_penalty == 0.0):
        return logits
    logits = logits.clone()
    for row, (seen, produced) in enumerate(zip(history, generated)):
        if settings.repetition_penalty != 1.0 and seen:
            ids = torch.tensor(sorted(set(seen)), device=logits.device)
            values = logits[row, ids]
            # HF divides positive logits and multiplies negative ones, so a penalty > 1 always
            # makes a seen token less likely.
            logits[row, ids] = torch.where(values > 0, values / settings.repetition_penalty,
                                           values * settings.repetition_penalty)
        if produced and (settings.frequency_penalty or settings.presence_penalty):
            ids, counts = torch.tensor(produced, device=logits.device).unique(return_counts=True)
            logits[row, ids] -= counts.to(logits.dtype) * settings.frequency_penalty + settings.presence_penalty
    return logits


def ban_tokens(logits: torch.Tensor, banned: list[list[int]]) -> torch.Tensor:
    """Set the logits of each row's banned ids to -inf."""
    if not any(banned):
        return logits
    logits = logits.clone()
    for row, ids in enumerate(banned):
        if ids:
            logits[row, ids] = -math.inf
    return logits


def repeated_ngram_bans(tokens: list[int], size: int) -> list[int]:
    """Ids that would complete an n-gram of length `size` already present in `tokens`."""
    if size <= 0 or len(tokens) < size:
        return []
    prefix = tuple(tokens[len(tokens) - size + 1:]) if size > 1 else ()
    return [tokens[i + size - 1] for i in range(len(tokens) - size + 1)
            if tuple(tokens[i:i + size - 1]) == prefix]


def processed_logits(logits: torch.Tensor, history: list[list[int]], generated: list[list[int]], step: int,
                     settings: GenerationSettings, end_tokens: tuple[int, ...]) -> torch.Tensor:
    """Raw logits (b, vocab) with penalties, no-repeat-ngram bans and the min_new_tokens end-token ban applied."""
    if (settings.greedy and step >= settings.min_new_tokens and settings.no_repeat_ngram_size <= 0
            and settings.repetition_penalty == 1.0 and not settings.frequency_penalty
            and not settings.presence_penalty):
        return logits  # plain greedy: argmax of the raw logits, no fp32 copy (decode is latency-bound)
    scores = apply_penalties(logits.float(), history, generated, settings)
    banned = [repeated_ngram_bans(h, settings.no_repeat_ngram_size) for h in history]
    if step < settings.min_new_tokens:
        banned = [b + list(end_tokens) for b in banned]
    return ban_tokens(scores, banned)


def filter_top_k_top_p(logits: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """Keep the top-k ids and the smallest set whose probability reaches top_p; others -inf."""
    if top_k > 0 and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]  # (b, 1)
        logits = logits.masked_fill(logits < kth, -math.inf)
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
        cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        # Drop a token when the tokens before it already reach top_p; the first always stays.
        drop_sorted = (cumulative - sorted_logits.softmax(dim=-1)) >= top_p
        drop = drop_sorted.scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, -math.inf)
    return logits


def choose_next(logits: torch.Tensor, settings: GenerationSettings,
                generator: torch.Generator | None) -> torch.Tensor:
    """Greedy argmax or a temperature / top-k / top-p sample per row: (b, vocab) -> (b,)."""
    if settings.greedy:
        return logits.argmax(dim=-1)
    logits = filter_top_k_top_p(logits.float() / settings.temperature, settings.top_k, settings.top_p)
    probs = logits.softmax(dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)
