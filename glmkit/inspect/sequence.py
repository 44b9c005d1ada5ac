"""The token sequence a probe runs: what GLM sees when it fills a blank, with GLM's mask and position ids.

The context (everything before sop) attends bidirectionally; from sop on attention is causal; for [MASK] and
[sMASK] every position from sop on is pinned to the mask's position, for [gMASK] positions keep counting
(glmkit.generate.tokens). A probe along a generation runs the context and the generated tokens in one forward
pass with the mask and positions the decode steps used, so what it reads at a generated token is what the
model computed when it chose the next one.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..generate.blanks import PromptPlan, non_text_ids
from ..generate.sampling import GenerationSettings
from ..generate.tokens import Context


@dataclass(frozen=True)
class ProbeSequence:
    """Token ids as GLM sees them: a context ending in sop (at `sop_index`), then generated tokens."""

    ids: tuple[int, ...]
    sop_index: int
    pinned_position: int | None = None

    @classmethod
    def of(cls, context: Context, generated: tuple[int, ...] = ()) -> "ProbeSequence":
        """The sequence of `context` (which ends in sop) followed by `generated` tokens."""
        return cls(tuple(context.tokens) + tuple(generated), len(context.tokens) - 1, context.pinned_position)

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def generated(self) -> tuple[int, ...]:
        return self.ids[self.sop_index + 1:]

    @property
    def position_ids(self) -> list[int]:
        """GLM's position id of every token (rotary positions)."""
        pinned = self.pinned_position
        return [i if pinned is None or i < self.sop_index else pinned for i in range(len(self.ids))]

    def allowed(self) -> torch.Tensor:
        """(n, n) bool: which keys (columns) each query (row) attends to: the context, and itself causally."""
        query = torch.arange(len(self.ids))[:, None]
        key = torch.arange(len(self.ids))[None, :]
        return (key < self.sop_index) | (key <= query)

    def inputs(self, device, rows: int = 1) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """ids (rows, n), position ids (rows, n) and the mask (rows, 1, n, n) for the model, `rows` copies."""
        ids = torch.tensor(self.ids, dtype=torch.long).expand(rows, -1)
        positions = torch.tensor(self.position_ids, dtype=torch.long).expand(rows, -1)
        allowed = self.allowed()[None, None].expand(rows, 1, -1, -1)
        return ids.to(device), positions.to(device), allowed.to(device)


def first_blank(tokenizer, plan: PromptPlan) -> Context:
    """The context GLM fills the prompt's first mask from (as glmkit.generate.blanks.fill_blanks builds it)."""
    mask_id = tokenizer.mask_ids[plan.mask_name]
    pinned = None if plan.uses_gmask else plan.tokens.index(mask_id)
    return Context(tuple(plan.tokens) + (tokenizer.sop_id,), pinned)


def along_generation(shard, context: Context, max_new_tokens: int) -> ProbeSequence:
    """`context` and the tokens the shard's model generates greedily for it (as generate() does by default).

    On a tensor-parallel cluster every rank generates, in lockstep, the same tokens.
    """
    sequence = ProbeSequence.of(context)
    if max_new_tokens == 0:
        return sequence
    tokenizer = shard.tokenizer
    output, = shard.generator.generate([context], GenerationSettings(max_new_tokens=max_new_tokens),
                                       (tokenizer.eop_id, tokenizer.eos_id), num_ids=tokenizer.num_tokens,
                                       banned_ids=non_text_ids(tokenizer))
    return ProbeSequence.of(context, tuple(output.tokens))
