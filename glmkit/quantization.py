"""Weight-only INT8/INT4 quantization in GLM-130B's checkpoint format, as one module swap.

Format (the original tool's `--quantization-bit-width 4|8`, see GLM-NOTES "Checkpoints"): only the weights of
query_key_value, dense, dense_h_to_4h and dense_4h_to_h are quantized, symmetric and vector-wise:

    scale[row] = absmax(row) / (2**(bits-1) - 1)   fp16, stored as `<weight name>_scale`, e.g.
                                                   transformer.layers.0.attention.dense.weight_scale
    q = round(w / scale)                           int8, computed in fp16 arithmetic as the original does
    INT4: byte i = (q[2i] << 4) | (q[2i+1] & 0xF)  two signed nibbles per int8, even column in the HIGH
                                                   nibble; shape (out, in/2)

Embeddings, biases and LayerNorms are left as they are (fp16 in the official checkpoint).

Scales of row-parallel weights (dense, dense_4h_to_h): the original tool quantizes each tensor-parallel shard
on its own, so at TP > 1 every rank's scale covers only its slice of the row. glmkit quantizes whole rows,
so scales are the same on every rank (replicated), and any shard count is a lossless split of one quantized
model. At TP = 1, and for column-parallel weights at any TP, the bytes equal the original tool's. Reading the
original's per-shard files works (see glmkit.checkpoint for merging them into fewer shards).

Interface (the gpt-fast pattern):
    quantize_state_dict(sd, bits)      what an offline tool writes: int8 weights plus `_scale` tensors
    convert_for_runtime(model, bits)   swap the four linear kinds for empty QuantizedLinear (meta device too),
                                       so a quantized state dict loads with `load_state_dict(assign=True)`
    quantize_model(model, bits)        the same swap on a model with real weights, quantizing them
"""
from __future__ import annotations

import re

import torch
import torch.nn.functional as F
from torch import nn

BITS = (4, 8)
SCALE_SUFFIX = "_scale"
# The parameter names of the quantized weights, and the module paths of the layers that hold them.
_WEIGHT_RE = re.compile(r"transformer\.layers\.\d+\.(?:attention\.(?:query_key_value|dense)"
                        r"|mlp\.(?:dense_h_to_4h|dense_4h_to_h))\.weight")
_MODULE_RE = re.compile(r"transformer\.layers\.\d+\.(?:attention\.(?:query_key_value|dense)"
                        r"|mlp\.(?:dense_h_to_4h|dense_4h_to_h))")
# Quantization works on row blocks of about this many elements, so its temporaries stay small next to a
# weight (the 130B dense_h_to_4h is 805M elements) and host RAM never holds a full fp16 copy. On a GPU the
# blocks are larger (fewer host-to-device copies); a few of them are alive at once.
CHUNK_ELEMENTS = 1 << 22
CUDA_CHUNK_ELEMENTS = 1 << 25
# On CUDA, inputs with at most this many rows use the Triton kernel (its row tiles share each weight tile
# through L2); more rows (long prefills), where tensor-core throughput matters more than weight bytes,
# dequantize the weight block by block with a Triton kernel and call F.linear (cuBLAS).
KERNEL_MAX_ROWS = 256


def check_bits(bits) -> int:
    """Return `bits` if it is 4 or 8, else raise ValueError."""
    if bits not in BITS or isinstance(bits, bool):
        raise ValueError(f"quantization bits must be 4 or 8, got {bits!r}")
    return bits


def is_quantized_weight(name: str) -> bool:
    """True for the parameter names GLM-130B's format quantizes (the four linear weights of each layer)."""
    return _WEIGHT_RE.fullmatch(name) is not None


def qmax(bits: int) -> int:
    """Largest quantized magnitude: 127 for INT8, 7 for INT4 (symmetric, so -128 and -8 are never used)."""
    return 2 ** (check_bits(bits) - 1) - 1


def packed_columns(in_features: int, bits: int) -> int:
    """Columns of the stored int8 weight for `in_features` inputs: in (INT8) or in/2 (INT4)."""
    if check_bits(bits) == 4 and in_features % 2:
        raise ValueError(f"INT4 packs two input features per byte; {in_features} input features is odd")
    return in_features * bits // 8


# ---- bit-level format ----

def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """(out, in) int8 values in [-8, 7] -> (out, in/2) int8 bytes, even column in the high nibble."""
    if q.dim() != 2 or q.dtype != torch.int8:
        raise ValueError(f"pack_int4 takes a 2-D int8 tensor, got {q.dtype} {tuple(q.shape)}")
    packed_columns(q.shape[1], 4)
    if q.numel() and (q.min() < -8 or q.max() > 7):
        raise ValueError(f"INT4 values must lie in [-8, 7], got [{int(q.min())}, {int(q.max())}]")
    wide = q.to(torch.int16)
    byte = ((wide[:, 0::2] << 4) | (wide[:, 1::2] & 0xF)) & 0xFF  # (out, in/2) in 0..255
    return byte.to(torch.uint8).view(torch.int8)


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """(out, in/2) int8 bytes -> (out, in) int8 values in [-8, 7] (inverse of pack_int4)."""
    if packed.dim() != 2 or packed.dtype != torch.int8:
        raise ValueError(f"unpack_int4 takes a 2-D int8 tensor, got {packed.dtype} {tuple(packed.shape)}")
    wide = packed.to(torch.int16)
    high = wide >> 4  # arithmetic shift of the sign-extended byte: the signed high nibble
    low = ((wide & 0xF) ^ 8) - 8  # sign-extend the low nibble
    return torch.stack((high, low), dim=-1).reshape(packed.shape[0], -1).to(torch.int8)  # (out, in)


def _row_chunks(rows: int, columns: int, device: torch.device):
    step = max(1, (CHUNK_ELEMENTS if device.type == "cpu" else CUDA_CHUNK_ELEMENTS) // max(columns, 1))
    for start in range(0, rows, step):
        yield start, min(rows, start + step)


def row_absmax(w: torch.Tensor, device: torch.device | str | None = None) -> torch.Tensor:
    """fp16 absmax of each row of `w` (out, in), computed on `device` (default: w's) in row blocks."""
    if w.dim() != 2:
        raise ValueError(f"expected a 2-D weight, got shape {tuple(w.shape)}")
    device = w.device if device is None else torch.device(device)
    out = torch.empty(w.shape[0], dtype=torch.float16, device=device)
    for lo, hi in _row_chunks(*w.shape, device):
        # The original quantizes fp16 weights, so the maximum is taken over the fp16-rounded values.
        out[lo:hi] = w[lo:hi].to(device=device, dtype=torch.float16).abs().amax(dim=1)
    # amax propagates inf and NaN, so checking the row maxima covers every element.
    if not torch.isfinite(out).all():
        raise ValueError("weight has values that are not finite in fp16; it cannot be quantized")
    return out


def scale_from_absmax(absmax: torch.Tensor, bits: int) -> torch.Tensor:
    """fp16 scales absmax / (2**(bits-1) - 1), rounded once from the exact quotient as fp16 division is."""
    return (absmax.float() / qmax(bits)).to(torch.float16)


def quantize_weight(w: torch.Tensor, bits: int, scale: torch.Tensor | None = None,
                    device: torch.device | str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(out, in) float weight -> (q, scale): q int8 (out, in) or INT4-packed (out, in/2), scale fp16 (out,).

    `scale` may be given (e.g. computed over whole rows of which `w` is a slice). Work happens on `device`
    (default: w's) in row blocks, so `w` may be a memory-mapped CPU view and the result land on a GPU.
    """
    check_bits(bits)
    if w.dim() != 2 or not w.is_floating_point():
        raise ValueError(f"quantize_weight takes a 2-D floating-point weight, got {w.dtype} {tuple(w.shape)}")
    out_features, in_features = w.shape
    columns = packed_columns(in_features, bits)
    device = w.device if device is None else torch.device(device)
    scale = scale_from_absmax(row_absmax(w, device), bits) if scale is None else scale.to(device, torch.float16)
    if scale.shape != (out_features,):
        raise ValueError(f"scale has shape {tuple(scale.shape)}, expected ({out_features},)")
    q = torch.empty(out_features, columns, dtype=torch.int8, device=device)
    limit = qmax(bits)
    for lo, hi in _row_chunks(out_features, in_features, device):
        s = scale[lo:hi].float()
        # The original divides fp16 by fp16 and rounds half to even. The fp32 quotient rounded to fp16 is
        # that same fp16 quotient (24 >= 2*11 + 2 bits, so double rounding is harmless), and fp32 ops are
        # much faster on CPUs. All-zero rows (scale 0) give 0. In place: one fp32 block at a time.
        block = w[lo:hi].to(device=device, dtype=torch.float16).float()  # (rows, in)
        block.div_(torch.where(s == 0, 1.0, s)[:, None])
        block.copy_(block.to(torch.float16)).round_().clamp_(-limit, limit)
        ints = block.to(torch.int8)
        q[lo:hi] = pack_int4(ints) if bits == 4 else ints
    return q, scale


def dequantize_weight(q: torch.Tensor, scale: torch.Tensor, bits: int,
                      dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The float weight (out, in) that quantized `q` with `scale` stands for, in `dtype`."""
    check_bits(bits)
    ints = unpack_int4(q) if bits == 4 else q
    return ints.to(dtype) * scale.to(dtype)[:, None]


def quantized_matmul(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, bits: int,
                     bias: torch.Tensor | None = None) -> torch.Tensor:
    """x (..., in) @ dequant(weight)^T (+ bias): the Triton kernel on CUDA for small batches, else F.linear."""
    dequantize = dequantize_weight
    if x.is_cuda:
        from .kernels import quant as quant_kernels  # imports Triton; CPU-only use never needs it

        rows = x.numel() // x.shape[-1] if x.shape[-1] else 0
        if quant_kernels.available() and 0 < rows <= KERNEL_MAX_ROWS:
            return quant_kernels.int_linear(x, weight, scale, bias, bits)
        if quant_kernels.available():
            dequantize = quant_kernels.dequantize  # one kernel per block instead of the unpacking ops
    in_features = weight.shape[1] * 8 // bits
    blocks = list(_row_chunks(weight.shape[0], in_features, x.device))
    if len(blocks) == 1:
        return F.linear(x, dequantize(weight, scale, bits, x.dtype), bias)
    # Dequantizing a whole 130B weight would need GBs of temporaries next to a full GPU: go by row blocks.
    out = torch.empty(*x.shape[:-1], weight.shape[0], dtype=x.dtype, device=x.device)  # (..., out)
    for lo, hi in blocks:
        w = dequantize(weight[lo:hi], scale[lo:hi], bits, x.dtype)  # (hi - lo, in)
        out[..., lo:hi] = F.linear(x, w, None if bias is None else bias[lo:hi])
    return out


class QuantizedLinear(nn.Module):
    """A linear layer with an int8 (or INT4-packed) weight and fp16 per-row scales, named like the checkpoint.

    Parameters `weight` (out, in*bits/8) int8, `weight_scale` (out,) and `bias` (out,) carry the checkpoint's
    names. Sizes are read from the weight, so a tensor-parallel shard is this same module with sliced tensors.
    """

    def __init__(self, in_features: int, out_features: int, bits: int, bias: bool = True,
                 device=None, dtype: torch.dtype | None = None):
        super().__init__()
        self.bits = check_bits(bits)
        columns = packed_columns(in_features, bits)
        self.weight = nn.Parameter(torch.empty(out_features, columns, dtype=torch.int8, device=device),
                                   requires_grad=False)
        self.weight_scale = nn.Parameter(torch.empty(out_features, dtype=torch.float16, device=device),
                                         requires_grad=False)
        bias_tensor = torch.empty(out_features, dtype=dtype, device=device) if bias else None
        self.bias = None if bias_tensor is None else nn.Parameter(bias_tensor, requires_grad=False)

    @classmethod
    def from_linear(cls, linear: nn.Linear, bits: int) -> "QuantizedLinear":
        """Quantize an nn.Linear holding real weights."""
        out_features, in_features = linear.weight.shape
        module = cls(in_features, out_features, bits, bias=linear.bias is not None, device="meta")
        q, scale = quantize_weight(linear.weight.detach(), bits)
        module.weight = nn.Parameter(q, requires_grad=False)
        module.weight_scale = nn.Parameter(scale, requires_grad=False)
        if linear.bias is not None:
            module.bias = nn.Parameter(linear.bias.detach(), requires_grad=False)
        return module

    @property
    def in_features(self) -> int:
        return self.weight.shape[1] * 8 // self.bits

    @property
    def out_features(self) -> int:
        return self.weight.shape[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return quantized_matmul(x, self.weight, self.weight_scale, self.bits, self.bias)  # (..., out)

    def matmul_no_bias(self, x: torch.Tensor) -> torch.Tensor:
        """x @ dequant(W)^T without the bias (row-parallel layers add it once, after the all-reduce)."""
        return quantized_matmul(x, self.weight, self.weight_scale, self.bits)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}, "
                f"bias={self.bias is not None}")


def _swap(model: nn.Module, bits: int, quantize: bool) -> nn.Module:
    check_bits(bits)
    targets = [(name, module) for name, module in model.named_modules() if _MODULE_RE.fullmatch(name)]
    if not targets:
        raise ValueError("model has no transformer.layers.{i}.attention/mlp linear layers to quantize")
    for name, module in targets:
        if isinstance(module, QuantizedLinear):
            if module.bits != bits:
                raise ValueError(f"{name} is already quantized to INT{module.bits}, not INT{bits}")
            continue
        if type(module) is not nn.Linear:
            raise ValueError(f"{name} is a {type(module).__name__}, expected nn.Linear; quantize the plain "
                             f"model before glmkit.parallel.transform.parallelize wraps its layers")
        if quantize:
            new = QuantizedLinear.from_linear(module, bits)
        else:
            # Sizes from the weight, not module.in_features: resize_for_rank may have sliced it.
            out_features, in_features = module.weight.shape
            new = QuantizedLinear(in_features, out_features, bits, bias=module.bias is not None,
                                  device=module.weight.device,
                                  dtype=None if module.bias is None else module.bias.dtype)
        path, _, attr = name.rpartition(".")
        setattr(model.get_submodule(path), attr, new)
    return model


def convert_for_runtime(model: nn.Module, bits: int) -> nn.Module:
    """Swap the four quantized linear kinds for empty QuantizedLinear on the same device (meta included)."""
    return _swap(model, bits, quantize=False)


def quantize_model(model: nn.Module, bits: int) -> nn.Module:
    """Quantize a model holding real weights in place (layer by layer) and return it."""
    with torch.no_grad():
        return _swap(model, bits, quantize=True)


def quantize_state_dict(state: dict[str, torch.Tensor], bits: int) -> dict[str, torch.Tensor]:
    """The quantized checkpoint of a state dict: int8/INT4 weights plus fp16 `<name>_scale`, the rest as is.

    Give the full (unsharded) state dict for glmkit's replicated row-parallel scales; a single shard gives the
    original tool's per-shard scales for that shard.
    """
    check_bits(bits)
    if any(name.endswith(SCALE_SUFFIX) for name in state):
        raise ValueError("state dict already holds `_scale` entries: it is quantized already")
    result = {}
    for name, tensor in state.items():
        if is_quantized_weight(name):
            try:
                result[name], result[name + SCALE_SUFFIX] = quantize_weight(tensor, bits)
            except ValueError as error:
                raise ValueError(f"{name}: {error}") from None
        else:
            result[name] = tensor
    return result
