"""The logit lens: the final LayerNorm and the tied output head applied to the residual stream after every block.

GLM's blocks are post-LN DeepNorm: block i returns a pair (y, m) meaning y * alpha + m, and the model's logits
are `final_layernorm(y, m, alpha)` of the last block's pair times the embedding. Applying the same two modules
to block i's pair gives what the model would predict if it stopped there; at the last block it is the model's
own next-token distribution. The distribution covers the tokenizer's ids (the vocabulary's padding rows are not
tokens), as generate()'s log probabilities do.

On a tensor-parallel rank the embedding holds a slice of the vocabulary. Each rank takes its top-k and its
log-sum-exp; the ranks exchange only those (and the target's logit and how many logits beat it), so the bytes
exchanged and shipped depend on k and the positions, never on the vocabulary's size.
"""
from __future__ import annotations

from dataclasses import dataclass

import pandas as pd
import torch
import torch.nn.functional as F
from torch import nn

from .capture import Probe
from .comm import ShardComm
from .sequence import ProbeSequence


class VocabSlice:
    """This rank's rows of the output head: global ids offset .. offset + size - 1; ids >= num_ids are padding."""

    def __init__(self, model: nn.Module, comm: ShardComm, num_ids: int):
        self.model, self.comm, self.num_ids = model, comm, num_ids
        self.size = model.transformer.word_embeddings.weight.shape[0]
        self.offset = comm.rank * self.size
        self.device = model.transformer.word_embeddings.weight.device

    def logits(self, pair) -> torch.Tensor:
        """fp32 logits (..., size) of a block's output pair (y, m) through the final LayerNorm and the head."""
        y, m = pair
        hidden = self.model.transformer.final_layernorm(y, m, self.model.config.deepnorm_alpha)  # (..., h)
        logits = F.linear(hidden, self.model.transformer.word_embeddings.weight).float()  # (..., vocab/tp)
        padding = torch.arange(self.offset, self.offset + self.size, device=self.device) >= self.num_ids
        return logits.masked_fill(padding, -torch.inf)

    def log_normaliser(self, logits: torch.Tensor) -> torch.Tensor:
        """log sum exp over the whole vocabulary (P,) of this rank's logits (P, size): from every rank's own."""
        local = torch.logsumexp(logits, dim=-1)  # (P,)
        top = self.comm.max(local)
        return top + torch.log(self.comm.sum(torch.exp(local - top)))

    def target_logit(self, logits: torch.Tensor, target: int) -> torch.Tensor:
        """The logit (P,) of token `target`, from the rank that holds it."""
        local = target - self.offset
        mine = logits[:, local] if 0 <= local < self.size else logits.new_zeros(logits.shape[0])
        return self.comm.sum(mine)

    def target_logprob(self, pair, target: int) -> torch.Tensor:
        """log p(target) (P,) of pairs (P, h) through the final LayerNorm and the head."""
        logits = self.logits(pair)
        return self.target_logit(logits, target) - self.log_normaliser(logits)

    def top(self, logits: torch.Tensor, k: int, target: int | None) -> dict[str, torch.Tensor]:
        """Top-k ids and probabilities (P, k) over the whole vocabulary, and the target's probability and rank (P,)."""
        normaliser = self.log_normaliser(logits)  # (P,)
        values, ids = logits.topk(min(k, self.size), dim=-1)  # (P, kk) this rank's best
        packed = [values.double(), (ids + self.offset).double()]  # fp64 holds fp32 values and ids exactly
        out = {}
        if target is not None:
            target_logit = self.target_logit(logits, target)
            beaten_by = (logits > target_logit[:, None]).sum(dim=-1)  # (P,) here; summed over ranks below
            out["target_prob"] = torch.exp(target_logit - normaliser)
            out["target_rank"] = self.comm.sum(beaten_by) + 1
        every = self.comm.gather(torch.cat(packed, dim=-1)[None], dim=0)  # (tp, P, 2kk)
        kk = values.shape[-1]
        candidates = every[..., :kk].permute(1, 0, 2).reshape(logits.shape[0], -1)  # (P, tp*kk)
        candidate_ids = every[..., kk:].permute(1, 0, 2).reshape(logits.shape[0], -1)
        best, where = candidates.topk(k, dim=-1)  # (P, k)
        out["ids"] = candidate_ids.gather(-1, where).long()
        out["probs"] = torch.exp(best.float() - normaliser[:, None])
        return out


def run_lens(shard, sequence: ProbeSequence, layers: tuple[int, ...], positions: tuple[int, ...], top_k: int,
             target: int | None, comm: ShardComm) -> dict[str, torch.Tensor]:
    """{"ids", "probs": (layers, positions, k); "target_prob", "target_rank": (layers, positions)} on CPU."""
    model = shard.generator.model
    vocab = VocabSlice(model, comm, shard.tokenizer.num_tokens)
    rows = torch.tensor(positions, dtype=torch.long, device=vocab.device)
    probe = Probe(model)
    for layer in layers:
        probe.read("residual", layer, rows)  # every rank: each applies its own slice of the head
    values = probe.run(sequence.inputs(vocab.device), stop_after=max(layers))
    per_layer = []
    with torch.inference_mode():
        for layer in layers:  # one layer's logits (P, vocab/tp) at a time
            per_layer.append(vocab.top(vocab.logits(values["residual", layer])[0], top_k, target))
    return {key: torch.stack([r[key] for r in per_layer]).cpu() for key in per_layer[0]}


@dataclass
class LogitLens:
    """The logit lens along a sequence: top-k tokens per block and position, and a target token's standing.

    `top` is long form [layer, position, input_token, rank, token_id, token, prob] (rank 1..k; layer i is the
    residual stream after block i, so the last layer is the model's own prediction); `target` (None without a
    target) is [layer, position, token_id, token, prob, rank]. The prediction at a position is for the token
    after it. `tokens` labels every position of the sequence.
    """

    prompt: str
    ids: list[int]
    tokens: list[str]
    sop_index: int
    layers: tuple[int, ...]
    positions: tuple[int, ...]
    top: pd.DataFrame
    target: pd.DataFrame | None
    target_id: int | None = None
    collective_bytes: int = 0  # what each rank's probe collectives sent (not the model's own; 0 in one process)

    @property
    def generated(self) -> list[int]:
        """The tokens generated after sop (empty for a lens on the prompt alone)."""
        return self.ids[self.sop_index + 1:]

    def grid(self, value: str = "token") -> pd.DataFrame:
        """The likeliest token's `value` ("token", "token_id" or "prob") as a layer x position table."""
        if value not in ("token", "token_id", "prob"):
            raise ValueError(f"value must be 'token', 'token_id' or 'prob', got {value!r}")
        best = self.top[self.top["rank"] == 1]
        return best.pivot(index="layer", columns="position", values=value)


def lens_frames(tokenizer, tokens: list[str], layers: tuple[int, ...], positions: tuple[int, ...],
                result: dict[str, torch.Tensor], target: int | None) -> tuple[pd.DataFrame, pd.DataFrame | None]:
    """The long-form `top` and `target` tables of a lens result."""
    ids, probs = result["ids"], result["probs"]  # (L, P, k)
    n_layers, n_positions, k = ids.shape
    texts = {i: tokenizer.token_text(i) for i in set(ids.reshape(-1).tolist())}
    layer_col = torch.tensor(layers).repeat_interleave(n_positions * k)
    position_col = torch.tensor(positions).repeat_interleave(k).repeat(n_layers)
    flat_ids = ids.reshape(-1).tolist()
    top = pd.DataFrame({"layer": layer_col.numpy(), "position": position_col.numpy(),
                        "input_token": [tokens[p] for p in position_col.tolist()],
                        "rank": torch.arange(1, k + 1).repeat(n_layers * n_positions).numpy(),
                        "token_id": flat_ids, "token": [texts[i] for i in flat_ids],
                        "prob": probs.reshape(-1).double().numpy()})
    if target is None:
        return top, None
    frame = pd.DataFrame({"layer": torch.tensor(layers).repeat_interleave(n_positions).numpy(),
                          "position": torch.tensor(positions).repeat(n_layers).numpy(),
                          "token_id": target, "token": tokenizer.token_text(target),
                          "prob": result["target_prob"].reshape(-1).double().numpy(),
                          "rank": result["target_rank"].reshape(-1).numpy()})
    return top, frame
