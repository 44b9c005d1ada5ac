"""Beam search over one GLM context, on a Generator's fixed-shape decode step (one row per beam)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

import torch

from .sampling import GenerationSettings, processed_logits
from .budget import check_kv_cache_fits
from .tokens import (Context, StopCheck, TokenCallback, TokenLogprob, TokenOutput, _banned_tensor, _logprob_record,
                     _room_for_new_tokens, next_positions)

if TYPE_CHECKING:
    from .tokens import Generator


@dataclass
class _Beam:
    tokens: list[int]
    score: float
    logprobs: list[TokenLogprob] | None


@torch.inference_mode()
def beam_search(generator: "Generator", context: Context, settings: GenerationSettings,
                end_tokens: tuple[int, ...], stop: StopCheck | None = None, index: int = 0,
                on_token: TokenCallback | None = None, should_abort: Callable[[], bool] | None = None,
                num_ids: int | None = None, banned_ids=()) -> TokenOutput:
    """The best hypothesis by length-normalised log probability.

    Tokens reach `on_token` only once the best beam is known. An abort ends the search at once and
    returns the best hypothesis so far. `banned_ids` are never part of a hypothesis.
    """
    device = generator.device
    num_beams = settings.num_beams
    max_new = _room_for_new_tokens(generator.model, [context], settings)
    check_kv_cache_fits(generator.model, num_beams, len(context.tokens) + max_new, f"num_beams={num_beams}")
    banned = _banned_tensor(banned_ids, device)
    step, logits, _ = generator.prefill([context], max_new, batch_size=num_beams)
    step.cache.reorder(torch.zeros(num_beams, dtype=torch.long, device=device))  # every beam starts from row 0
    logits = logits[:, :num_ids].expand(num_beams, -1)
    length = len(context.tokens)
    no_pads = torch.zeros(num_beams, dtype=torch.long)
    keep_logprobs = settings.wants_logprobs
    # Only the first beam is live at the start, so the first step does not pick one token n times.
    beams = [_Beam([], 0.0 if b == 0 else float("-inf"), [] if keep_logprobs else None)
             for b in range(num_beams)]
    finished: list[tuple[float, _Beam, str]] = []

    def normalised(beam: _Beam, extra: int = 0) -> float:
        return beam.score / (max(1, len(beam.tokens) + extra) ** settings.length_penalty)

    aborted = False
    survivors: list[tuple[int, _Beam]] = []
    for t in range(max_new):
        history = [list(context.tokens) + b.tokens for b in beams]
        scores = processed_logits(logits, history, [b.tokens for b in beams], t, settings, end_tokens, banned)
        log_probs = scores.float().log_softmax(dim=-1)  # (beams, vocab)
        raw = logits.float().log_softmax(dim=-1) if keep_logprobs else None
        totals = torch.tensor([b.score for b in beams], device=device)[:, None] + log_probs
        values, flat = torch.topk(totals.flatten(), 2 * num_beams)
        survivors = []
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
        if not survivors or enough or aborted or t == max_new - 1:
            break
        while len(survivors) < num_beams:  # pad with dead beams so the batch shape stays fixed
            survivors.append((survivors[0][0], _Beam(survivors[0][1].tokens, float("-inf"), None)))
        step.cache.reorder(torch.tensor([s for s, _ in survivors], device=device))
        beams = [b for _, b in survivors]
        next_ids = torch.tensor([[b.tokens[-1]] for b in beams])
        positions = next_positions([context] * num_beams, t + 1)[:, None]
        logits = step(next_ids, positions, length + t, no_pads)[:, :num_ids]
    live_reason = "abort" if aborted else "length"
    candidates = finished + [(normalised(b), b, live_reason) for _, b in survivors if b.score > float("-inf")]
    _, best, reason = max(candidates, key=lambda item: item[0])
    if on_token is not None:
        for i, token in enumerate(best.tokens):
            on_token(index, token, best.logprobs[i] if best.logprobs else None)
    return TokenOutput(tokens=list(best.tokens), finish_reason=reason, logprobs=best.logprobs)
