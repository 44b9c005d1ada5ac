"""Activation patching: copy one activation of a clean run into a corrupted one and see what the prediction does.

A sweep patches each (site, layer, position) on its own, many patched runs to a batch (row j of a batch gets
patch j; the model's rows are independent). Every batch has the same shape, the clean run's included: its first
row is the clean prompt, where every value a patch needs is read, and its second the unpatched corrupted run,
the baseline. A matmul's rounding can depend on how many rows it multiplies, never on what the other rows hold,
so a patched value is the clean value that batch shape computes, and patching a run with its own activations
reproduces the baseline exactly. The measure is the target token's log probability at one position, through
the final LayerNorm and the head as the logit lens computes it (across the vocabulary slices of a
tensor-parallel model).
"""
from __future__ import annotations

import pandas as pd
import torch

from .capture import Probe
from .comm import ShardComm
from .lens import VocabSlice
from .sequence import ProbeSequence

# Tokens (batch rows x sequence length) per batch when the call names no batch size.
PATCH_TOKENS_PER_BATCH = 4096


def patch_batch_size(points: int, length: int, batch_size: int | None) -> int:
    """Rows per batch for `points` patched runs of `length` tokens: `batch_size`, or what the default allows."""
    rows = batch_size if batch_size is not None else max(2, PATCH_TOKENS_PER_BATCH // length)
    return min(rows, points + 1)  # the clean run and the baseline share the first batch


def _target_logprobs(vocab: VocabSlice, values, target: int) -> torch.Tensor:
    y, m = values["target"]
    return vocab.target_logprob((y[:, 0], m[:, 0]), target)  # (b,): the one position read, every row


def patch_sweep(shard, clean: ProbeSequence, corrupted: ProbeSequence, points: list[tuple[str, int, int]],
                target: int, target_position: int, batch_size: int | None, comm: ShardComm) -> dict[str, torch.Tensor]:
    """log p(target) at `target_position`: {"clean": (), "corrupted": (), "patched": (len(points),)} on CPU."""
    model = shard.generator.model
    vocab = VocabSlice(model, comm, shard.tokenizer.num_tokens)
    device, last = vocab.device, len(model.transformer.layers) - 1
    at_target = torch.tensor([target_position], device=device)
    size = patch_batch_size(len(points), len(corrupted), batch_size)
    inputs = corrupted.inputs(device, rows=size)
    # The first batch: the clean run in row 0, with every value a patch needs read there (per site and block,
    # the positions patched), then unpatched corrupted runs (at one row per batch, the baseline runs later).
    first = [torch.cat([c, x[1:]]) for c, x in zip(clean.inputs(device), inputs)]
    needed: dict[tuple[str, int], list[int]] = {}
    for site, layer, position in points:
        needed.setdefault((site, layer), []).append(position)
    needed = {key: sorted(set(positions)) for key, positions in needed.items()}
    probe = Probe(model)
    for (site, layer), positions in needed.items():
        probe.read(site, layer, torch.tensor(positions, device=device), batch=slice(0, 1))
    probe.read("residual", last, at_target, key="target")
    clean_values = probe.run(first, stop_after=last)
    with torch.inference_mode():
        logprobs = [_target_logprobs(vocab, clean_values, target)]  # (size,)
    rows: list = list(points) if size > 1 else [None] + list(points)  # None: an unpatched run
    rows += [None] * (-len(rows) % size)
    for start in range(0, len(rows), size):
        groups: dict[tuple[str, int], tuple[list[int], list[int]]] = {}
        for row, point in enumerate(rows[start:start + size]):
            if point is not None:
                batch_rows, positions = groups.setdefault(point[:2], ([], []))
                batch_rows.append(row)
                positions.append(point[2])
        probe = Probe(model)
        for (site, layer), (batch_rows, positions) in groups.items():
            where = torch.tensor([needed[site, layer].index(p) for p in positions], device=device)
            source = clean_values[site, layer]
            value = (source[0][0, where], source[1][0, where]) if site == "residual" else source[0, where]  # (k, h)
            probe.patch(site, layer, torch.tensor(batch_rows, device=device), torch.tensor(positions, device=device),
                        value)
        probe.read("residual", last, at_target, key="target")
        values = probe.run(inputs, stop_after=last)
        with torch.inference_mode():
            logprobs.append(_target_logprobs(vocab, values, target))
    # The clean batch's rows (clean, baseline, more unpatched runs), then the patched runs in order; at one row
    # per batch the baseline is the first of those.
    every = torch.cat(logprobs).cpu()
    patched = size if size > 1 else 2
    return {"clean": every[0], "corrupted": every[1], "patched": every[patched:patched + len(points)]}


def patch_frame(points: list[tuple[str, int, int]], tokens: list[str], result: dict[str, torch.Tensor]) -> pd.DataFrame:
    """[site, layer, position, input_token, logprob_change, clean_logprob, corrupted_logprob, patched_logprob]."""
    patched = result["patched"].double()
    corrupted, clean = float(result["corrupted"]), float(result["clean"])
    return pd.DataFrame({"site": [p[0] for p in points], "layer": [p[1] for p in points],
                         "position": [p[2] for p in points], "input_token": [tokens[p[2]] for p in points],
                         "logprob_change": (patched - corrupted).numpy(), "clean_logprob": clean,
                         "corrupted_logprob": corrupted, "patched_logprob": patched.numpy()})
