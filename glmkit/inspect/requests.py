"""Probe request kinds: a trace, a logit lens, a patching sweep, each validated once where the call is made.

They follow glmkit.generate.request: a frozen dataclass whose `run(shard, channel)` runs on a GLMPipeline in
this process, or unchanged on every engine of a GLMCluster, where the ranks combine what they computed with the
shard's collectives (glmkit.inspect.comm) and rank 0's result is the answer (`reduction = "rank0"`). `build`
checks every argument against the model's config and the tokenizer before any compute, so a bad call fails in
the notebook with a message naming what to change.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import pandas as pd

from ..config import GLMConfig
from ..generate.blanks import plan_prompt
from ..generate.tokens import Context
from .capture import Trace, capture
from .comm import ShardComm
from .lens import LogitLens, lens_frames, run_lens
from .patching import patch_frame, patch_sweep
from .sequence import ProbeSequence, along_generation, first_blank
from .sites import (PATCHABLE, check_index, check_int, check_layers, check_positions, check_sites, check_target,
                    resolve_positions)

# What a trace or a lens may ship back by default (its `max_bytes`).
DEFAULT_MAX_BYTES = 256 * 2**20
MAX_TOP_K = 1000
# About what one row of a lens table costs pickled (five numbers and two shared strings).
LENS_ROW_BYTES = 64


def _mib(n: int) -> str:
    return f"{n / 2**20:.1f} MiB"


def _plan(tokenizer, config: GLMConfig, name: str, prompt) -> tuple[Context, int]:
    """The first blank's context of a prompt argument called `name`, and its length."""
    if not isinstance(prompt, str):
        raise TypeError(f"{name} must be a string (one prompt), got {type(prompt).__name__}")
    context = first_blank(tokenizer, plan_prompt(tokenizer, prompt, config.max_sequence_length))
    return context, len(context.tokens)


def _sequence_span(tokenizer, config: GLMConfig, prompt, max_new_tokens) -> tuple[Context, int, str]:
    """(context, the longest the probed sequence can be, how to say it) of a trace or lens call."""
    context, length = _plan(tokenizer, config, "prompt", prompt)
    check_int("max_new_tokens", max_new_tokens, 0, config.max_sequence_length)
    longest = min(length + max_new_tokens, config.max_sequence_length)
    what = f"the prompt is {length} tokens as GLM sees it (with its mask, eos and sop tokens)"
    if max_new_tokens:
        what += f", {longest} with the {longest - length} generated tokens at most"
    return context, longest, what


def _check_bytes(parts: dict[str, int], max_bytes, what: str) -> None:
    check_int("max_bytes", max_bytes, 1)
    total = sum(parts.values())
    if total > max_bytes:
        detail = ", ".join(f"{name}: {_mib(n)}" for name, n in parts.items())
        raise ValueError(f"the {what} would ship {_mib(total)} ({detail}), more than max_bytes={_mib(max_bytes)}: "
                         f"narrow it with layers=, positions= or fewer sites, or raise max_bytes")


def _labels(tokenizer, ids) -> list[str]:
    return [tokenizer.token_text(i) for i in ids]


@dataclass(frozen=True)
class TraceRequest:
    """Read sites (residual stream, branch outputs, attention probabilities) at chosen blocks and positions."""

    prompt: str
    context: Context
    max_new_tokens: int
    sites: tuple[tuple[str, tuple[int, ...]], ...]
    positions: tuple[int, ...] | None
    reduction: ClassVar[str] = "rank0"

    @classmethod
    def build(cls, tokenizer, config: GLMConfig, prompt: str, sites=("residual",), layers=None, positions=None,
              max_new_tokens: int = 0, max_bytes: int = DEFAULT_MAX_BYTES) -> "TraceRequest":
        """Validate a trace() call before any compute; errors name the argument to change."""
        context, longest, what = _sequence_span(tokenizer, config, prompt, max_new_tokens)
        chosen = check_sites(sites, layers, config.num_layers)
        positions = check_positions(positions, longest, what)
        rows = longest if positions is None else min(len(set(positions)), longest)
        parts = {site: len(chosen_layers) * rows * 4 * (config.num_attention_heads * longest
                                                        if site == "attention_probs" else config.hidden_size)
                 for site, chosen_layers in chosen.items()}
        _check_bytes(parts, max_bytes, "trace")
        return cls(prompt, context, max_new_tokens, tuple(chosen.items()), positions)

    def run(self, shard, channel) -> Trace | None:
        """The Trace (rank 0; None on the other ranks of a cluster)."""
        comm = ShardComm.of(shard)
        sequence = along_generation(shard, self.context, self.max_new_tokens)
        positions = resolve_positions(self.positions, len(sequence))
        sites = dict(self.sites)
        values = capture(shard, sequence, sites, positions, comm)
        if values is None:
            return None
        return Trace(self.prompt, list(sequence.ids), _labels(shard.tokenizer, sequence.ids), sequence.position_ids,
                     sequence.allowed(), sequence.sop_index, positions, sites, values,
                     len(shard.generator.model.transformer.layers), comm.sent_bytes)


@dataclass(frozen=True)
class LensRequest:
    """The logit lens at chosen blocks and positions: top-k tokens and a target token's probability and rank."""

    prompt: str
    context: Context
    max_new_tokens: int
    layers: tuple[int, ...]
    positions: tuple[int, ...] | None
    top_k: int
    target: int | None
    reduction: ClassVar[str] = "rank0"

    @classmethod
    def build(cls, tokenizer, config: GLMConfig, prompt: str, layers=None, positions=None, top_k: int = 10,
              target=None, max_new_tokens: int = 0, max_bytes: int = DEFAULT_MAX_BYTES) -> "LensRequest":
        """Validate a logit_lens() call before any compute; errors name the argument to change."""
        context, longest, what = _sequence_span(tokenizer, config, prompt, max_new_tokens)
        layers = check_layers(layers, config.num_layers)
        positions = check_positions(positions, longest, what)
        check_int("top_k", top_k, 1, min(MAX_TOP_K, tokenizer.num_tokens))
        target = None if target is None else check_target(tokenizer, target)
        cells = len(layers) * (longest if positions is None else min(len(set(positions)), longest))
        parts = {"top": cells * top_k * LENS_ROW_BYTES}
        if target is not None:
            parts["target"] = cells * LENS_ROW_BYTES
        _check_bytes(parts, max_bytes, "logit lens")
        return cls(prompt, context, max_new_tokens, layers, positions, top_k, target)

    def run(self, shard, channel) -> LogitLens | None:
        """The LogitLens (rank 0; None on the other ranks of a cluster)."""
        comm = ShardComm.of(shard)
        sequence = along_generation(shard, self.context, self.max_new_tokens)
        positions = resolve_positions(self.positions, len(sequence))
        result = run_lens(shard, sequence, self.layers, positions, self.top_k, self.target, comm)
        if comm.rank != 0:
            return None
        tokens = _labels(shard.tokenizer, sequence.ids)
        top, target = lens_frames(shard.tokenizer, tokens, self.layers, positions, result, self.target)
        return LogitLens(self.prompt, list(sequence.ids), tokens, sequence.sop_index, self.layers, positions, top,
                         target, self.target, comm.sent_bytes)


@dataclass(frozen=True)
class PatchRequest:
    """A patching sweep: each (site, layer, position) of a clean run copied into a corrupted run on its own."""

    clean_prompt: str
    corrupted_prompt: str
    clean: Context
    corrupted: Context
    points: tuple[tuple[str, int, int], ...]
    target: int
    target_position: int
    batch_size: int | None
    reduction: ClassVar[str] = "rank0"

    @classmethod
    def build(cls, tokenizer, config: GLMConfig, clean: str, corrupted: str, target, sites="residual", layers=None,
              positions=None, target_position: int = -1, batch_size: int | None = None) -> "PatchRequest":
        """Validate a patch() call before any compute; errors name the argument to change."""
        clean_context, length = _plan(tokenizer, config, "clean", clean)
        corrupted_context, other = _plan(tokenizer, config, "corrupted", corrupted)
        if length != other:
            raise ValueError(f"clean and corrupted must be the same number of tokens as GLM sees them (with the "
                             f"mask, eos and sop tokens it adds): clean is {length}, corrupted {other}; change a "
                             f"word of one so that they line up token for token")
        target = check_target(tokenizer, target)
        chosen = check_sites(sites, layers, config.num_layers, allowed=PATCHABLE)
        what = f"the prompts are {length} tokens as GLM sees them (with their mask, eos and sop tokens)"
        positions = resolve_positions(check_positions(positions, length, what), length)
        if not isinstance(target_position, bool) and isinstance(target_position, int):
            target_position = check_index("target_position", target_position, length, what)
        else:
            raise ValueError(f"target_position must be an integer index into the prompt, got {target_position!r}")
        if batch_size is not None:
            check_int("batch_size", batch_size, 1)
        points = tuple((site, layer, p) for site, site_layers in chosen.items() for layer in site_layers
                       for p in positions)
        return cls(clean, corrupted, clean_context, corrupted_context, points, target, target_position, batch_size)

    def run(self, shard, channel) -> pd.DataFrame | None:
        """The sweep's table (rank 0; None on the other ranks of a cluster)."""
        comm = ShardComm.of(shard)
        clean = ProbeSequence.of(self.clean)
        result = patch_sweep(shard, clean, ProbeSequence.of(self.corrupted), list(self.points), self.target,
                             self.target_position, self.batch_size, comm)
        if comm.rank != 0:
            return None
        tokenizer = shard.tokenizer
        frame = patch_frame(list(self.points), _labels(tokenizer, clean.ids), result)
        frame.attrs.update(clean=self.clean_prompt, corrupted=self.corrupted_prompt, target_id=self.target,
                           target=tokenizer.token_text(self.target), target_position=self.target_position,
                           clean_tokens=_labels(tokenizer, clean.ids),
                           corrupted_tokens=_labels(tokenizer, self.corrupted.tokens),
                           collective_bytes=comm.sent_bytes)
        return frame
