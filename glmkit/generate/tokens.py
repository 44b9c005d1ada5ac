"""Token-level GLM generation: GLM attention masks and positions, a KV-cached decode loop, beam search.

A `Context` is one sequence ending in `sop`. Everything before `sop` attends bidirectionally; from
`sop` on attention is causal. For `[MASK]`/`[sMASK]` every position from `sop` on is pinned to the
mask's position; for `[gMASK]` positions keep counting. Text-level blank filling lives in `infilling`.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Callable

import torch

from .budget import check_kv_cache_fits
from .graphs import DecodeStep, StepGraphs
from ..model import GLM, KVCache
from .sampling import GenerationSettings, choose_next, processed_logits


@dataclass(frozen=True)
class Context:
    """Token ids ending in sop, and the position generation is pinned to (None for [gMASK])."""

    tokens: tuple[int, ...]
    pinned_position: int | None = None


@dataclass(frozen=True)
class TokenLogprob:
    """A generated token's log probability and the most likely alternatives at that step."""

    token: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()


@dataclass
class TokenOutput:
    """What one context produced: generated ids (no end token), why it stopped, optional logprobs."""

    tokens: list[int] = field(default_factory=list)
    finish_reason: str = "length"  # "end" (eop/eos), "stop" (a stop string), or "length"
    logprobs: list[TokenLogprob] | None = None


# Callbacks the text layer provides: stop(index, tokens) -> bool; on_token(index, token, logprob|None).
StopCheck = Callable[[int, list[int]], bool]
TokenCallback = Callable[[int, int, "TokenLogprob | None"], None]


def prefill_inputs(contexts: list[Context], device) -> tuple[torch.Tensor, ...]:
    """Left-padded ids, positions, the GLM mask (b, 1, L, L) and pad counts for a batch of contexts."""
    length = max(len(c.tokens) for c in contexts)
    ids = torch.zeros(len(contexts), length, dtype=torch.long)
    positions = torch.zeros(len(contexts), length, dtype=torch.long)
    pads = torch.tensor([length - len(c.tokens) for c in contexts])
    for row, context in enumerate(contexts):
        n = len(context.tokens)
        ids[row, length - n:] = torch.tensor(context.tokens)
        pos = torch.arange(n)
        if context.pinned_position is not None:
            pos[n - 1] = context.pinned_position
        positions[row, length - n:] = pos
    query = torch.arange(length)[:, None]
    key = torch.arange(length)[None, :]
    # Left padding puts every sop at index L-1: keys before it are context (visible to all),
    # sop itself is visible only to itself and later tokens.
    glm_mask = (key < length - 1) | (key <= query)  # (L, L)
    allowed = glm_mask[None] & (key[None] >= pads[:, None, None])  # (b, L, L)
    return ids.to(device), positions.to(device), allowed[:, None].to(device), pads


def next_positions(contexts: list[Context], steps_done: int) -> torch.Tensor:
    """Position id of the token fed after `steps_done` generated tokens, per context: (b,)."""
    return torch.tensor([c.pinned_position if c.pinned_position is not None
                         else len(c.tokens) - 1 + steps_done for c in contexts])


def _logprob_record(log_probs: torch.Tensor, token: int, top_n: int) -> TokenLogprob:
    top = ()
    if top_n:
        values, ids = torch.topk(log_probs, top_n)
        top = tuple((int(i), float(v)) for i, v in zip(ids.tolist(), values.tolist()))
    return TokenLogprob(token=token, logprob=float(log_probs[token]), top=top)


# Blank k of a prompt samples from seed + k * this (mod 2**64): the odd 64-bit golden-ratio constant keeps
# blank 1 of seed s from reusing blank 0 of seed s + 1.
_BLANK_SEED_STRIDE = 0x9E3779B97F4A7C15


def _make_generators(settings: GenerationSettings, device, rows: int,
                     blank: int) -> list[torch.Generator] | None:
    """One generator per row, each seeded from the seed and the blank number only: a prompt draws the same
    samples alone, in any batch, and on every rank of a cluster."""
    if settings.seed is None or settings.greedy:
        return None
    seed = (settings.seed + blank * _BLANK_SEED_STRIDE) % 2**64
    return [torch.Generator(device=device).manual_seed(seed) for _ in range(rows)]


@torch.inference_mode()
def generate_tokens(model: GLM, contexts: list[Context], settings: GenerationSettings,
                    end_tokens: tuple[int, ...], stop: StopCheck | None = None,
                    on_token: TokenCallback | None = None,
                    should_abort: Callable[[], bool] | None = None,
                    steps: StepGraphs | None = None, num_ids: int | None = None,
                    banned_ids: Sequence[int] | torch.Tensor = (), blank: int = 0) -> list[TokenOutput]:
    """Greedy or sampled generation for a batch of contexts, sharing one KV cache.

    With `steps` (a StepGraphs of this model) decode steps have fixed shapes and replay CUDA graphs:
    every row keeps its cache slot until the end. Without it, finished rows are dropped from the cache.
    `num_ids` (the tokenizer's id count) keeps the padding rows of the vocabulary from being chosen, and
    `banned_ids` other ids (masks, sop, image ids) in every strategy. `blank` (which blank of each prompt
    this is) picks the seeded random stream.
    """
    if settings.num_beams > 1:
        return [beam_search(model, c, settings, end_tokens, stop=stop, index=i, on_token=on_token,
                            should_abort=should_abort, num_ids=num_ids, banned_ids=banned_ids)
                for i, c in enumerate(contexts)]
    device = model.transformer.word_embeddings.weight.device
    max_new = _room_for_new_tokens(model, contexts, settings)
    check_kv_cache_fits(model, len(contexts), max(len(c.tokens) for c in contexts) + max_new,
                        f"a batch of {len(contexts)} prompts")
    banned = _banned_tensor(banned_ids, device)
    ids, positions, allowed, pads = prefill_inputs(contexts, device)
    length = ids.shape[1]
    step_runner = steps.step_for(len(contexts), length + max_new) if steps is not None else None
    cache = step_runner.cache if step_runner else KVCache.allocate(model, len(contexts), length + max_new)
    logits = model(ids, positions, allowed, cache, 0, last_only=True)[:, -1, :num_ids]  # (b, vocab)
    generators = _make_generators(settings, device, len(contexts), blank)
    outputs = [TokenOutput(logprobs=[] if settings.wants_logprobs else None) for _ in contexts]
    active = list(range(len(contexts)))  # context index of each row of `logits`
    for step in range(max_new):
        history = [list(contexts[i].tokens) + outputs[i].tokens for i in active]
        produced = [outputs[i].tokens for i in active]
        scores = processed_logits(logits, history, produced, step, settings, end_tokens, banned)
        chosen = choose_next(scores, settings, generators and [generators[i] for i in active]).tolist()
        raw_log_probs = logits.float().log_softmax(dim=-1) if settings.wants_logprobs else None
        still_active = []
        for row, (index, token) in enumerate(zip(active, chosen)):
            output = outputs[index]
            if token in end_tokens:
                output.finish_reason = "end"
                continue
            record = None
            if raw_log_probs is not None:
                record = _logprob_record(raw_log_probs[row], token, settings.top_logprobs)
                output.logprobs.append(record)
            output.tokens.append(token)
            if on_token is not None:
                on_token(index, token, record)
            if stop is not None and stop(index, output.tokens):
                output.finish_reason = "stop"
                continue
            still_active.append((row, index))
        aborted = should_abort is not None and should_abort()
        if aborted:
            for _, index in still_active:
                outputs[index].finish_reason = "abort"
        if not still_active or aborted or step == max_new - 1:
            break
        start = length + step
        if step_runner is not None:
            logits = _static_step(step_runner, contexts, outputs, still_active, pads, start, step + 1)[:, :num_ids]
        else:
            rows = torch.tensor([row for row, _ in still_active], device=device)
            if len(still_active) < len(active):
                # Drop finished rows from the cache so later steps only compute live sequences.
                cache.reorder(rows)
                pads = pads[rows.cpu()]
            live = [contexts[i] for _, i in still_active]
            next_ids = torch.tensor([[chosen[row]] for row, _ in still_active], device=device)
            step_positions = next_positions(live, step + 1)[:, None].to(device)
            step_allowed = (torch.arange(start + 1)[None, :] >= pads[:, None])[:, None, None].to(device)
            logits = model(next_ids, step_positions, step_allowed, cache, start)[:, -1, :num_ids]
        active = [index for _, index in still_active]
    return outputs


def _static_step(step_runner: DecodeStep, contexts, outputs, still_active, pads, start: int,
                 steps_done: int) -> torch.Tensor:
    """One fixed-shape step over every row; rows that finished are fed a dummy token and ignored."""
    ids = torch.zeros(len(contexts), 1, dtype=torch.long)
    for _, index in still_active:
        ids[index, 0] = outputs[index].tokens[-1]
    positions = next_positions(contexts, steps_done)[:, None]
    logits = step_runner(ids, positions, start, pads)  # (all rows, vocab)
    if len(still_active) == len(contexts):
        return logits  # every row still decoding (the common case): no gather
    rows = torch.tensor([index for _, index in still_active], device=logits.device)
    return logits.index_select(0, rows)


def _banned_tensor(banned_ids: Sequence[int] | torch.Tensor, device) -> torch.Tensor | None:
    if len(banned_ids) == 0:
        return None
    return torch.as_tensor(banned_ids, dtype=torch.long).to(device)


def _room_for_new_tokens(model: GLM, contexts: list[Context], settings: GenerationSettings) -> int:
    longest = max(len(c.tokens) for c in contexts)
    # sop is the last context token and already occupies one position of the budget.
    return max(1, min(settings.max_new_tokens, model.config.max_sequence_length - longest))


@dataclass
class _Beam:
    tokens: list[int]
    score: float
    logprobs: list[TokenLogprob] | None


@torch.inference_mode()
def beam_search(model: GLM, context: Context, settings: GenerationSettings, end_tokens: tuple[int, ...],
                stop: StopCheck | None = None, index: int = 0,
                on_token: TokenCallback | None = None,
                should_abort: Callable[[], bool] | None = None, num_ids: int | None = None,
                banned_ids: Sequence[int] | torch.Tensor = ()) -> TokenOutput:
    """Beam search over one context; the best hypothesis by length-normalised log probability.

    Tokens reach `on_token` only once the best beam is known. An abort ends the search at once and
    returns the best hypothesis so far. `banned_ids` are never part of a hypothesis.
    """
    device = model.transformer.word_embeddings.weight.device
    num_beams = settings.num_beams
    max_new = _room_for_new_tokens(model, [context], settings)
    check_kv_cache_fits(model, num_beams, len(context.tokens) + max_new, f"num_beams={num_beams}")
    banned = _banned_tensor(banned_ids, device)
    ids, positions, allowed, _ = prefill_inputs([context], device)
    length = ids.shape[1]
    cache = KVCache.allocate(model, 1, length + max_new)
    logits = model(ids, positions, allowed, cache, 0, last_only=True)[:, -1, :num_ids]
    cache.reorder(torch.zeros(num_beams, dtype=torch.long, device=device))
    logits = logits.expand(num_beams, -1)
    keep_logprobs = settings.wants_logprobs
    # Only the first beam is live at the start, so the first step does not pick one token n times.
    beams = [_Beam([], 0.0 if b == 0 else float("-inf"), [] if keep_logprobs else None)
             for b in range(num_beams)]
    finished: list[tuple[float, _Beam, str]] = []

    def normalised(beam: _Beam, extra: int = 0) -> float:
        return beam.score / (max(1, len(beam.tokens) + extra) ** settings.length_penalty)

    for step in range(max_new):
        history = [list(context.tokens) + b.tokens for b in beams]
        scores = processed_logits(logits, history, [b.tokens for b in beams], step, settings, end_tokens, banned)
        log_probs = scores.float().log_softmax(dim=-1)  # (beams, vocab)
        raw = logits.float().log_softmax(dim=-1) if keep_logprobs else None
        totals = torch.tensor([b.score for b in beams], device=device)[:, None] + log_probs
        values, flat = torch.topk(totals.flatten(), 2 * num_beams)
        survivors: list[tuple[int, _Beam]] = []
        for value, position in zip(values.tolist(), flat.tolist()):
            if value == float("-inf"):
                break
            source, token = divmod(position, log_probs.shape[1])
            parent = beams[source]
            records = None
            if keep_logprobs:
                records = parent.logprobs + [_logprob_record(raw[source], token, settings.top_logprobs)]
            if token in end_tokens:
                done = _Beam(parent.tokens, value, parent.logprobs)
                finished.append((normalised(done, extra=1), done, "end"))
                continue
            beam = _Beam(parent.tokens + [token], value, records)
            if stop is not None and stop(index, beam.tokens):
                finished.append((normalised(beam), beam, "stop"))
                continue
            survivors.append((source, beam))
            if len(survivors) == num_beams:
                break
        finished.sort(key=lambda item: item[0], reverse=True)
        best_live = max((normalised(b) for _, b in survivors), default=float("-inf"))
        enough = len(finished) >= num_beams and finished[num_beams - 1][0] >= best_live
        aborted = should_abort is not None and should_abort()
        if not survivors or enough or aborted or step == max_new - 1:
            break
        while len(survivors) < num_beams:  # pad with dead beams so the batch shape stays fixed
            survivors.append((survivors[0][0], _Beam(survivors[0][1].tokens, float("-inf"), None)))
        sources = torch.tensor([s for s, _ in survivors], device=device)
        cache.reorder(sources)
        beams = [b for _, b in survivors]
        start = length + step
        next_ids = torch.tensor([[b.tokens[-1]] for b in beams], device=device)
        step_positions = next_positions([context] * num_beams, step + 1)[:, None].to(device)
        step_allowed = torch.ones(num_beams, 1, 1, start + 1, dtype=torch.bool, device=device)
        logits = model(next_ids, step_positions, step_allowed, cache, start)[:, -1, :num_ids]
    live_reason = "abort" if aborted else "length"
    candidates = finished + [(normalised(b), b, live_reason) for _, b in survivors if b.score > float("-inf")]
    _, best, reason = max(candidates, key=lambda item: item[0])
    if on_token is not None:
        for i, token in enumerate(best.tokens):
            on_token(index, token, best.logprobs[i] if best.logprobs else None)
    return TokenOutput(tokens=list(best.tokens), finish_reason=reason, logprobs=best.logprobs)
