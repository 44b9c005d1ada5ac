"""A plain PyTorch GLM-130B: post-LN DeepNorm blocks, GeGLU MLP, rotary attention, tied output embedding.

Module and parameter names follow SwissArmyTransformer's checkpoints (`transformer.layers.3.attention.dense.weight`),
so loading a SAT state dict is a direct `load_state_dict`. Nothing here knows about torch.distributed or GPU
kernels: a tensor-parallel rank is this same model with sliced weights (`glmkit.parallel`), every layer reads
its local head count from its weights, and the fused decode kernels replace modules of it
(`glmkit.kernels.apply_decode_kernels`), as quantization does.
"""
from __future__ import annotations

import math
import torch
import torch.nn.functional as F
from torch import nn

from .config import GLMConfig

# SAT fills masked attention scores with this constant rather than -inf; keeping it makes fully
# masked rows (left padding) behave exactly like the original instead of producing NaNs.
MASKED_SCORE = -10000.0
# Prefill attention computes scores for this many (batch x head x query x key) entries at most at once: a
# 1,920-token batch of 32 would otherwise hold (32, 96, 1920, 1920) fp32 scores, 42 GiB in one allocation.
# Queries are independent rows of the softmax, so splitting them changes no number.
SCORE_CHUNK_ELEMENTS = 1 << 27


def rotary_tables(position_ids: torch.Tensor, head_dim: int, base: float, dtype: torch.dtype,
                  precision: str = "sat"):
    """cos/sin tables for `position_ids` (b, s) -> two (b, s, 1, head_dim) tensors in `dtype`.

    `precision` "sat" gives the tables SAT's GLM130B computes when it runs in `dtype` (the official model's
    numbers); "fp32" the exact tables, computed in fp32 and rounded to `dtype` once (GLMConfig.rotary_precision).
    """
    if precision not in ("sat", "fp32"):  # GLMConfig.rotary_precision's values
        raise ValueError(f"rotary precision must be 'sat' or 'fp32', got {precision!r}")
    # The inv_freq buffer stored in checkpoints is ignored, as SAT ignores it: it is recomputed here.
    inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, device=position_ids.device,
                                            dtype=torch.float32) / head_dim))
    if precision == "sat":
        # SAT 0.4.12 computes inv_freq in fp32 but keeps it as a module buffer, so GLM-130B's
        # `GLM130B(args).half()` rounds it to fp16 (`.bfloat16()` to bf16). Everything after that is fp32:
        # fp32 positions times the rounded buffer (einsum promotes), cos/sin in fp32, then a cast to the
        # activation dtype. Only the rounded frequencies differ from the exact tables, but their error grows
        # with the position: up to 0.49 in cos near position 2041 at head dim 128 in fp16.
        inv_freq = inv_freq.to(dtype).float()
    freqs = position_ids.to(torch.float32)[..., None] * inv_freq  # (b, s, hd/2)
    angles = torch.cat((freqs, freqs), dim=-1)[:, :, None, :]  # (b, s, 1, hd)
    return angles.cos().to(dtype), angles.sin().to(dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """GLM rotates the two halves of the head dim as pairs: (x1, x2) -> (-x2, x1)."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate `x` (b, s, heads, hd) by the tables from `rotary_tables`."""
    return x * cos + rotate_half(x) * sin


class KVCache:
    """Preallocated keys and values for every layer: (layers, b, local_heads, max_length, hd) each.

    The tensors never move once allocated (CUDA graphs read them by address): writes and beam reorders
    happen in place.
    """

    def __init__(self, keys: torch.Tensor, values: torch.Tensor):
        self.keys = keys
        self.values = values

    @classmethod
    def allocate(cls, model: "GLM", batch_size: int, max_length: int) -> "KVCache":
        """Empty cache sized for `model` (its local heads, device and dtype)."""
        # The embedding holds the activation dtype; linear weights may be int8 when quantized.
        weight = model.transformer.word_embeddings.weight
        heads = model.transformer.layers[0].attention.local_heads
        shape = (len(model.transformer.layers), batch_size, heads, max_length, model.config.head_dim)
        return cls(torch.zeros(shape, dtype=weight.dtype, device=weight.device),
                   torch.zeros(shape, dtype=weight.dtype, device=weight.device))

    @property
    def max_length(self) -> int:
        return self.keys.shape[3]

    @property
    def batch_size(self) -> int:
        return self.keys.shape[1]

    def layer(self, layer_id: int, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values (b, nh, length, hd) of the first `length` slots of one layer."""
        return self.keys[layer_id, :, :, :length], self.values[layer_id, :, :, :length]

    def update(self, layer_id: int, k: torch.Tensor, v: torch.Tensor, slots: torch.Tensor,
               length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Write k, v (b, nh, s, hd) at cache `slots` (s,), then return the layer's first `length` slots."""
        self.keys[layer_id].index_copy_(2, slots, k)
        self.values[layer_id].index_copy_(2, slots, v)
        return self.layer(layer_id, length)

    def reorder(self, batch_indices: torch.Tensor) -> None:
        """Keep (and repeat) batch rows in the order given, e.g. the surviving beams, in place."""
        self.keys.copy_(self.keys.index_select(1, batch_indices))
        self.values.copy_(self.values.index_select(1, batch_indices))


def attention_probabilities(q: torch.Tensor, k: torch.Tensor, allowed: torch.Tensor, layer_id: int) -> torch.Tensor:
    """GLM-130B's attention weights (b, nh, s, t) in q's dtype for q (b, nh, s, hd), k (b, nh, t, hd)."""
    # GLM-130B divides q by an extra (layer_id + 1) before the half-precision matmul and multiplies the
    # scores back in fp32: this keeps fp16 scores of deep layers from overflowing.
    coeff = float(layer_id + 1)
    scores = torch.matmul(q / (math.sqrt(q.shape[-1]) * coeff), k.transpose(-1, -2))  # (b, nh, s, t)
    scores = scores.masked_fill(~allowed, MASKED_SCORE)
    return torch.softmax(scores.float() * coeff, dim=-1).to(q.dtype)


class Attention(nn.Module):
    def __init__(self, config: GLMConfig, layer_id: int):
        super().__init__()
        self.config = config
        self.layer_id = layer_id
        self.query_key_value = nn.Linear(config.hidden_size, 3 * config.hidden_size)
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)

    @property
    def local_heads(self) -> int:
        # A tensor-parallel rank holds a slice of the heads; its weight shape says how many.
        return self.query_key_value.weight.shape[0] // (3 * self.config.head_dim)

    def forward(self, x, cos, sin, allowed, cache: KVCache | None, slots: torch.Tensor | None):
        b, s, _ = x.shape
        # SAT lays the fused projection out per head as [q, k, v], each head_dim wide.
        qkv = self.query_key_value(x).view(b, s, self.local_heads, 3, self.config.head_dim)  # (b, s, nh, 3, hd)
        # q and k rotate together (half the kernel launches of rotating each: decode is launch-bound).
        q, k = apply_rotary(qkv[:, :, :, :2], cos[:, :, :, None], sin[:, :, :, None]).unbind(dim=3)
        v = qkv[:, :, :, 2]  # (b, s, nh, hd) each
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # (b, nh, s, hd)
        if cache is not None:
            k, v = cache.update(self.layer_id, k, v, slots, allowed.shape[-1])  # (b, nh, t, hd)
        rows = max(1, SCORE_CHUNK_ELEMENTS // (b * q.shape[1] * k.shape[2]))
        context = torch.cat([torch.matmul(attention_probabilities(q[:, :, i:i + rows], k, allowed[:, :, i:i + rows],
                                                                  self.layer_id), v)
                             for i in range(0, s, rows)], dim=2)  # (b, nh, s, hd)
        context = context.transpose(1, 2).reshape(b, s, self.local_heads * self.config.head_dim)  # (b, s, h/tp)
        return self.dense(context)


class MLP(nn.Module):
    def __init__(self, config: GLMConfig):
        super().__init__()
        self.dense_h_to_4h = nn.Linear(config.hidden_size, 2 * config.inner_hidden_size)
        self.dense_4h_to_h = nn.Linear(config.inner_hidden_size, config.hidden_size)

    def forward(self, x):
        value, gate = self.dense_h_to_4h(x).chunk(2, dim=-1)  # (b, s, inner/tp) each
        return self.dense_4h_to_h(value * F.gelu(gate))


class AddLayerNorm(nn.LayerNorm):
    """LayerNorm(residual * alpha + branch): DeepNorm's residual add and the post-LN after it, in one module.

    `residual` None means no residual (the first block's input). Parameters are those of nn.LayerNorm, so
    SAT's `*_layernorm.{weight,bias}` keys load as they are; on a GPU one kernel does both
    (glmkit.kernels.FusedAddLayerNorm).
    """

    def forward(self, residual: torch.Tensor | None, branch: torch.Tensor, alpha: float) -> torch.Tensor:
        return super().forward(branch if residual is None else residual * alpha + branch)


class Block(nn.Module):
    def __init__(self, config: GLMConfig, layer_id: int):
        super().__init__()
        self.alpha = config.deepnorm_alpha
        self.input_layernorm = AddLayerNorm(config.hidden_size, eps=config.layernorm_epsilon)
        self.attention = Attention(config, layer_id)
        self.post_attention_layernorm = AddLayerNorm(config.hidden_size, eps=config.layernorm_epsilon)
        self.mlp = MLP(config)

    def forward(self, residual, branch, cos, sin, allowed, cache, slots):
        """This block's output as a pair (y, m) standing for y * alpha + m, with its input given the same way.

        Post-LN with DeepNorm: the residual is the *normalised* input scaled by alpha. The sum is left to
        the next LayerNorm, which adds and normalises; the first block gets (None, embeddings).
        """
        x = self.input_layernorm(residual, branch, self.alpha)
        y = self.post_attention_layernorm(x, self.attention(x, cos, sin, allowed, cache, slots), self.alpha)
        return y, self.mlp(y)


class Transformer(nn.Module):
    """Holds the parameters under SAT's `transformer.` prefix."""

    def __init__(self, config: GLMConfig):
        super().__init__()
        self.word_embeddings = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(Block(config, i) for i in range(config.num_layers))
        self.final_layernorm = AddLayerNorm(config.hidden_size, eps=config.layernorm_epsilon)


class GLM(nn.Module):
    """GLM-130B-architecture language model; `forward` returns next-token logits."""

    def __init__(self, config: GLMConfig):
        super().__init__()
        self.config = config
        self.transformer = Transformer(config)

    def forward(self, input_ids, position_ids, allowed, cache: KVCache | None = None,
                slots: torch.Tensor | None = None, last_only: bool = False,
                logits_at: torch.Tensor | None = None) -> torch.Tensor:
        """Logits (b, s, vocab), or (b, 1, vocab) with `last_only`, or (b, k, vocab) at the token indices
        `logits_at` (b, k) of each row, for s tokens at `position_ids` (b, s).

        Without a cache, attention covers the s tokens and `allowed` is (b, 1, s, s) bool. With a cache, the
        tokens' keys and values are written at cache `slots` (s,) and attention covers the first t slots of
        the cache, t being `allowed`'s last dim (b, 1, s, t): a prefill writes slots 0..s-1 with t = s; a
        fixed-shape decode step writes one slot and attends over the whole cache, so shapes never change.
        """
        b, s = input_ids.shape
        if cache is None:
            if slots is not None:
                raise ValueError("cache slots given without a KV cache to write them to")
            expected = (b, 1, s, s)
        else:
            if slots is None or slots.shape != (s,):
                raise ValueError(f"a KV cache needs `slots`: one cache position per input token, shape ({s},)")
            length = allowed.shape[-1]
            if length > cache.max_length:
                raise ValueError(f"KV cache holds {cache.max_length} positions; the step attends over {length}")
            expected = (b, 1, s, length)
        if allowed.shape != expected:
            raise ValueError(f"attention mask has shape {tuple(allowed.shape)}; expected {expected}")
        residual, branch = None, self.transformer.word_embeddings(input_ids)  # (b, s, h)
        cos, sin = rotary_tables(position_ids, self.config.head_dim, self.config.rotary_base, branch.dtype,
                                 self.config.rotary_precision)
        for layer in self.transformer.layers:
            residual, branch = layer(residual, branch, cos, sin, allowed, cache, slots)
        if last_only:
            residual, branch = residual[:, -1:], branch[:, -1:]
        elif logits_at is not None:
            # Scoring reads a few positions of a long batch: projecting all of them onto the vocabulary would
            # hold (b, s, vocab) logits, gigabytes at GLM-130B's 150k ids, then all-gathered on every rank.
            index = logits_at[:, :, None].expand(-1, -1, branch.shape[-1])  # (b, k, h)
            residual, branch = residual.gather(1, index), branch.gather(1, index)
        hidden = self.transformer.final_layernorm(residual, branch, self.config.deepnorm_alpha)
        # Tied output projection; on a tensor-parallel rank this is the local vocab slice, which
        # the tensor-parallel transform gathers with a forward hook.
        return F.linear(hidden, self.transformer.word_embeddings.weight)  # (b, s, vocab/tp)
