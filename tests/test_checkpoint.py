"""Checkpoint I/O and resharding of checkpoint files on tiny random models (CPU, fast); the tensor layout itself:
tests/test_parallel_layout.py."""
from __future__ import annotations

import argparse
import dataclasses
import glob
import json
import os
import re
from pathlib import Path

import pytest
import torch

from glmkit import checkpoint as ckpt
from glmkit.checkpoint import (check_checkpoint, config_from_checkpoint, expected_shapes, inspect_checkpoint,
                               load_rank_state_dict, quantize_checkpoint, read_shard, repack_checkpoint,
                               save_checkpoint)
from glmkit.cli import main
from glmkit.config import GLMConfig
from glmkit.parallel.layout import merge_tensors, split_tensor

TINY = GLMConfig(num_layers=2, hidden_size=32, num_attention_heads=4, inner_hidden_size=48, vocab_size=96)
# Six heads so that 2 -> 3 shards keeps whole heads; hidden 36 gives head dim 6 (even, for rotary).
SIX_HEADS = GLMConfig(num_layers=2, hidden_size=36, num_attention_heads=6, inner_hidden_size=48, vocab_size=96)
H2H = "transformer.layers.0.mlp.dense_h_to_4h.weight"
QKV = "transformer.layers.1.attention.query_key_value.weight"


class NotAllowed:
    """A custom class a malicious or foreign checkpoint might pickle."""

    def __init__(self):
        self.payload = 1


def random_state(config: GLMConfig, seed: int = 0) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return {name: torch.randn(shape, generator=generator) for name, shape in expected_shapes(config).items()}


def shards_of(state: dict[str, torch.Tensor], world_size: int) -> list[dict[str, torch.Tensor]]:
    return [{name: split_tensor(name, t, r, world_size).clone() for name, t in state.items()}
            for r in range(world_size)]


def write(tmp_path, state, world_size, name="ckpt", **kwargs):
    path = tmp_path / name
    save_checkpoint(path, shards_of(state, world_size), **kwargs)
    return path


def merged(dir, config) -> dict[str, torch.Tensor]:
    info = inspect_checkpoint(dir)
    shards = [read_shard(p) for p in info.shard_paths]
    return {name: merge_tensors(name, [s[name] for s in shards]) for name in shards[0]}


def assert_same(a: dict, b: dict):
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name


# ---- checkpoint files ----

def test_dtype_casts_only_floating_point(tmp_path):
    src = write(tmp_path, random_state(TINY), 1)
    quantize_checkpoint(src, tmp_path / "int8", 8, TINY)
    stored = read_shard(inspect_checkpoint(tmp_path / "int8").shard_paths[0])
    loaded = load_rank_state_dict(tmp_path / "int8", TINY, dtype=torch.bfloat16, quantization=8)
    assert loaded[QKV].dtype == torch.int8 and torch.equal(loaded[QKV], stored[QKV])
    assert loaded[QKV + "_scale"].dtype == stored[QKV + "_scale"].dtype  # scales stay as stored
    assert loaded["transformer.final_layernorm.weight"].dtype == torch.bfloat16


def test_round_trip(tmp_path):
    state = random_state(TINY)
    path = write(tmp_path, state, 1, iteration=7, model_config={"num_layers": 2})
    info = inspect_checkpoint(path)
    assert (info.iteration, info.num_shards, info.model_config) == ("7", 1, {"num_layers": 2})
    assert info.shard_paths == (path / "7" / "mp_rank_00_model_states.pt",)
    assert_same(load_rank_state_dict(path, TINY), state)
    half = load_rank_state_dict(path, TINY, dtype=torch.float16)
    assert all(t.dtype == torch.float16 for t in half.values())


def test_load_every_rank_from_other_shard_count(tmp_path):
    state = random_state(TINY)
    path = write(tmp_path, state, 2)
    for world in (1, 2, 4):
        for rank in range(world):
            loaded = load_rank_state_dict(path, TINY, rank, world)
            assert {k: tuple(v.shape) for k, v in loaded.items()} == expected_shapes(TINY, world)
            assert_same(loaded, {k: split_tensor(k, t, rank, world) for k, t in state.items()})


def test_repack_chain_is_lossless(tmp_path):
    state = random_state(TINY, seed=1)
    src = write(tmp_path, state, 1, model_config={"num_layers": 2, "model_parallel_size": 1})
    for count in (2, 4, 2, 1):
        dst = tmp_path / f"repack{count}_{len(list(tmp_path.iterdir()))}"
        repack_checkpoint(src, dst, count, TINY)
        info = inspect_checkpoint(dst)
        assert info.num_shards == count
        assert info.model_config["model_parallel_size"] == count
        assert_same(merged(dst, TINY), state)
        src = dst
    assert_same(load_rank_state_dict(src, TINY), state)


def test_repack_two_to_three(tmp_path):
    state = random_state(SIX_HEADS, seed=2)
    src = write(tmp_path, state, 2, iteration="release")
    repack_checkpoint(src, tmp_path / "three", 3, SIX_HEADS)
    info = inspect_checkpoint(tmp_path / "three")
    assert (info.num_shards, info.iteration) == (3, "release")
    assert_same(merged(tmp_path / "three", SIX_HEADS), state)
    shard = read_shard(info.shard_paths[1])
    assert_same(shard, {k: split_tensor(k, t, 1, 3) for k, t in state.items()})


def test_repack_refuses_bad_destinations(tmp_path):
    src = write(tmp_path, random_state(TINY), 1)
    with pytest.raises(ValueError, match="is the source folder"):
        repack_checkpoint(src, src, 2, TINY)
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("x")
    with pytest.raises(FileExistsError, match="not an empty folder"):
        repack_checkpoint(src, tmp_path / "full", 2, TINY)
    with pytest.raises(ValueError, match="3 shards do not divide num_attention_heads"):
        repack_checkpoint(src, tmp_path / "new", 3, TINY)


def test_saved_views_do_not_carry_whole_storage(tmp_path):
    big = torch.randn(1000, 32)
    save_checkpoint(tmp_path / "c", [{"transformer.final_layernorm.weight": big[0]}])
    size = (tmp_path / "c" / "1" / "mp_rank_00_model_states.pt").stat().st_size
    assert size < 1000 * 32 * 4 / 4


def test_save_refuses_to_mix_with_existing_shards(tmp_path):
    path = write(tmp_path, random_state(TINY), 2)
    with pytest.raises(FileExistsError, match="already holds shard files"):
        save_checkpoint(path, shards_of(random_state(TINY), 1))


def test_loader_reads_only_overlapping_shards(tmp_path, monkeypatch):
    state = random_state(TINY)
    path = write(tmp_path, state, 4)
    seen = []
    real = ckpt.read_shard
    monkeypatch.setattr(ckpt, "read_shard", lambda p: seen.append(p.name) or real(p))
    load_rank_state_dict(path, TINY, rank=1, world_size=2)
    assert seen == ["mp_rank_02_model_states.pt", "mp_rank_03_model_states.pt"]
    seen.clear()
    load_rank_state_dict(path, TINY, rank=3, world_size=4)
    assert seen == ["mp_rank_03_model_states.pt"]


@pytest.mark.parametrize("key", ["mixins.rotary-embedding.rotary_emb.inv_freq",
                                 "transformer.layers.1.attention.rotary_emb.inv_freq"])
def test_rotary_buffers_are_accepted_and_dropped(tmp_path, key):
    state = random_state(TINY)
    shards = shards_of(state, 2)
    for shard in shards:
        shard[key] = torch.arange(4.0)
    save_checkpoint(tmp_path / "c", shards)
    assert key not in read_shard(tmp_path / "c" / "1" / "mp_rank_00_model_states.pt")
    assert_same(load_rank_state_dict(tmp_path / "c", TINY), state)


def test_deepspeed_args_namespace_loads(tmp_path):
    state = random_state(TINY)
    (tmp_path / "c" / "100").mkdir(parents=True)
    (tmp_path / "c" / "latest").write_text("100")
    torch.save({"module": state, "args": argparse.Namespace(num_layers=2, fp16=True), "iteration": 100},
               tmp_path / "c" / "100" / "mp_rank_00_model_states.pt")
    assert_same(load_rank_state_dict(tmp_path / "c", TINY), state)


def test_legacy_non_zip_file_loads(tmp_path):
    state = random_state(TINY)
    (tmp_path / "c" / "release").mkdir(parents=True)
    (tmp_path / "c" / "latest").write_text("release\n")
    torch.save({"module": state}, tmp_path / "c" / "release" / "mp_rank_00_model_states.pt",
               _use_new_zipfile_serialization=False)
    assert_same(load_rank_state_dict(tmp_path / "c", TINY), state)


def test_config_from_checkpoint(tmp_path):
    path = write(tmp_path, random_state(TINY), 2, model_config={"num_attention_heads": 4, "model_class": "GLM130B"})
    assert config_from_checkpoint(path) == TINY
    bare = write(tmp_path, random_state(TINY), 2, name="bare")
    with pytest.raises(ValueError, match="attention heads"):
        config_from_checkpoint(bare)
    assert config_from_checkpoint(bare, num_attention_heads=4) == TINY


# ---- error cases ----

def test_missing_latest(tmp_path):
    path = write(tmp_path, random_state(TINY), 1)
    (path / "latest").unlink()
    with pytest.raises(FileNotFoundError, match="latest"):
        inspect_checkpoint(path)


def test_bad_latest(tmp_path):
    path = write(tmp_path, random_state(TINY), 1)
    (path / "latest").write_text("final")
    with pytest.raises(ValueError, match="'final'"):
        inspect_checkpoint(path)


def test_missing_rank_file(tmp_path):
    path = write(tmp_path, random_state(TINY), 4)
    (path / "1" / "mp_rank_02_model_states.pt").unlink()
    with pytest.raises(FileNotFoundError, match="mp_rank_02_model_states.pt"):
        load_rank_state_dict(path, TINY)


def test_truncated_file(tmp_path):
    path = write(tmp_path, random_state(TINY), 1)
    shard = path / "1" / "mp_rank_00_model_states.pt"
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="mp_rank_00_model_states.pt is truncated or corrupt"):
        load_rank_state_dict(path, TINY)


def test_corrupt_file(tmp_path):
    path = write(tmp_path, random_state(TINY), 1)
    (path / "1" / "mp_rank_00_model_states.pt").write_bytes(b"not a checkpoint at all" * 10)
    with pytest.raises(ValueError, match="mp_rank_00_model_states.pt is truncated or corrupt"):
        read_shard(path / "1" / "mp_rank_00_model_states.pt")


def test_corrupt_zip_payload(tmp_path):
    path = write(tmp_path, random_state(TINY), 1)
    shard = path / "1" / "mp_rank_00_model_states.pt"
    data = bytearray(shard.read_bytes())
    start = data.index(b"\x80\x02", data.index(b"data.pkl"))  # the pickle inside an otherwise intact zip
    data[start:start + 20] = b"\xff" * 20
    shard.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="mp_rank_00_model_states.pt") as caught:
        read_shard(shard)
    assert "weights_only" not in str(caught.value)  # torch's advice to turn the safety off is never passed on


@pytest.mark.parametrize("legacy", [False, True])
def test_unexpected_global_is_refused(tmp_path, legacy):
    shard = tmp_path / "evil.pt"
    torch.save({"module": {"x": torch.zeros(1)}, "extra": NotAllowed()}, shard,
               _use_new_zipfile_serialization=not legacy)
    with pytest.raises(ValueError, match=r"refused to unpickle .*evil.pt: .*not tensors \(test_checkpoint.NotAllowed\)"):
        read_shard(shard)


def test_missing_module_key(tmp_path):
    torch.save({"model": {}, "args": argparse.Namespace()}, tmp_path / "m.pt")
    with pytest.raises(ValueError, match=r"m.pt has no `module` entry \(found \['args', 'model'\]\)"):
        read_shard(tmp_path / "m.pt")


def test_missing_parameter(tmp_path):
    state = random_state(TINY)
    del state["transformer.layers.1.mlp.dense_4h_to_h.bias"]
    path = write(tmp_path, state, 1)
    with pytest.raises(ValueError, match=r"mp_rank_00.*missing keys \['transformer.layers.1.mlp.dense_4h_to_h.bias'\]"):
        load_rank_state_dict(path, TINY)


def test_unexpected_parameter(tmp_path):
    state = random_state(TINY)
    state["transformer.layers.2.input_layernorm.weight"] = torch.ones(32)
    path = write(tmp_path, state, 1)
    with pytest.raises(ValueError, match=r"unexpected keys \['transformer.layers.2.input_layernorm.weight'\]"):
        load_rank_state_dict(path, TINY)


def test_shape_mismatch(tmp_path):
    state = random_state(TINY)
    path = write(tmp_path, state, 1)
    wider = GLMConfig(num_layers=2, hidden_size=32, num_attention_heads=4, inner_hidden_size=64, vocab_size=96)
    message = r"mp_rank_00.*dense_h_to_4h.weight has shape \(96, 32\), expected \(128, 32\)"
    with pytest.raises(ValueError, match=message):
        load_rank_state_dict(path, wider)


def test_shard_count_not_dividing_heads(tmp_path):
    path = write(tmp_path, random_state(TINY), 1)
    with pytest.raises(ValueError, match="3 shards do not divide num_attention_heads=4; choose a shard count"):
        load_rank_state_dict(path, TINY, rank=0, world_size=3)
    # A checkpoint whose own shard count does not fit the config points at the config.
    six = write(tmp_path, random_state(SIX_HEADS), 3, name="six")
    with pytest.raises(ValueError, match="has 3 shards, which this config cannot have"):
        load_rank_state_dict(six, TINY)


# ---- issue 13, items 8-10: missing last shards, `latest`, dtypes, inspect, malicious pickles ----

def test_missing_last_rank_file_is_named_not_blamed_on_the_config(tmp_path, capsys):
    path = write(tmp_path, random_state(TINY), 2)
    (path / "1" / "mp_rank_01_model_states.pt").unlink()
    message = r"shard file mp_rank_01_model_states.pt is missing .*48 of the 96 vocabulary rows .* 2-way split"
    with pytest.raises(FileNotFoundError, match=message):
        load_rank_state_dict(path, TINY)
    with pytest.raises(FileNotFoundError, match=message):
        check_checkpoint(path, TINY)
    assert main(["inspect", str(path), "--config", str(write_yaml(tmp_path, TINY))]) == 2
    assert "mp_rank_01_model_states.pt is missing" in capsys.readouterr().err
    # Three of four files left: a shard count the config cannot have, yet still the missing file is named.
    four = write(tmp_path, random_state(TINY), 4, name="four")
    (four / "1" / "mp_rank_03_model_states.pt").unlink()
    with pytest.raises(FileNotFoundError, match="shard file mp_rank_03_model_states.pt is missing"):
        load_rank_state_dict(four, TINY, rank=1, world_size=2)


def test_missing_last_rank_file_found_from_model_config_json(tmp_path):
    path = write(tmp_path, random_state(TINY), 4, model_config={"num_attention_heads": 4, "model_parallel_size": 4})
    for rank in (2, 3):
        (path / "1" / f"mp_rank_0{rank}_model_states.pt").unlink()
    # No config and no tensors needed: model_config.json tells the count.
    message = (r"shard files mp_rank_02_model_states.pt, mp_rank_03_model_states.pt are missing .*"
               r"model_config.json says model_parallel_size=4, but only 2 shard file")
    with pytest.raises(FileNotFoundError, match=message):
        inspect_checkpoint(path)
    with pytest.raises(FileNotFoundError, match=message):
        config_from_checkpoint(path)


def write_yaml(tmp_path, config: GLMConfig):
    path = tmp_path / "arch.yaml"
    path.write_text("model:\n" + "".join(f"  {k}: {v}\n" for k, v in dataclasses.asdict(config).items()))
    return path


@pytest.mark.parametrize("content", [b"\x80\x04\x95\xff\xfe binary", b"1" * 100])
def test_garbled_latest_names_the_file_and_what_it_should_hold(tmp_path, content):
    path = write(tmp_path, random_state(TINY), 1)
    (path / "latest").write_bytes(content)
    message = r"ckpt/latest is .*; it should hold the iteration number \(e.g. 1000\) or the word `release`"
    with pytest.raises(ValueError, match=message):
        inspect_checkpoint(path)
    with pytest.raises(ValueError, match=message):
        load_rank_state_dict(path, TINY)


BAD_DTYPES = [torch.int32, torch.int8, torch.complex64, torch.bool, torch.float64]


@pytest.mark.parametrize("dtype", BAD_DTYPES, ids=str)
def test_unquantized_shards_with_non_float_weights_are_refused(tmp_path, dtype):
    state = random_state(TINY)
    state[H2H] = (state[H2H] * 10).to(dtype)
    path = write(tmp_path, state, 2)  # the bad weight is split over both shards
    message = rf"mp_rank_00_model_states.pt: {H2H} has dtype {dtype}, but weights must be float16, bfloat16 or float32"
    with pytest.raises(ValueError, match=message):
        load_rank_state_dict(path, TINY)
    with pytest.raises(ValueError, match=message):
        check_checkpoint(path, TINY)
    with pytest.raises(ValueError, match=message):
        repack_checkpoint(path, tmp_path / "out", 1, TINY)
    assert not (tmp_path / "out").exists()  # refused before anything was written


def test_int8_is_refused_for_a_weight_without_scales_but_kept_when_quantized(tmp_path):
    state = random_state(TINY)
    bias = "transformer.layers.0.mlp.dense_h_to_4h.bias"  # never quantized: int8 here is always wrong
    state[bias] = state[bias].to(torch.int8)
    with pytest.raises(ValueError, match=rf"{bias} has dtype torch.int8, but weights must be float16"):
        load_rank_state_dict(write(tmp_path, state, 1), TINY)
    dense = "transformer.layers.0.attention.dense.weight"
    state = random_state(TINY)
    state[dense] = state[dense].to(torch.int8)
    with pytest.raises(ValueError, match=rf"{dense} has dtype torch.int8.*only for quantized weights, which come "
                                         rf"with a `{dense}_scale` entry"):
        load_rank_state_dict(write(tmp_path, state, 1, name="dense"), TINY)


def test_inspect_runs_the_checks_of_load_on_every_shard(tmp_path, capsys):
    state = random_state(TINY)
    path = write(tmp_path, state, 2, model_config={"num_attention_heads": 4, "model_parallel_size": 2})
    assert main(["inspect", str(path)]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert (shown["num_shards"], shown["tensors"], shown["dtypes"]) == (2, 2 * len(state), ["float32"])
    assert shown["checked_against"] == "model_config.json and shard shapes" and shown["quantization"] is None
    # Rank 1's file alone is wrong: loading rank 0 of 2 never reads it, inspect does.
    shard = path / "1" / "mp_rank_01_model_states.pt"
    module = {name: t.clone() for name, t in read_shard(shard).items()}  # not views of the file rewritten below
    module[QKV] = module[QKV].to(torch.int32)
    torch.save({"module": module}, shard)
    assert main(["inspect", str(path)]) == 2
    err = capsys.readouterr().err
    assert f"mp_rank_01_model_states.pt: {QKV} has dtype torch.int32" in err and "Traceback" not in err
    module[QKV] = module[QKV][:, :16].float()
    torch.save({"module": module}, shard)
    assert main(["inspect", str(path), "--config", str(write_yaml(tmp_path, TINY))]) == 2
    assert f"mp_rank_01_model_states.pt: {QKV} has shape (48, 16), expected (48, 32)" in capsys.readouterr().err


class RunsShell:
    """A pickle payload that runs a shell command when unpickled without weights_only."""

    def __init__(self, command):
        self.command = command

    def __reduce__(self):
        return os.system, (self.command,)


@pytest.mark.parametrize("legacy", [False, True])
def test_malicious_pickle_is_refused_as_such(tmp_path, legacy):
    marker = tmp_path / "pwned"
    shard = tmp_path / "evil.pt"
    torch.save({"module": {"x": torch.zeros(1)}, "payload": RunsShell(f"touch {marker}")}, shard,
               _use_new_zipfile_serialization=not legacy)
    with pytest.raises(ValueError) as caught:
        read_shard(shard)
    message = str(caught.value)
    assert re.match(rf"refused to unpickle {re.escape(str(shard))}: it contains code objects/globals that are "
                    rf"not tensors \((posix|nt)\.system\); glmkit never loads arbitrary pickles", message)
    assert "weights_only" not in message and "corrupt" not in message
    assert not marker.exists()


def official_convert_tp_iteration(folder: Path) -> str:
    """How GLM-130B's tools/convert_tp.py (THUDM/GLM-130B, main) reads `latest`: its expression
    `open(os.path.join(args.input_folder, "latest"), "r").read()`, unstripped, then used as a folder name."""
    return open(os.path.join(folder, "latest"), "r").read()


def test_latest_is_what_the_official_convert_tp_reads(tmp_path):
    path = write(tmp_path, random_state(TINY), 2, iteration=1000)
    repack_checkpoint(path, tmp_path / "four", 4, TINY)
    for folder, count in ((path, 2), (tmp_path / "four", 4)):
        iteration = official_convert_tp_iteration(folder)
        assert iteration == "1000"
        # The official tool counts shards with this glob of the unstripped iteration.
        assert len(glob.glob(os.path.join(folder, iteration, "mp_rank_*_model_states.pt"))) == count


def test_latest_with_a_trailing_newline_still_reads(tmp_path):
    path = write(tmp_path, random_state(TINY), 1, iteration=1000)
    (path / "latest").write_text("1000\n")
    assert inspect_checkpoint(path).iteration == "1000"
    assert_same(load_rank_state_dict(path, TINY), random_state(TINY))
