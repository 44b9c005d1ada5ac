"""One SAT shard file (`mp_rank_XX_model_states.pt`): what it must hold, and reading it without running code.

What it must hold: exactly the names of `expected_shapes`, with those shapes, fp16/bf16/fp32 weights, int8
only for the quantized weights of a quantized shard (`stored_quantization` tells which it is).

Reading: torch.load(weights_only=True) is what refuses code; this module turns its refusals and failures
into messages that say what is wrong with the file. Torch's own messages advise retrying with
`weights_only=False`, which would run whatever the pickle holds, so they are never passed on.
"""
from __future__ import annotations

import argparse
import io
import pickle
import pickletools
import re
import zipfile
from pathlib import Path

import torch

from .config import GLMConfig
from .quantization import SCALE_SUFFIX, check_bits, is_quantized_weight, packed_columns
from .parallel.layout import shard_shape

# Floating-point weights glmkit reads and writes; int8 only for quantized weights (with a `_scale` entry).
FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
# Rotary inv_freq buffers saved by SAT (two spellings across versions); the model recomputes them.
_IGNORED_KEYS = re.compile(r"mixins\.rotary-embedding\.rotary_emb\.inv_freq"
                           r"|transformer\.layers\.\d+\.attention\.rotary_emb\.inv_freq")

# The only non-tensor globals official files need: DeepSpeed/SAT store the run's argparse args next to `module`.
_SAFE_GLOBALS = [argparse.Namespace]
# Globals a tensor file references by itself: torch's rebuild functions, storages and dtypes, OrderedDict.
_TENSOR_GLOBALS = ("collections.OrderedDict", "argparse.Namespace")

# Lines of torch's weights-only error text that are advice, not cause (one of them says weights_only=False).
_TORCH_ADVICE = re.compile(r"weights_only|Weights only load failed|Check the documentation|Please file an issue"
                           r"|trust the source|add_safe_globals|safe_globals|^\s*\(\d\)|^\s*$", re.IGNORECASE)

_ZIP_MAGIC = b"PK\x03\x04"
_LEGACY_SCAN_BYTES = 16 << 20  # a legacy file's pickles come first; its raw storages follow


def is_ignored_key(name: str) -> bool:
    """True for checkpoint entries that are accepted but dropped (rotary inv_freq buffers)."""
    return _IGNORED_KEYS.fullmatch(name) is not None


def _globals_of_one_pickle(stream: io.BytesIO, found: list[str]) -> None:
    # Walks the opcodes (pickletools never executes them) and records each global a GLOBAL, INST or
    # STACK_GLOBAL would import. STACK_GLOBAL takes module and name from the stack, often via the memo,
    # so the strings pushed and memoised are followed; anything else only clears the "last value".
    strings: list[str] = []
    memo: dict[int, str | None] = {}
    last: str | None = None
    for opcode, arg, _ in pickletools.genops(stream):
        name = opcode.name
        if name in ("GLOBAL", "INST"):
            found.append(str(arg).replace(" ", "."))
        elif name == "STACK_GLOBAL" and len(strings) >= 2:
            found.append(f"{strings[-2]}.{strings[-1]}")
        if name == "MEMOIZE":
            memo[len(memo)] = last
            continue
        if name in ("PUT", "BINPUT", "LONG_BINPUT"):
            memo[arg] = last
            continue
        if name in ("GET", "BINGET", "LONG_BINGET"):
            arg = memo.get(arg)
        last = arg if isinstance(arg, str) and ("UNICODE" in name or "STRING" in name or "GET" in name) else None
        if last is not None:
            strings.append(last)
        if name == "STOP":
            return


def _member_bytes(path: Path, info: zipfile.ZipInfo) -> bytes:
    # torch does not check a member's CRC before unpickling it, so neither may this: read the stored bytes
    # straight from the local header (torch.save stores members uncompressed).
    if info.compress_type != zipfile.ZIP_STORED:
        return b""
    with open(path, "rb") as f:
        f.seek(info.header_offset)
        header = f.read(30)  # the fixed part of a zip local file header
        if len(header) < 30 or header[:4] != _ZIP_MAGIC:
            return b""
        name_length, extra_length = int.from_bytes(header[26:28], "little"), int.from_bytes(header[28:30], "little")
        f.seek(info.header_offset + 30 + name_length + extra_length)
        return f.read(info.compress_size)


def pickle_globals(path: Path) -> list[str]:
    """Globals (module.name) that the pickles in shard file `path` reference, read without unpickling."""
    streams = []
    with open(path, "rb") as f:
        head = f.read(_LEGACY_SCAN_BYTES)
    if head.startswith(_ZIP_MAGIC) and zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as archive:
            streams = [_member_bytes(path, info) for info in archive.infolist()
                       if info.filename.rsplit("/", 1)[-1] == "data.pkl"]
    else:
        streams = [head]
    found: list[str] = []
    for data in streams:
        stream = io.BytesIO(data)
        for _ in range(4):  # a legacy file holds a magic number, protocol, system info, then the object
            try:
                _globals_of_one_pickle(stream, found)
            except Exception:  # noqa: BLE001 - not (or no more) pickle data: keep what was found
                break
    return list(dict.fromkeys(found))


def _foreign(names: list[str]) -> list[str]:
    return [n for n in names if not (n.startswith("torch.") or n in _TENSOR_GLOBALS)]


def _refusal(path: Path, names: list[str]) -> ValueError:
    return ValueError(
        f"refused to unpickle {path}: it contains code objects/globals that are not tensors ({', '.join(names)}); "
        f"glmkit never loads arbitrary pickles. A checkpoint shard holds only tensors (and DeepSpeed's "
        f"argparse.Namespace). If you trust the file, convert it where it was made: save just its tensors, "
        f"torch.save({{'module': model.state_dict()}}, path)")


def _cause(error: BaseException) -> str:
    """Torch's reason for failing, without its advice (which includes retrying with weights_only=False)."""
    text = str(error).split("WeightsUnpickler error:")[-1]
    lines = [line.strip() for line in text.splitlines() if not _TORCH_ADVICE.search(line)]
    return lines[0] if lines else type(error).__name__


def _blocked_global(error: BaseException) -> str | None:
    # torch names the global it refused in one of two phrasings, depending on the module.
    found = re.search(r"Unsupported global: GLOBAL (\S+)|unsupported GLOBAL (\S+)"
                      r"|reduce for unrecognized function (\S+)", str(error))
    return next((g for g in found.groups() if g), None) if found else None


def read_shard(path: str | Path) -> dict[str, torch.Tensor]:
    """Read one shard file's `module` state dict (memory-mapped when possible) without unpickling code."""
    path = Path(path)
    with open(path, "rb") as f:
        magic = f.read(4)
    # New-style torch.save files are zip archives and can be memory-mapped; legacy files cannot.
    is_zip = magic == _ZIP_MAGIC
    if is_zip and not zipfile.is_zipfile(path):
        raise ValueError(f"{path} is truncated or corrupt (its zip archive has no end record); copy it again")
    try:
        with torch.serialization.safe_globals(_SAFE_GLOBALS):
            data = torch.load(path, map_location="cpu", weights_only=True, mmap=is_zip)
    except (pickle.UnpicklingError, RuntimeError, EOFError, OSError, ValueError) as error:
        # Code in the pickle is the one thing to name first: a damaged file holds no imports.
        # (torch's name for a refused global is the fallback: it spells builtins differently.)
        foreign = _foreign(pickle_globals(path)) or [g for g in [_blocked_global(error)] if g]
        if foreign:
            raise _refusal(path, foreign) from None
        raise ValueError(f"{path} is truncated or corrupt: {_cause(error)}") from None
    if not isinstance(data, dict) or "module" not in data:
        found = sorted(map(str, data)) if isinstance(data, dict) else type(data).__name__
        raise ValueError(f"{path} has no `module` entry (found {found}); expected a SAT model_states file")
    module = data["module"]
    if not isinstance(module, dict):
        raise ValueError(f"{path}: `module` is a {type(module).__name__}, expected a state dict")
    state = {}
    for name, value in module.items():
        if is_ignored_key(name):
            continue
        if not isinstance(value, torch.Tensor):
            raise ValueError(f"{path}: entry {name!r} is a {type(value).__name__}, expected a tensor")
        state[name] = value
    return state


def expected_shapes(config: GLMConfig, world_size: int = 1,
                    bits: int | None = None) -> dict[str, tuple[int, ...]]:
    """Per-rank shape of every tensor of a `world_size`-way model (world_size=1: the full shapes).

    With `bits` (8 or 4) the four linear weights of each layer are quantized: int8 (out, in*bits/8), each
    followed by its `<name>_scale` (out,).
    """
    config.check_shardable(world_size)
    if bits is not None:
        check_bits(bits)
    h, f, v = config.hidden_size, config.inner_hidden_size, config.vocab_size
    full = {"transformer.word_embeddings.weight": (v, h)}
    for i in range(config.num_layers):
        p = f"transformer.layers.{i}."
        full.update({
            p + "input_layernorm.weight": (h,), p + "input_layernorm.bias": (h,),
            p + "attention.query_key_value.weight": (3 * h, h), p + "attention.query_key_value.bias": (3 * h,),
            p + "attention.dense.weight": (h, h), p + "attention.dense.bias": (h,),
            p + "post_attention_layernorm.weight": (h,), p + "post_attention_layernorm.bias": (h,),
            p + "mlp.dense_h_to_4h.weight": (2 * f, h), p + "mlp.dense_h_to_4h.bias": (2 * f,),
            p + "mlp.dense_4h_to_h.weight": (h, f), p + "mlp.dense_4h_to_h.bias": (h,),
        })
    full.update({"transformer.final_layernorm.weight": (h,), "transformer.final_layernorm.bias": (h,)})
    if bits is not None:
        quantized = {}
        for name, shape in full.items():
            if is_quantized_weight(name):
                quantized[name] = (shape[0], packed_columns(shape[1], bits))
                quantized[name + SCALE_SUFFIX] = (shape[0],)
            else:
                quantized[name] = shape
        full = quantized
    result = {}
    for name, shape in full.items():
        try:
            result[name] = shard_shape(name, shape, world_size)
        except ValueError:
            if bits == 4 and is_quantized_weight(name):
                raise ValueError(f"{name}: INT4 packs two input features per byte, so its {2 * shape[1]} input "
                                 f"features are {shape[1]} bytes, which cannot be split {world_size} ways on "
                                 f"byte boundaries; choose a shard count that divides {shape[1]}") from None
            raise
    return result


def expected_dtype_ok(name: str, tensor: torch.Tensor, bits: int | None) -> bool:
    """Whether `tensor` may be checkpoint entry `name`: int8 for quantized weights, else fp16, bf16 or fp32."""
    if bits is not None and is_quantized_weight(name):
        return tensor.dtype == torch.int8
    return tensor.dtype in FLOAT_DTYPES


def _dtype_error(path: Path, name: str, dtype: torch.dtype, bits: int | None) -> ValueError:
    if bits is not None and is_quantized_weight(name):
        return ValueError(f"{path}: {name} has dtype {dtype}, which an INT{bits} checkpoint cannot hold "
                          f"(quantized weights are int8, the rest float16, bfloat16 or float32)")
    if dtype == torch.int8 and is_quantized_weight(name):
        hint = (f"int8 is only for quantized weights, which come with a `{name}{SCALE_SUFFIX}` entry, and this "
                f"shard has no `_scale` entries")
    else:
        hint = "convert the checkpoint's weights to one of those"
    # Loading would cast ints and bools to floats, and complex or fp64 weights would crash or double memory.
    return ValueError(f"{path}: {name} has dtype {dtype}, but weights must be float16, bfloat16 or float32 "
                      f"({hint})")


def check_shard(state: dict[str, torch.Tensor], shapes: dict[str, tuple[int, ...]], path: Path,
                 bits: int | None = None) -> None:
    """Raise unless `state` has exactly the expected names, shapes and dtypes (expected_dtype_ok)."""
    missing = sorted(set(shapes) - set(state))
    unexpected = sorted(set(state) - set(shapes))
    if missing or unexpected:
        raise ValueError(f"{path} does not match the model config: missing keys {missing[:20]}"
                         f"{' ...' if len(missing) > 20 else ''}; unexpected keys {unexpected[:20]}"
                         f"{' ...' if len(unexpected) > 20 else ''} (is the config right for this checkpoint?)")
    for name, shape in shapes.items():
        if tuple(state[name].shape) != shape:
            raise ValueError(f"{path}: {name} has shape {tuple(state[name].shape)}, expected {shape} "
                             f"(is the config right for this checkpoint?)")
        if not expected_dtype_ok(name, state[name], bits):
            raise _dtype_error(path, name, state[name].dtype, bits)


def stored_quantization(state: dict[str, torch.Tensor], config: GLMConfig,
                        path: str | Path = "shard") -> int | None:
    """Bits of a shard's quantized weights (8 or 4) from its keys and shapes, or None if unquantized."""
    probe = "transformer.layers.0.attention.query_key_value.weight"  # column-parallel: in = hidden always
    if not any(name.endswith(SCALE_SUFFIX) for name in state):
        if probe in state and state[probe].dtype == torch.int8:
            raise ValueError(f"{path}: {probe} is int8 but the shard has no `_scale` entries; "
                             f"a quantized checkpoint needs both")
        return None
    if probe not in state:
        return 8  # the key check reports what is missing
    columns, hidden = state[probe].shape[1], config.hidden_size
    if columns == hidden:
        return 8
    if 2 * columns == hidden:
        return 4
    raise ValueError(f"{path}: quantized {probe} has {columns} columns, which is neither INT8 ({hidden}) nor "
                     f"INT4 ({hidden // 2}) for hidden size {hidden}; is the config right for this checkpoint?")
