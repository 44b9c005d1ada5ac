"""SAT checkpoint I/O: inspect, read safely, load one rank's (resharded) state dict, save and repack.

Layout (SAT inference checkpoints):
    <dir>/latest                                   the iteration number, or the word `release`
    <dir>/<iteration>/mp_rank_XX_model_states.pt  torch-pickled {"module": state_dict, ...} per tensor-parallel rank
    <dir>/model_config.json                        optional architecture arguments

Quantized checkpoints (GLM-130B's INT8/INT4 format, see glmkit.quantization) hold int8 weights and
`<weight name>_scale` tensors; the loader recognises them from their keys and shapes, and quantizes an
unquantized checkpoint while loading, weight by weight, when asked for a quantized model.
"""
from __future__ import annotations

import json
import os
import re
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from .config import GLMConfig
from .quantization import (SCALE_SUFFIX, check_bits, dequantize_weight, is_quantized_weight, quantize_weight,
                           row_absmax, scale_from_absmax)
# What a shard file must hold, and reading one safely; part of this module's interface too.
from .shard_file import (FLOAT_DTYPES, check_shard, expected_dtype_ok, expected_shapes,  # noqa: F401
                         is_ignored_key, read_shard, stored_quantization)
from .parallel.layout import reshard_tensor, shard_style, source_ranks

SHARD_NAME = "mp_rank_{:02d}_model_states.pt"
_SHARD_RE = re.compile(r"mp_rank_(\d{2,})_model_states\.pt")


@dataclass(frozen=True)
class CheckpointInfo:
    """What a checkpoint folder holds, found without reading any tensors."""

    dir: Path
    iteration: str  # the folder name under dir: a number or "release"
    shard_paths: tuple[Path, ...]  # indexed by tensor-parallel rank
    num_shards: int
    model_config: dict | None


def inspect_checkpoint(dir: str | Path) -> CheckpointInfo:
    """Describe the checkpoint in `dir`; raise if `latest`, the iteration folder or any rank file is missing."""
    root = Path(dir)
    if not root.is_dir():
        raise FileNotFoundError(f"checkpoint folder {root} does not exist")
    latest = root / "latest"
    if not latest.is_file():
        raise FileNotFoundError(f"{latest} is missing; a SAT checkpoint folder needs a `latest` file holding "
                                f"the iteration number (or `release`)")
    iteration = _read_latest(latest)
    folder = root / iteration
    if not folder.is_dir():
        raise FileNotFoundError(f"{latest} names iteration {iteration!r} but folder {folder} does not exist")
    ranks = sorted(int(m.group(1)) for p in folder.iterdir() if (m := _SHARD_RE.fullmatch(p.name)))
    if not ranks:
        raise FileNotFoundError(f"no {SHARD_NAME.format(0).replace('00', 'XX')} files in {folder}")
    num_shards = ranks[-1] + 1
    missing = sorted(set(range(num_shards)) - set(ranks))
    if missing:
        names = ", ".join(str(folder / SHARD_NAME.format(r)) for r in missing)
        raise FileNotFoundError(f"checkpoint in {folder} has ranks up to {num_shards - 1} but is missing {names}")
    model_config = None
    config_path = root / "model_config.json"
    if config_path.is_file():
        try:
            model_config = json.loads(config_path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            raise ValueError(f"{config_path} is not valid JSON: {error}") from None
        if not isinstance(model_config, dict):
            raise ValueError(f"{config_path} holds a {type(model_config).__name__}; expected a JSON object")
        _check_declared_shards(model_config.get("model_parallel_size"), num_shards, folder, config_path)
    return CheckpointInfo(dir=root, iteration=iteration,
                          shard_paths=tuple(folder / SHARD_NAME.format(r) for r in range(num_shards)),
                          num_shards=num_shards, model_config=model_config)


# `latest` holds a few characters (SAT writes e.g. "49300"); anything longer is not a `latest` file.
_LATEST_MAX_BYTES = 64


def _read_latest(latest: Path) -> str:
    """The iteration named by a `latest` file, with a message naming the file when it holds anything else."""
    expected = "it should hold the iteration number (e.g. 1000) or the word `release`, as SAT writes it"
    size = latest.stat().st_size
    with open(latest, "rb") as f:
        raw = f.read(_LATEST_MAX_BYTES + 1)
    try:
        text = raw.decode("ascii")
    except UnicodeDecodeError:
        raise ValueError(f"{latest} is not text ({size} bytes, starting {raw[:16]!r}); {expected}") from None
    if size > _LATEST_MAX_BYTES:
        raise ValueError(f"{latest} is {size} bytes long, starting {text[:16]!r}; {expected}")
    iteration = text.strip()  # files written by older glmkit (and by hand) end in a newline
    if iteration != "release" and not iteration.isdigit():
        raise ValueError(f"{latest} holds {iteration!r}; {expected}")
    return iteration


def _missing_shards(folder: Path, found: int, total: int, why: str,
                    fix: str = "copy the missing file(s) there") -> FileNotFoundError:
    names = [SHARD_NAME.format(r) for r in range(found, total)]
    what = f"shard file {names[0]} is" if len(names) == 1 else f"shard files {', '.join(names)} are"
    return FileNotFoundError(f"{what} missing from {folder}: {why}, but only {found} shard file(s) are there; "
                             f"{fix}")


def _check_declared_shards(declared, found: int, folder: Path, config_path: Path) -> None:
    """model_config.json's model_parallel_size (when it has one) must match the shard files present."""
    if declared is None:
        return
    if isinstance(declared, bool) or not isinstance(declared, int) or declared < 1:
        raise ValueError(f"{config_path}: model_parallel_size is {declared!r}; expected a positive integer")
    if declared > found:
        raise _missing_shards(folder, found, declared, f"{config_path.name} says model_parallel_size={declared}",
                              "copy the missing file(s) there, or correct model_parallel_size if the checkpoint "
                              "was re-split")
    if declared < found:
        raise ValueError(f"{config_path} says model_parallel_size={declared} but {folder} holds {found} shard "
                         f"files; remove the extra files or correct model_parallel_size")


def _check_shards_complete(info: CheckpointInfo, config: GLMConfig, state: dict[str, torch.Tensor],
                           path: Path) -> None:
    """Name the missing shard files when a shard's slice of the vocabulary and heads implies more shards.

    Without model_config.json a folder missing its last rank files looks like a smaller checkpoint; the
    split of one shard tells the real count, if vocabulary and heads agree on it (if not, the config is
    what does not fit, and the shape check says so).
    """
    embedding = state.get("transformer.word_embeddings.weight")
    qkv = state.get("transformer.layers.0.attention.query_key_value.weight")
    if embedding is None or qkv is None or embedding.dim() != 2 or qkv.dim() != 2:
        return  # the key check reports it
    rows, qkv_rows = embedding.shape[0], qkv.shape[0]
    vocab, fused = config.vocab_size, 3 * config.hidden_size
    if not rows or vocab % rows or not qkv_rows or fused % qkv_rows or vocab // rows != fused // qkv_rows:
        return
    implied = vocab // rows
    if implied > info.num_shards:
        heads = qkv_rows // (3 * config.head_dim)
        raise _missing_shards(path.parent, info.num_shards, implied,
                              f"{path.name} holds {rows} of the {vocab} vocabulary rows and {heads} of the "
                              f"{config.num_attention_heads} heads, a {implied}-way split")


def _layout(info: CheckpointInfo, config: GLMConfig, state: dict[str, torch.Tensor],
            path: Path) -> tuple[int | None, dict[str, tuple[int, ...]]]:
    """Stored bits and per-shard shapes of checkpoint `info` under `config`, judged from its shard `state`."""
    _check_shards_complete(info, config, state, path)
    try:
        config.check_shardable(info.num_shards)
    except ValueError as error:
        raise ValueError(f"checkpoint {info.dir} has {info.num_shards} shards, which this config cannot have "
                         f"({error}); the config probably does not describe this checkpoint") from None
    stored = stored_quantization(state, config, path)
    return stored, expected_shapes(config, info.num_shards, stored)


@dataclass(frozen=True)
class CheckpointCheck:
    """What check_checkpoint verified: the folder, the stored quantization and every tensor's metadata."""

    info: CheckpointInfo
    quantization: int | None  # bits of the stored quantized weights, None if unquantized
    num_tensors: int
    dtypes: tuple[str, ...]


def check_checkpoint(dir: str | Path, config: GLMConfig) -> CheckpointCheck:
    """Run the checks loading runs (latest, shard count, keys, shapes, dtypes) on every shard of `dir`.

    No tensor data is read from zip-format shards (torch.save's default): they are memory-mapped and only
    shapes and dtypes are looked at. Legacy-format files cannot be mapped and are read whole.
    """
    info = inspect_checkpoint(dir)
    first = read_shard(info.shard_paths[0])
    stored, shapes = _layout(info, config, first, info.shard_paths[0])
    dtypes, count = set(), 0
    for j, path in enumerate(info.shard_paths):
        state = first if j == 0 else read_shard(path)
        check_shard(state, shapes, path, stored)
        dtypes.update(str(t.dtype).removeprefix("torch.") for t in state.values())
        count += len(state)
        del state
    return CheckpointCheck(info=info, quantization=stored, num_tensors=count, dtypes=tuple(sorted(dtypes)))


def _check_shard_count(config: GLMConfig, num_shards: int, what: str) -> None:
    try:
        config.check_shardable(num_shards)
    except ValueError as error:
        raise ValueError(f"{what}: {error}") from None


def checkpoint_quantization(dir: str | Path, config: GLMConfig) -> int | None:
    """Bits of checkpoint `dir`'s quantized weights (8 or 4), or None for an unquantized checkpoint."""
    info = inspect_checkpoint(dir)
    return stored_quantization(read_shard(info.shard_paths[0]), config, info.shard_paths[0])


def _check_mode(stored: int | None, wanted: int | None, dir: Path) -> None:
    if stored is None or stored == wanted:
        return  # read as is, or quantize while loading
    if wanted is None:
        raise ValueError(f"checkpoint {dir} is INT{stored}-quantized (it has `_scale` entries); set "
                         f"`quantization: int{stored}` in the config to load it")
    raise ValueError(f"the config asks for int{wanted} but checkpoint {dir} is INT{stored}-quantized; set "
                     f"`quantization: int{stored}`, or quantize the unquantized checkpoint to INT{wanted} "
                     f"(re-quantizing INT{stored} weights would add their rounding errors)")


def _place(tensor: torch.Tensor, device: torch.device | None, dtype: torch.dtype | None) -> torch.Tensor:
    # Move first, then cast: on a GPU the cast runs there and host RAM never holds a converted copy.
    if device is not None:
        tensor = tensor.to(device)
    if dtype is not None and tensor.is_floating_point():
        tensor = tensor.to(dtype)
    return tensor


def _reshard_quantized(name: str, sources: list[dict], num_shards: int, rank: int, world_size: int,
                       bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Target `rank`'s (weight, scale) of a stored quantized weight, from the overlapping source shards."""
    weights = [s[name] for s in sources]
    scales = [s[name + SCALE_SUFFIX] for s in sources]
    if shard_style(name) == "row" and any(not torch.equal(scales[0], x) for x in scales[1:]):
        # The original tool quantizes each shard on its own, so a row's pieces have different scales:
        # merging them needs one scale per row, hence a requantization of this (lossy) weight.
        warnings.warn(f"{name}: the source shards carry different scales for the same rows (quantized shard "
                      f"by shard, as GLM-130B's tool does); merging requantizes them. Quantize the "
                      f"unquantized checkpoint for the most accurate result.", stacklevel=3)
        pieces = [dequantize_weight(w, x, bits) for w, x in zip(weights, scales)]  # (out, in/N) fp32 each
        return quantize_weight(reshard_tensor(name, pieces, num_shards, rank, world_size), bits)
    return (reshard_tensor(name, weights, num_shards, rank, world_size),
            reshard_tensor(name + SCALE_SUFFIX, scales, num_shards, rank, world_size))


def load_rank_state_dict(dir: str | Path, config: GLMConfig, rank: int = 0, world_size: int = 1,
                         dtype: torch.dtype | None = None, quantization: int | None = None,
                         device: torch.device | str | None = None) -> dict[str, torch.Tensor]:
    """State dict of rank `rank` in a `world_size`-way model, reading only the checkpoint shards it overlaps.

    Tensors may be views of memory-mapped files. `dtype` casts floating-point tensors only, so quantized
    integer weights keep their type and `_scale` tensors stay fp16 as stored. `quantization` (None, 8 or 4)
    is the mode of the result: a checkpoint in that mode is read as is; an unquantized one is quantized while
    loading, one weight at a time in row blocks (row-parallel weights take their scales over whole rows,
    so every shard is read once for those); one quantized otherwise is refused. `device` places each tensor
    there as it is produced, and quantization runs there: loading onto a GPU keeps host RAM to the
    memory-mapped shards plus one weight's slice at most.
    """
    _check_shard_count(config, world_size, f"cannot load as {world_size} tensor-parallel ranks")
    if quantization is not None:
        check_bits(quantization)
        expected_shapes(config, world_size, quantization)  # raises for INT4 shards off byte boundaries
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is out of range for world size {world_size}")
    info = inspect_checkpoint(dir)
    device = None if device is None else torch.device(device)
    needed = source_ranks(rank, world_size, info.num_shards)
    first = read_shard(info.shard_paths[needed.start])
    stored, shapes = _layout(info, config, first, info.shard_paths[needed.start])
    _check_mode(stored, quantization, info.dir)

    def checked(j: int, state: dict | None = None) -> dict[str, torch.Tensor]:
        state = read_shard(info.shard_paths[j]) if state is None else state
        check_shard(state, shapes, info.shard_paths[j], stored)
        return state

    sources = [checked(needed.start, first)] + [checked(j) for j in needed[1:]]
    quantize_now = stored is None and quantization is not None
    absmax: dict[str, torch.Tensor] = {}
    if quantize_now and world_size > 1:
        # A row-parallel weight's rows span every shard: their absmax over all shards gives every rank the
        # same scale. Shards outside `needed` are read one at a time and let go. (At world size 1 the
        # target holds whole rows and quantize_weight takes the absmax itself.)
        row_names = [n for n in shapes if is_quantized_weight(n) and shard_style(n) == "row"]
        for j in range(info.num_shards):
            state = sources[j - needed.start] if j in needed else checked(j)
            for name in row_names:
                part = row_absmax(state[name], device)
                absmax[name] = part if name not in absmax else torch.maximum(absmax[name], part)
            del state
    result = {}
    for name in shapes:
        if name.endswith(SCALE_SUFFIX):
            continue  # produced with its weight
        if stored is not None and is_quantized_weight(name):
            weight, scale = _reshard_quantized(name, sources, info.num_shards, rank, world_size, stored)
            result[name], result[name + SCALE_SUFFIX] = _place(weight, device, None), _place(scale, device, None)
            continue
        tensor = reshard_tensor(name, [s[name] for s in sources], info.num_shards, rank, world_size)
        if quantize_now and is_quantized_weight(name):
            scale = scale_from_absmax(absmax.pop(name), quantization) if name in absmax else None
            result[name], result[name + SCALE_SUFFIX] = quantize_weight(tensor, quantization, scale, device)
        else:
            result[name] = _place(tensor, device, dtype)
    return result


def _standalone(tensor: torch.Tensor) -> torch.Tensor:
    """A contiguous tensor owning exactly its storage, so torch.save does not write a whole mmapped file."""
    tensor = tensor.detach()
    owns_storage = (tensor.is_contiguous() and tensor.storage_offset() == 0
                    and tensor.untyped_storage().nbytes() == tensor.numel() * tensor.element_size())
    return tensor if owns_storage else tensor.clone(memory_format=torch.contiguous_format)


def _write_shard(path: Path, state: dict[str, torch.Tensor]) -> None:
    # Write to a temporary name first so an interrupted save never leaves a truncated shard behind.
    tmp = path.with_name(path.name + ".tmp")
    torch.save({"module": {name: _standalone(t) for name, t in state.items()}}, tmp)
    os.replace(tmp, path)


def _iteration_folder(dir: Path, iteration: int | str) -> Path:
    if not (iteration == "release" or (isinstance(iteration, int) and iteration >= 0)):
        raise ValueError(f"iteration must be a non-negative int or 'release', got {iteration!r}")
    folder = dir / str(iteration)
    if folder.is_dir() and any(_SHARD_RE.fullmatch(p.name) for p in folder.iterdir()):
        raise FileExistsError(f"{folder} already holds shard files; save into a new folder or iteration")
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def _finish(dir: Path, iteration: int | str, model_config: dict | None) -> None:
    if model_config is not None:
        (dir / "model_config.json").write_text(json.dumps(model_config, indent=2) + "\n")
    # `latest` is written last: a folder without it is visibly incomplete. No newline: GLM-130B's
    # tools/convert_tp.py uses the file's text unstripped as the iteration folder's name.
    (dir / "latest").write_text(str(iteration))


def save_checkpoint(dir: str | Path, shard_state_dicts: Sequence[dict[str, torch.Tensor]],
                    iteration: int | str = 1, model_config: dict | None = None) -> None:
    """Write shard state dicts (index = rank) in the SAT layout: latest, <iteration>/mp_rank_XX_model_states.pt."""
    if not shard_state_dicts:
        raise ValueError("need at least one shard state dict to save")
    root = Path(dir)
    folder = _iteration_folder(root, iteration)
    for rank, state in enumerate(shard_state_dicts):
        _write_shard(folder / SHARD_NAME.format(rank), state)
    _finish(root, iteration, model_config)


def _rewrite(src: Path, dst: Path, num_shards: int | None, config: GLMConfig, quantization: int | None,
             what: str, check: CheckpointCheck) -> None:
    # `check` (check_checkpoint of src) has looked at every source shard before anything is written.
    info = check.info
    num_shards = info.num_shards if num_shards is None else num_shards
    _check_shard_count(config, num_shards, f"cannot {what} into {num_shards} shards")
    if quantization is not None:
        expected_shapes(config, num_shards, quantization)  # INT4 byte boundaries
    if dst.resolve() == src.resolve():
        raise ValueError(f"{what} destination {dst} is the source folder; choose a new, empty folder")
    if dst.exists() and (not dst.is_dir() or any(dst.iterdir())):
        raise FileExistsError(f"{what} destination {dst} is not an empty folder; choose a new, empty folder")
    folder = _iteration_folder(dst, int(info.iteration) if info.iteration.isdigit() else info.iteration)
    for rank in range(num_shards):
        # Peak memory: this target shard plus the (memory-mapped) source shards it overlaps.
        state = load_rank_state_dict(src, config, rank, num_shards, quantization=quantization)
        _write_shard(folder / SHARD_NAME.format(rank), state)
        del state
    model_config = info.model_config
    if model_config is not None and "model_parallel_size" in model_config:
        model_config = {**model_config, "model_parallel_size": num_shards}
    _finish(dst, info.iteration, model_config)


def repack_checkpoint(src: str | Path, dst: str | Path, num_shards: int, config: GLMConfig) -> None:
    """Write a `num_shards`-way copy of checkpoint `src` (quantized or not) into the new or empty folder `dst`."""
    check = check_checkpoint(src, config)
    _rewrite(Path(src), Path(dst), num_shards, config, check.quantization, "repack", check)


def quantize_checkpoint(src: str | Path, dst: str | Path, bits: int, config: GLMConfig,
                        num_shards: int | None = None) -> None:
    """Write an INT`bits` copy of checkpoint `src` into `dst` (`num_shards`-way; default: src's count).

    Reads one target rank at a time and quantizes weight by weight, so host RAM holds one output shard plus
    small temporaries beyond the memory-mapped source. A source already quantized to `bits` is repacked.
    """
    check_bits(bits)
    _rewrite(Path(src), Path(dst), num_shards, config, bits, "quantize", check_checkpoint(src, config))


def config_from_checkpoint(dir: str | Path, **overrides) -> GLMConfig:
    """GLMConfig from model_config.json, filling layers/hidden/vocab/inner from shard 0's shapes if absent."""
    info = inspect_checkpoint(dir)
    fields = set(GLMConfig.__dataclass_fields__)
    raw = info.model_config or {}
    values = {k: v for k, v in raw.items() if k in fields and v is not None}
    if "num_attention_heads" not in values and raw.get("hidden_size_per_attention_head") and "hidden_size" in raw:
        values["num_attention_heads"] = raw["hidden_size"] // raw["hidden_size_per_attention_head"]
    values.update(overrides)
    shape_fields = ("num_layers", "hidden_size", "vocab_size", "inner_hidden_size")
    if any(k not in values for k in shape_fields):
        state = read_shard(info.shard_paths[0])
        n = info.num_shards
        try:
            vocab, hidden = state["transformer.word_embeddings.weight"].shape  # (vocab/n, h)
            # A quantized 4h_to_h stores in*bits/8 columns; qkv's (in = hidden) tells the bits.
            bits = 8
            if any(k.endswith(SCALE_SUFFIX) for k in state):
                bits = 8 * state["transformer.layers.0.attention.query_key_value.weight"].shape[1] // hidden
            inferred = {
                "num_layers": len({int(m.group(1)) for k in state
                                   if (m := re.match(r"transformer\.layers\.(\d+)\.", k))}),
                "hidden_size": hidden,
                "vocab_size": vocab * n,
                "inner_hidden_size": state["transformer.layers.0.mlp.dense_4h_to_h.weight"].shape[1] * n * 8 // bits,
            }
        except KeyError as error:
            raise ValueError(f"cannot infer the model config from {info.shard_paths[0]}: no {error} entry; "
                             f"pass a GLMConfig instead") from None
        values = {**inferred, **values}
    if "num_attention_heads" not in values:
        raise ValueError(f"the number of attention heads of {info.dir} cannot be inferred from tensor shapes and "
                         f"model_config.json does not give it; pass num_attention_heads=... or use a preset")
    return GLMConfig.from_dict(values)
