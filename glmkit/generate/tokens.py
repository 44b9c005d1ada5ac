"""Token-level GLM generation: GLM attention masks and positions, and the one Generator that decodes.

A `Context` is one sequence ending in `sop`. Everything before `sop` attends bidirectionally; from
`sop` on attention is causal. For `[MASK]`/`[sMASK]` every position from `sop` on is pinned to the
mask's position; for `[gMASK]` positions keep counting. Text-level blank filling lives in `blanks`.

`Generator` owns a model, its fixed-shape decode steps (CUDA graphs and KV caches on a GPU) and the fused
decode kernels, and runs prefill and decode: GLMPipeline, the cluster's engines and `glmkit bench` all decode
through one. On a GPU it queues the next step before the host looks at the token just chosen (stop strings,
streaming, the engines' stop check), so that host work overlaps the GPU instead of idling it.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Callable

import torch

from ..model import GLM, KVCache
from .budget import check_kv_cache_fits
from .graphs import StepGraphs
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
    finish_reason: str = "length"  # "end" (eop/eos), "stop" (a stop string), "abort" or "length"
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


def _banned_tensor(banned_ids: Sequence[int] | torch.Tensor, device) -> torch.Tensor | None:
    if len(banned_ids) == 0:
        return None
    return torch.as_tensor(banned_ids, dtype=torch.long).to(device)


def _room_for_new_tokens(model: GLM, contexts: list[Context], settings: GenerationSettings) -> int:
    longest = max(len(c.tokens) for c in contexts)
    # sop is the last context token and already occupies one position of the budget.
    return max(1, min(settings.max_new_tokens, model.config.max_sequence_length - longest))


class _HostCopy:
    """Chosen token ids copied to the host without waiting for work queued after them (the next step)."""

    def __init__(self, tokens: torch.Tensor):
        if tokens.device.type == "cuda":
            self.host = torch.empty(tokens.shape, dtype=tokens.dtype, pin_memory=True)
            self.host.copy_(tokens, non_blocking=True)
            self.done = torch.cuda.Event()
            self.done.record()
        else:
            self.host, self.done = tokens, None

    def tolist(self) -> list[int]:
        if self.done is not None:
            self.done.synchronize()
        return self.host.tolist()


class Generator:
    """Prefill and decode for a model: one object owning its decode steps, KV caches and fused kernels.

    `use_graphs` (default: on a GPU) replays CUDA graphs of the fixed-shape decode step; `kernels` (default: on
    a GPU) swaps glmkit's fused decode kernels into the model (glmkit.kernels). On the CPU the same steps run
    eagerly. Every row of a batch keeps its cache slot until the call ends.
    """

    def __init__(self, model: GLM, use_graphs: bool | None = None, kernels: bool | None = None):
        self.model = model
        self.device = model.transformer.word_embeddings.weight.device
        if kernels if kernels is not None else self.device.type == "cuda":
            from ..kernels import apply_decode_kernels

            apply_decode_kernels(model)
        self.steps = StepGraphs(model, use_graphs)
        # Queue step t+1 before reading token t on the host: only worth it where the GPU runs asynchronously.
        self.lookahead = self.device.type == "cuda"

    def prefill(self, contexts: list[Context], new_tokens: int, batch_size: int | None = None):
        """(decode step, logits (b, vocab) of each context's sop, pads): the contexts' KV cache is filled.

        `batch_size` larger than the contexts (beam search) gives a step with that many rows, of which the
        first len(contexts) are filled.
        """
        ids, positions, allowed, pads = prefill_inputs(contexts, self.device)
        length = ids.shape[1]
        step = self.steps.step_for(batch_size or len(contexts), length + new_tokens)
        cache = step.cache
        if cache.batch_size != len(contexts):
            cache = KVCache(cache.keys[:, :len(contexts)], cache.values[:, :len(contexts)])  # a view: writes land
        slots = torch.arange(length, device=self.device)
        with torch.inference_mode():
            logits = self.model(ids, positions, allowed, cache, slots, last_only=True)[:, -1]  # (b, vocab)
        return step, logits, pads

    @torch.inference_mode()
    def generate(self, contexts: list[Context], settings: GenerationSettings, end_tokens: tuple[int, ...],
                 stop: StopCheck | None = None, on_token: TokenCallback | None = None,
                 should_abort: Callable[[], bool] | None = None, num_ids: int | None = None,
                 banned_ids: Sequence[int] | torch.Tensor = (), blank: int = 0) -> list[TokenOutput]:
        """Greedy, sampled or beam-search generation for a batch of contexts, sharing one KV cache.

        `num_ids` (the tokenizer's id count) keeps the padding rows of the vocabulary from being chosen, and
        `banned_ids` other ids (masks, sop, image ids) in every strategy. `blank` (which blank of each prompt
        this is) picks the seeded random stream.
        """
        if settings.num_beams > 1:
            return [self._beam_search(c, settings, end_tokens, stop, i, on_token, should_abort, num_ids,
                                      banned_ids) for i, c in enumerate(contexts)]
        max_new = _room_for_new_tokens(self.model, contexts, settings)
        length = max(len(c.tokens) for c in contexts)
        check_kv_cache_fits(self.model, len(contexts), length + max_new, f"a batch of {len(contexts)} prompts")
        banned = _banned_tensor(banned_ids, self.device)
        step, logits, pads = self.prefill(contexts, max_new)
        generators = _make_generators(settings, self.device, len(contexts), blank)
        outputs = [TokenOutput(logprobs=[] if settings.wants_logprobs else None) for _ in contexts]
        histories = [list(c.tokens) for c in contexts]  # context + output per row, grown as tokens come
        active = list(range(len(contexts)))

        def queue_step(chosen: torch.Tensor, t: int) -> torch.Tensor:  # step t + 1 on the device's tokens
            return step(chosen[:, None], next_positions(contexts, t + 1)[:, None], length + t, pads)

        for t in range(max_new):
            logits = logits[:, :num_ids]
            scores = processed_logits(logits, histories, [o.tokens for o in outputs], t, settings, end_tokens, banned)
            chosen = choose_next(scores, settings, generators)  # (b,) on the device
            # Read what this step's logits give before the next step overwrites its graph's output buffer.
            raw_log_probs = logits.float().log_softmax(dim=-1) if settings.wants_logprobs else None
            tokens = _HostCopy(chosen)
            last = t == max_new - 1
            queued = None
            if self.lookahead and not last:
                queued = queue_step(chosen, t)
            still_active = []
            chosen_ids = tokens.tolist()
            for index in active:
                token, output = chosen_ids[index], outputs[index]
                if token in end_tokens:
                    output.finish_reason = "end"
                    continue
                record = None
                if raw_log_probs is not None:
                    record = _logprob_record(raw_log_probs[index], token, settings.top_logprobs)
                    output.logprobs.append(record)
                output.tokens.append(token)
                histories[index].append(token)
                if on_token is not None:
                    on_token(index, token, record)
                if stop is not None and stop(index, output.tokens):
                    output.finish_reason = "stop"
                    continue
                still_active.append(index)
            aborted = should_abort is not None and should_abort()
            if aborted:
                for index in still_active:
                    outputs[index].finish_reason = "abort"
            active = still_active
            if not active or aborted or last:
                break
            logits = queued if queued is not None else queue_step(chosen, t)
        return outputs

    def _beam_search(self, context: Context, settings: GenerationSettings, end_tokens: tuple[int, ...],
                     stop: StopCheck | None, index: int, on_token: TokenCallback | None,
                     should_abort: Callable[[], bool] | None, num_ids: int | None, banned_ids) -> TokenOutput:
        from .beams import beam_search

        return beam_search(self, context, settings, end_tokens, stop, index, on_token, should_abort, num_ids,
                           banned_ids)


def generate_tokens(model: GLM, contexts: list[Context], settings: GenerationSettings,
                    end_tokens: tuple[int, ...], stop: StopCheck | None = None,
                    on_token: TokenCallback | None = None, should_abort: Callable[[], bool] | None = None,
                    num_ids: int | None = None, banned_ids: Sequence[int] | torch.Tensor = (),
                    blank: int = 0) -> list[TokenOutput]:
    """One call of a fresh eager Generator (tests and scripts); long-lived callers keep a Generator."""
    return Generator(model, use_graphs=False, kernels=False).generate(
        contexts, settings, end_tokens, stop=stop, on_token=on_token, should_abort=should_abort, num_ids=num_ids,
        banned_ids=banned_ids, blank=blank)
