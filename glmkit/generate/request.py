"""Requests: a call validated once, where it is made, then run unchanged in this process or on every engine.

A request kind is a frozen dataclass with `run(shard, channel)`: `shard` is what holds the model (a
GLMPipeline, or an engine's ShardWorker: both have `.generator` and `.tokenizer`), `channel` carries streamed
events out and a stop request in. `reduction` declares what travels back from a tensor-parallel cluster:
"rank0" (every rank runs it, rank 0's result is the answer: whatever must be combined across ranks is
combined inside `run` with the shard's collectives) or "all" (one result per rank, e.g. status). A new
capability is a new request kind, not a new lockstep loop.
"""
from __future__ import annotations

import random
from dataclasses import dataclass, replace
from typing import Any, Callable, ClassVar

from .blanks import PromptPlan, check_prompts, fill_blanks, plan_prompt
from .sampling import GenerationSettings


class Channel:
    """How a running request talks to its caller: `emit` streams an event out, `should_abort` reads a stop."""

    def __init__(self, on_event: Callable[[Any], None] | None = None,
                 should_abort: Callable[[], bool] | None = None):
        self.on_event = on_event
        self._should_abort = should_abort

    @property
    def streaming(self) -> bool:
        return self.on_event is not None

    def emit(self, event) -> None:
        if self.on_event is not None:
            self.on_event(event)

    def should_abort(self) -> bool:
        return self._should_abort is not None and bool(self._should_abort())


@dataclass(frozen=True)
class GenerateRequest:
    """Fill the blanks of prompts: each prompt already planned into GLM's token sequence, settings checked."""

    plans: tuple[PromptPlan, ...]
    settings: GenerationSettings
    single: bool = False  # the caller passed one string and gets one result back
    reduction: ClassVar[str] = "rank0"

    @classmethod
    def build(cls, tokenizer, max_sequence_length: int, prompts: str | list[str], **kwargs) -> "GenerateRequest":
        """Validate a generate() call (prompts and keyword settings) before any compute; errors name the parameter."""
        batch = check_prompts(prompts)
        settings = GenerationSettings.from_kwargs(**kwargs)
        if settings.seed is None and not settings.greedy:
            # Every tensor-parallel rank must draw the same samples, so an unseeded call gets one seed here.
            settings = replace(settings, seed=random.randrange(2**31))
        plans = tuple(plan_prompt(tokenizer, p, max_sequence_length) for p in batch)
        return cls(plans, settings, isinstance(prompts, str))

    @property
    def prompts(self) -> list[str]:
        return [plan.prompt for plan in self.plans]

    def run(self, shard, channel: Channel) -> list:
        """The GenerationResults, one per prompt (events go to `channel` as tokens are chosen)."""
        return fill_blanks(shard.generator, shard.tokenizer, self.plans, self.settings,
                           on_text=channel.emit if channel.streaming else None,
                           should_abort=channel.should_abort)
