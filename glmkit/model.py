"""A plain PyTorch GLM-130B: post-LN DeepNorm blocks, GeGLU MLP, rotary attention, tied output embedding.

Module and parameter names follow SwissArmyTransformer's checkpoints (`transformer.layers.3.attention.dense.weight`),
so loading a SAT state dict is a direct `load_state_dict`. Nothing here knows about torch.distributed: a
tensor-parallel rank is this same model with sliced weights (see `tensor_parallel.shard_model`), and every
layer reads its local head count from its weights instead of from global state.
"""
from __future__ import annotations

import math
import torch
import torch.nn.functional as F
from torch import nn

from .kernels import attention as attention_kernels
from .config import GLMConfig
from .kernels.norm import add_layernorm

# SAT fills masked attention scores with this constant rather than -inf; keeping it makes fully
# masked rows (left padding) behave exactly like the original instead of producing NaNs.
MASKED_SCORE = -10000.0


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
    """Preallocated keys and values for every layer: (layers, b, local_heads, max_length, hd) each."""

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

    def reorder(self, batch_indices: torch.Tensor) -> None:
        """Keep (and repeat) batch rows in the order given, e.g. the surviving beams."""
        self.keys = self.keys.index_select(1, batch_indices)
        self.values = self.values.index_select(1, batch_indices)


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

    def forward(self, x, cos, sin, allowed, cache: KVCache | None, start: int):
        b, s, _ = x.shape
        hd = self.config.head_dim
        # SAT lays the fused projection out per head as [q, k, v], each head_dim wide.
        qkv = self.query_key_value(x).view(b, s, self.local_heads, 3, hd)  # (b, s, nh, 3, hd)
        if (s == 1 and cache is not None and isinstance(start, torch.Tensor) and not qkv.requires_grad
                and attention_kernels.kernel_usable(x)):
            # The fixed-shape decode step on a GPU: one fused kernel instead of ~16 launches (no backward).
            context = attention_kernels.decode_attention(
                qkv, cos, sin, cache.keys[self.layer_id], cache.values[self.layer_id], start, allowed,
                float(self.layer_id + 1))
            return self.dense(context)
        # q and k rotate together (half the kernel launches of rotating each: decode is launch-bound).
        q, k = apply_rotary(qkv[:, :, :, :2], cos[:, :, :, None], sin[:, :, :, None]).unbind(dim=3)
        v = qkv[:, :, :, 2]  # (b, s, nh, hd) each
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # (b, nh, s, hd)
        if cache is not None and isinstance(start, torch.Tensor):
            # Static shapes (CUDA graphs): write at the positions held in `start`, attend over the
            # whole cache; `allowed` hides the slots not filled yet.
            cache.keys[self.layer_id].index_copy_(2, start, k)
            cache.values[self.layer_id].index_copy_(2, start, v)
            k, v = cache.keys[self.layer_id], cache.values[self.layer_id]  # (b, nh, T, hd)
        elif cache is not None:
            cache.keys[self.layer_id, :, :, start:start + s] = k
            cache.values[self.layer_id, :, :, start:start + s] = v
            k = cache.keys[self.layer_id, :, :, :start + s]  # (b, nh, t, hd)
            v = cache.values[self.layer_id, :, :, :start + s]
        # GLM-130B divides q by an extra (layer_id + 1) before the half-precision matmul and multiplies
        # the scores back in fp32: this keeps fp16 scores of deep layers from overflowing.
        coeff = float(self.layer_id + 1)
        scores = torch.matmul(q / (math.sqrt(hd) * coeff), k.transpose(-1, -2))  # (b, nh, s, t)
        scores = scores.masked_fill(~allowed, MASKED_SCORE)
        probs = torch.softmax(scores.float() * coeff, dim=-1).to(v.dtype)
        context = torch.matmul(probs, v)  # (b, nh, s, hd)
        context = context.transpose(1, 2).reshape(b, s, self.local_heads * hd)  # (b, s, h/tp)
        return self.dense(context)


class MLP(nn.Module):
    def __init__(self, config: GLMConfig):
        super().__init__()
        self.dense_h_to_4h = nn.Linear(config.hidden_size, 2 * config.inner_hidden_size)
        self.dense_4h_to_h = nn.Linear(config.inner_hidden_size, config.hidden_size)

    def forward(self, x):
        value, gate = self.dense_h_to_4h(x).chunk(2, dim=-1)  # (b, s, inner/tp) each
        return self.dense_4h_to_h(value * F.gelu(gate))


class Block(nn.Module):
    def __init__(self, config: GLMConfig, layer_id: int):
        super().__init__()
        self.alpha = config.deepnorm_alpha
        self.input_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layernorm_epsilon)
        self.attention = Attention(config, layer_id)
        self.post_attention_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layernorm_epsilon)
        self.mlp = MLP(config)

    def forward(self, residual, branch, cos, sin, allowed, cache, start):
        """This block's output as a pair (y, m) standing for y * alpha + m, with its input given the same way.

        Post-LN with DeepNorm: the residual is the *normalised* input scaled by alpha. The sum is left to
        the next LayerNorm, which adds and normalises in one kernel on a GPU (glmkit.kernels.norm); the
        first block gets (None, embeddings).
        """
        x = add_layernorm(self.input_layernorm, residual, branch, self.alpha)
        y = add_layernorm(self.post_attention_layernorm, x, self.attention(x, cos, sin, allowed, cache, start),
                          self.alpha)
        return y, self.mlp(y)


class Transformer(nn.Module):
    """Holds the parameters under SAT's `transformer.` prefix."""

    def __init__(self, config: GLMConfig):
        super().__init__()
        self.word_embeddings = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(Block(config, i) for i in range(config.num_layers))
        self.final_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layernorm_epsilon)


class GLM(nn.Module):
    """GLM-130B-architecture language model; `forward` returns next-token logits."""

    def __init__(self, config: GLMConfig):
        super().__init__()
        self.config = config
        self.transformer = Transformer(config)

    def forward(self, input_ids, position_ids, allowed, cache: KVCache | None = None,
                start: int | torch.Tensor = 0, last_only: bool = False) -> torch.Tensor:
        """Logits (b, s, vocab), or (b, 1, vocab) with `last_only`, for one prefill or decode step.

        `allowed` is (b, 1, s, start + s) bool; with a cache, keys/values are written at
        positions [start, start + s) and attention covers [0, start + s). When `start` is a tensor
        of the s cache positions to write, shapes stay fixed for CUDA graphs: attention covers the
        whole cache and `allowed` is (b, 1, s, cache length).
        """
        b, s = input_ids.shape
        if isinstance(start, torch.Tensor):
            if cache is None or start.shape != (s,):
                raise ValueError("a tensor `start` needs a KV cache and one cache position per input token")
            expected = (b, 1, s, cache.max_length)
        else:
            if cache is None and start:
                raise ValueError("start > 0 needs a KV cache holding the earlier positions")
            if cache is not None and start + s > cache.max_length:
                raise ValueError(f"KV cache holds {cache.max_length} positions; step needs {start + s}")
            expected = (b, 1, s, start + s)
        if allowed.shape != expected:
            raise ValueError(f"attention mask has shape {tuple(allowed.shape)}; expected {expected}")
        residual, branch = None, self.transformer.word_embeddings(input_ids)  # (b, s, h)
        cos, sin = rotary_tables(position_ids, self.config.head_dim, self.config.rotary_base, branch.dtype,
                                 self.config.rotary_precision)
        for layer in self.transformer.layers:
            residual, branch = layer(residual, branch, cos, sin, allowed, cache, start)
        if last_only:
            residual, branch = residual[:, -1:], branch[:, -1:]
        alpha = self.config.deepnorm_alpha
        hidden = add_layernorm(self.transformer.final_layernorm, residual, branch, alpha)
        # Tied output projection; on a tensor-parallel rank this is the local vocab slice, which
        # the tensor-parallel transform gathers with a forward hook.
        return F.linear(hidden, self.transformer.word_embeddings.weight)  # (b, s, vocab/tp)
