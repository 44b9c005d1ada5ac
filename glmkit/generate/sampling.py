"""Generation settings (Hugging Face `generate()` names), their validation, and logits processing."""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch

# OpenAI's range for frequency/presence penalties: beyond it one count outweighs any logit gap anyway.
MAX_OUTPUT_PENALTY = 2.0
# Keeps n ** length_penalty finite and non-zero for every n up to GLM-130B's 2048 positions.
MAX_LENGTH_PENALTY = 10.0
SEED_LIMIT = 2**64
_FP32 = torch.finfo(torch.float32)


@dataclass(frozen=True)
class GenerationSettings:
    """Everything that steers one generation call; validated on construction, before any compute.

    Names follow Hugging Face `generate()` where one exists. `temperature=0` means greedy.
    `max_new_tokens` and `min_new_tokens` count tokens per filled blank. `stop` strings end a
    blank before the stop string. `top_logprobs=N` returns, for every generated token, its log
    probability and the N most likely alternatives under the model's raw distribution.

    Ranges (checked here, so a bad value fails before any compute, naming the parameter): `temperature`
    and `repetition_penalty` take any finite value >= 0 and > 0 (the arithmetic stays finite at the
    extremes); `frequency_penalty` / `presence_penalty` are in [-2, 2] (OpenAI's range);
    `length_penalty` in [-10, 10] (beyond that the normalisation only ranks by length); `seed` in
    [0, 2**64) (torch's generator seeds); `do_sample` and `logprobs` are bools.
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
        _check_bool("do_sample", self.do_sample)
        _check_bool("logprobs", self.logprobs)
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
        _check_float("length_penalty", self.length_penalty, bound=MAX_LENGTH_PENALTY)
        _check_int("no_repeat_ngram_size", self.no_repeat_ngram_size, minimum=0)
        _check_float("repetition_penalty", self.repetition_penalty)
        if self.repetition_penalty <= 0:
            raise ValueError(f"repetition_penalty must be > 0 (1 means none), got {self.repetition_penalty}")
        _check_float("frequency_penalty", self.frequency_penalty, bound=MAX_OUTPUT_PENALTY)
        _check_float("presence_penalty", self.presence_penalty, bound=MAX_OUTPUT_PENALTY)
        if isinstance(self.stop, str):
            object.__setattr__(self, "stop", (self.stop,))
        # A set or dict would be iterable too, but a set of stops has no order to report them in, and
        # anything else (a number, bytes) is a mistake: only a list or tuple of strings is accepted.
        if not isinstance(self.stop, (list, tuple)) or not all(isinstance(s, str) and s for s in self.stop):
            raise ValueError(f"stop must be a string or a list of non-empty strings, got {self.stop!r}")
        object.__setattr__(self, "stop", tuple(self.stop))
        if self.seed is not None:
            _check_int("seed", self.seed, minimum=0)
            if self.seed >= SEED_LIMIT:
                raise ValueError(f"seed must be below 2**64 (torch's generator seeds are 64-bit), got {self.seed}")
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
    "length_penalty": "beam search: exponent of the length that normalises a beam's log probability, in [-10, 10]",
    "no_repeat_ngram_size": "never repeat an n-gram of this size (0: off)",
    "repetition_penalty": "Hugging Face repetition penalty over prompt and output (1: none, >1 discourages)",
    "frequency_penalty": "OpenAI frequency penalty, in [-2, 2]: subtracted per earlier occurrence in the output",
    "presence_penalty": "OpenAI presence penalty, in [-2, 2]: subtracted once for any token already in the output",
    "stop": "stop strings: a blank ends before the first of them",
    "seed": "random seed, for reproducible sampling",
    "logprobs": "return each generated token's log probability under the raw model",
    "top_logprobs": "return the N likeliest alternatives of each generated token too (at most 20)",
}


def _check_bool(name, value):
    # "no" or 0 would silently mean something: a flag must be a real bool.
    if not isinstance(value, bool):
        raise ValueError(f"{name} must be True or False, got {value!r}")


def _check_int(name, value, minimum):
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name} must be an integer, got {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")


def _check_float(name, value, bound: float | None = None):
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    if bound is not None and not -bound <= value <= bound:
        raise ValueError(f"{name} must be in [{-bound:g}, {bound:g}], got {value!r}")


def apply_penalties(logits: torch.Tensor, history: list[list[int]], generated: list[list[int]],
                    settings: GenerationSettings) -> torch.Tensor:
    """Repetition (HF: over prompt and output), frequency and presence (OpenAI: over output) penalties."""
    if (settings.repetition_penalty == 1.0 and settings.frequency_penalty == 0.0
            and settings.presence_penalty == 0.0):
        return logits
    logits = logits.clone()
    # A penalty such as 1e-300 is 0 in fp32 (and 1e300 is inf): keep the factor a positive finite fp32,
    # so a seen logit is scaled, never turned into 0 * inf = NaN.
    penalty = min(max(settings.repetition_penalty, _FP32.tiny), _FP32.max)
    for row, (seen, produced) in enumerate(zip(history, generated)):
        if settings.repetition_penalty != 1.0 and seen:
            ids = torch.tensor(sorted(set(seen)), device=logits.device)
            values = logits[row, ids]
            # HF divides positive logits and multiplies negative ones, so a penalty > 1 always
            # makes a seen token less likely.
            logits[row, ids] = torch.where(values > 0, values / penalty, values * penalty)
        if produced and (settings.frequency_penalty or settings.presence_penalty):
            ids, counts = torch.tensor(produced, device=logits.device).unique(return_counts=True)
            logits[row, ids] -= counts.to(logits.dtype) * settings.frequency_penalty + settings.presence_penalty
    # An extreme penalty may overflow: +inf becomes the largest finite score (softmax of a row holding
    # +inf is NaN), -inf stays the "never" it means.
    return torch.nan_to_num(logits, nan=-math.inf, posinf=_FP32.max, neginf=-math.inf)


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
                     settings: GenerationSettings, end_tokens: tuple[int, ...],
                     banned_ids: torch.Tensor | None = None) -> torch.Tensor:
    """Raw logits (b, vocab) with penalties and bans applied: `banned_ids` (1-D, ids that are never output),
    repeated n-grams, and the end tokens before min_new_tokens. A row left with no id may still end."""
    if (settings.greedy and step >= settings.min_new_tokens and settings.no_repeat_ngram_size <= 0
            and settings.repetition_penalty == 1.0 and not settings.frequency_penalty
            and not settings.presence_penalty):
        # Plain greedy: argmax of the raw logits, no fp32 copy (decode is latency-bound). fill_blanks never
        # bans the end tokens, so no row is left without a choice.
        return logits if banned_ids is None else logits.index_fill(-1, banned_ids, -math.inf)
    scores = apply_penalties(logits.float(), history, generated, settings)
    if banned_ids is not None:
        scores = scores.index_fill(-1, banned_ids, -math.inf)
    banned = [repeated_ngram_bans(h, settings.no_repeat_ngram_size) for h in history]
    if step < settings.min_new_tokens:
        banned = [b + list(end_tokens) for b in banned]
    scores = ban_tokens(scores, banned)
    return _keep_a_way_out(scores, logits, end_tokens)


def _keep_a_way_out(scores: torch.Tensor, logits: torch.Tensor, end_tokens: tuple[int, ...]) -> torch.Tensor:
    # N-gram and min_new_tokens bans can, on a small vocabulary, ban every id of a row; sampling from
    # such a row is NaN. Such a row may end (its end tokens get their raw logits back); without end
    # tokens (token-level calls) its bans are lifted, since no choice would meet them all.
    # Computed on the device without asking the host whether any row is stuck: a decode step must not wait
    # for the GPU here (the next step is queued right after this).
    stuck = ~torch.isfinite(scores).any(dim=-1, keepdim=True)  # (b, 1)
    way_out = logits.float()
    if end_tokens:
        ends = torch.tensor(end_tokens, device=scores.device)
        way_out = torch.full_like(scores, -math.inf).index_copy(-1, ends, way_out.index_select(-1, ends))
    return torch.where(stuck, way_out, scores)


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


def sampling_probabilities(logits: torch.Tensor, settings: GenerationSettings) -> torch.Tensor:
    """The distribution a sample is drawn from: temperature, top-k and top-p over (b, vocab) scores."""
    logits = logits.float()
    best = logits.amax(dim=-1, keepdim=True).clamp(min=-_FP32.max)  # (b, 1)
    # Scale each id's gap to the row's best, not the logit itself: the best id keeps 0 at any temperature,
    # so 1e-45 gives near-greedy and 1e300 near-uniform probabilities, never inf / inf = NaN. The
    # temperature is kept within fp32's positive finite range (1e-45 would be 0 there).
    temperature = min(max(settings.temperature, _FP32.tiny), _FP32.max)
    gaps = (logits - best) / temperature
    return filter_top_k_top_p(gaps, settings.top_k, settings.top_p).softmax(dim=-1)


def choose_next(logits: torch.Tensor, settings: GenerationSettings,
                generators: list[torch.Generator | None] | None = None) -> torch.Tensor:
    """Greedy argmax or a temperature / top-k / top-p sample per row: (b, vocab) -> (b,).

    `generators` (one per row) draw each row's sample from its own random stream, so a row's tokens do
    not depend on which other rows share the batch.
    """
    if settings.greedy:
        return logits.argmax(dim=-1)
    probs = sampling_probabilities(logits, settings)
    if generators is None:
        return torch.multinomial(probs, 1).squeeze(-1)
    rows = [torch.multinomial(probs[row:row + 1], 1, generator=generator)
            for row, generator in enumerate(generators)]
    return torch.cat(rows).squeeze(-1)
