"""Reading and replacing values inside a GLM's forward pass, with forward hooks that live for that pass only.

The model stays plain: a `Probe` registers hooks on model.py's modules (`transformer.layers.{i}`, its
`.attention`, `.mlp`), runs one forward pass and removes them, so plain generation never runs a hook. The pass
stops after the deepest block the probe needs (a hook raises), which also skips the output projection and, on
a tensor-parallel rank, its all-gather of the whole vocabulary: every rank stops at the same block, so no
collective is left waiting. Attention probabilities are recomputed from the attention module's input with the
model's own rotary and `attention_probabilities`, under the mask the model was given. Probes run without a KV
cache, so a GPU's fused decode-attention kernel (glmkit.kernels) falls back to those eager ops, while its fused
LayerNorm runs as in every prefill.

`capture` reads sites for a `Trace`: per-head values are gathered from every rank in head order, values every
rank holds whole (the residual stream, the branch outputs after their all-reduce) are kept from rank 0 only.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import pandas as pd
import torch
from torch import nn

from ..model import apply_rotary, attention_probabilities
from .comm import ShardComm
from .sequence import ProbeSequence


class _Stop(Exception):
    """Raised by the hook on the last block a probe needs: the rest of the forward pass is not run."""


def attention_probs(attention: nn.Module, x, cos, sin, allowed, rows: torch.Tensor) -> torch.Tensor:
    """The probabilities (b, local heads, len(rows), t) of query positions `rows`, as Attention.forward makes them."""
    b, s, _ = x.shape
    hd = attention.config.head_dim
    qkv = attention.query_key_value(x).view(b, s, attention.local_heads, 3, hd)  # (b, s, nh, 3, hd)
    q, k = apply_rotary(qkv[:, :, :, :2], cos[:, :, :, None], sin[:, :, :, None]).unbind(dim=3)
    q, k = q[:, rows].transpose(1, 2), k.transpose(1, 2)  # (b, nh, P, hd), (b, nh, t, hd)
    return attention_probabilities(q, k, allowed[:, :, rows], attention.layer_id)


class Probe:
    """The hooks of one forward pass: `read` keeps values, `patch` replaces them, `run` runs the pass."""

    def __init__(self, model: nn.Module):
        self.model = model
        self.values: dict[tuple[str, int], object] = {}
        self._patches: list[tuple[nn.Module, Callable]] = []
        self._reads: list[tuple[str, nn.Module, Callable]] = []

    def module(self, site: str, layer: int) -> nn.Module:
        """The module whose output (or, for attention_probs, input) is `site` of block `layer`."""
        block = self.model.transformer.layers[layer]
        if site == "residual":
            return block
        return block.mlp if site == "mlp" else block.attention

    def read(self, site: str, layer: int, rows: torch.Tensor, key=None, batch: slice = slice(None)) -> None:
        """Keep `site` of block `layer` at sequence positions `rows` (P,) of batch rows `batch` in `values[key]`
        (default (site, layer)): (b, P, h) tensors, a pair (y, m) of them for the residual stream, (b, heads, P, t)
        for attention_probs."""
        key = (site, layer) if key is None else key
        if site == "attention_probs":
            def pre_hook(module, args):  # args: x, cos, sin, allowed, cache, slots
                x, cos, sin, allowed = (t[batch] for t in args[:4])
                self.values[key] = attention_probs(module, x, cos, sin, allowed, rows)
            self._reads.append(("pre", self.module(site, layer), pre_hook))
            return

        def hook(module, args, output):
            if site == "residual":
                y, m = output  # the block's output stands for y * alpha + m
                self.values[key] = (y[batch, rows], m[batch, rows])
            else:
                self.values[key] = output[batch, rows]
        self._reads.append(("forward", self.module(site, layer), hook))

    def patch(self, site: str, layer: int, batch_rows: torch.Tensor, positions: torch.Tensor, values) -> None:
        """Replace `site` of block `layer` at (batch_rows[j], positions[j]) by values[j]: values (k, h), or a
        pair (y, m) of them for the residual stream (which the next block's LayerNorm adds as y * alpha + m)."""
        def hook(module, args, output):
            if site == "residual":
                y, m = output
                return y.index_put((batch_rows, positions), values[0]), m.index_put((batch_rows, positions), values[1])
            return output.index_put((batch_rows, positions), values)
        self._patches.append((self.module(site, layer), hook))

    def run(self, inputs: tuple[torch.Tensor, ...], stop_after: int) -> dict:
        """Run the model on (ids, position ids, mask) through block `stop_after` with the hooks; the values read.

        Patches are registered first, so a read of a patched site sees the patched value.
        """
        handles = [module.register_forward_hook(hook) for module, hook in self._patches]
        for kind, module, hook in self._reads:
            register = module.register_forward_pre_hook if kind == "pre" else module.register_forward_hook
            handles.append(register(hook))

        def stop(module, args, output):
            raise _Stop

        handles.append(self.model.transformer.layers[stop_after].register_forward_hook(stop))
        try:
            with torch.inference_mode():
                self.model(*inputs)
        except _Stop:
            pass
        finally:
            for handle in handles:
                handle.remove()
        return self.values


def residual_stream(block: nn.Module, pair) -> torch.Tensor:
    """y * alpha + m of a block's output pair, computed as the next LayerNorm computes it."""
    y, m = pair
    return y * block.alpha + m


def capture(shard, sequence: ProbeSequence, sites: dict[str, tuple[int, ...]], positions: tuple[int, ...],
            comm: ShardComm) -> dict[str, torch.Tensor] | None:
    """{site: fp32 CPU tensor} of the sites read along `sequence` (rank 0; None on the other ranks).

    Vector sites give (layers, positions, hidden); attention_probs (layers, heads, positions, n), heads in the
    full model's order: rank r holds heads [r * heads/tp, (r + 1) * heads/tp), so a rank-ordered gather is it.
    """
    model = shard.generator.model
    device = model.transformer.word_embeddings.weight.device
    rows = torch.tensor(positions, dtype=torch.long, device=device)
    probe = Probe(model)
    for site, layers in sites.items():
        if site == "attention_probs" or comm.rank == 0:  # replicated values: rank 0's copy is the answer
            for layer in layers:
                probe.read(site, layer, rows)
    # Every rank stops at the same block, whatever it reads.
    values = probe.run(sequence.inputs(device), stop_after=max(max(layers) for layers in sites.values()))
    out = {}
    for site, layers in sites.items():
        if site == "attention_probs":
            stacked = torch.stack([comm.gather(values[site, layer][0], dim=0) for layer in layers])
        elif comm.rank != 0:
            continue
        elif site == "residual":
            stacked = torch.stack([residual_stream(model.transformer.layers[layer], values[site, layer])[0]
                                   for layer in layers])
        else:
            stacked = torch.stack([values[site, layer][0] for layer in layers])
        out[site] = stacked.float().cpu()
    return out if comm.rank == 0 else None


@dataclass
class Trace:
    """What a probe read along one sequence: tensors by site, the sequence's tokens, GLM's mask and positions.

    `values[site]` is fp32: (layers, positions, hidden) for residual, attention and mlp; (layers, heads,
    positions, n) for attention_probs, rows being the query positions read and columns every key. `layers[site]`
    and `positions` say which blocks and sequence indices the rows are.
    """

    prompt: str
    ids: list[int]
    tokens: list[str]  # a label for every position of the sequence
    position_ids: list[int]  # GLM's rotary positions (pinned from sop on for [MASK]/[sMASK])
    allowed: torch.Tensor  # (n, n) bool: GLM's mask, query rows, key columns
    sop_index: int
    positions: tuple[int, ...]
    layers: dict[str, tuple[int, ...]]
    values: dict[str, torch.Tensor]
    num_layers: int
    collective_bytes: int = 0  # what each rank's probe collectives sent (not the model's own; 0 in one process)

    @property
    def generated(self) -> list[int]:
        """The tokens generated after sop (empty for a probe on the prompt alone)."""
        return self.ids[self.sop_index + 1:]

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.values.values())

    def __getitem__(self, site: str) -> torch.Tensor:
        if site not in self.values:
            raise KeyError(f"site {site!r} was not traced; traced: {sorted(self.values)}")
        return self.values[site]

    def get(self, site: str, layer: int) -> torch.Tensor:
        """`site` at block `layer`: (positions, hidden), or (heads, positions, n) for attention_probs."""
        layers = self.layers.get(site, ())
        if -self.num_layers <= layer < 0:
            layer += self.num_layers
        if layer not in layers:
            raise KeyError(f"{site} at layer {layer} was not traced (traced layers: {list(layers)}): "
                           f"trace with sites=[{site!r}] and layers including {layer}")
        return self[site][layers.index(layer)]

    def attention(self, layer: int) -> torch.Tensor:
        """Attention probabilities (heads, positions, n) of block `layer`, over GLM's mask (`allowed`)."""
        return self.get("attention_probs", layer)

    def table(self) -> pd.DataFrame:
        """One row per position: token id and label, GLM position id, part (context, sop, generated), read."""
        parts = ["context" if i < self.sop_index else "sop" if i == self.sop_index else "generated"
                 for i in range(len(self.ids))]
        read = set(self.positions)
        return pd.DataFrame({"position": range(len(self.ids)), "token_id": self.ids, "token": self.tokens,
                             "position_id": self.position_ids, "part": parts,
                             "read": [i in read for i in range(len(self.ids))]})

    def norms(self) -> pd.DataFrame:
        """The L2 norm of every vector read: [site, layer, position, input_token, norm]."""
        frames = []
        for site, tensor in self.values.items():
            if site == "attention_probs":
                continue
            norms = tensor.norm(dim=-1)  # (layers, positions)
            layers = self.layers[site]
            frames.append(pd.DataFrame({
                "site": site, "layer": [l for l in layers for _ in self.positions],
                "position": list(self.positions) * len(layers),
                "input_token": [self.tokens[p] for p in self.positions] * len(layers),
                "norm": norms.reshape(-1).tolist()}))
        columns = ["site", "layer", "position", "input_token", "norm"]
        return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=columns)
