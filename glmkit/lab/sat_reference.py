"""SwissArmyTransformer 0.4.12's own `GLM130B`, built, loaded and patched as glmkit's reference.

GLM-130B's repository runs this class. glmkit compares against it for fidelity (scripts/fidelity_sat.py)
and for speed (`glmkit bench --against sat`). SAT is optional: this module imports it only inside the
functions that need it, and `require_sat` turns its absence (or a missing GPU) into a clear error.

SAT's files are never changed. Its two quirks (GLM-NOTES "SAT 0.4.12 quirks") are patched in the built
model's hook table by `patch_sat_model`. The decode loop (`SATRunner`, `sat_decode_loop`) calls the model
the way `sat.generation.autoregressive_sampling.filling_sequence` does: a prefill, then one token per
call, with the per-layer `mem_kv` outputs concatenated into `mems` by SAT's own `update_mems`.
"""
from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch

from ..config import GLMConfig
from ..generate.tokens import Context, next_positions, prefill_inputs

INSTALL_HINT = ("install it with `pip install --no-deps SwissArmyTransformer==0.4.12` plus einops and "
                "transformers")
# SAT's rotary buffer; SAT ignores it on load (it recomputes it), so a state dict need not hold it.
ROTARY_KEY = "mixins.rotary-embedding.rotary_emb.inv_freq"


class SATUnavailableError(RuntimeError):
    """SAT's GLM130B cannot run here: SAT is not importable, or there is no CUDA GPU."""


def require_sat(need_cuda: bool = True) -> None:
    """Raise SATUnavailableError unless SAT imports and (with `need_cuda`) a CUDA GPU is visible."""
    try:
        import sat  # noqa: F401
        from sat.model.official.glm130B_model import GLM130B  # noqa: F401
    except ImportError as error:
        raise SATUnavailableError(f"SwissArmyTransformer is not importable ({error}); {INSTALL_HINT}") from None
    if need_cuda and not torch.cuda.is_available():
        raise SATUnavailableError("SAT's GLM130B needs a CUDA GPU: it allocates its rotary cache and attention "
                                  "buffers on torch.cuda.current_device(). Run it on a GPU machine.")


# ----------------------------------------------------------------------------- build and load

def sat_args(config: GLMConfig, mp_size: int, fp16: bool, device):
    """A Namespace from SAT's own parser, as GLM-130B's configs/model_glm_130b.sh passes it.

    sat.arguments.get_args imports DeepSpeed (not installed), so the parser is assembled from the
    same pieces it uses: add_model_config_args plus GLM130B's model-specific args.
    """
    from sat.arguments import add_model_config_args
    from sat.model.official.glm130B_model import GLM130B
    parser = argparse.ArgumentParser()
    add_model_config_args(parser)
    GLM130B.add_model_specific_args(parser)
    args = parser.parse_args([
        "--num-layers", str(config.num_layers), "--hidden-size", str(config.hidden_size),
        "--inner-hidden-size", str(config.inner_hidden_size), "--vocab-size", str(config.vocab_size),
        "--num-attention-heads", str(config.num_attention_heads),
        "--max-sequence-length", str(config.max_sequence_length),
        "--layernorm-order", "post", "--skip-init", "--model-parallel-size", str(mp_size),
        "--hidden-dropout", "0", "--attention-dropout", "0",
    ])
    args.fp16, args.bf16 = fp16, False
    args.mode = "inference"
    args.device = device
    return args


def patch_sat_model(model, mp_size: int) -> None:
    """Work around two SAT 0.4.12 quirks in this model's hook table (SAT's own files stay untouched).

    BaseModel.forward copies `model.hooks` into the transformer's hook dict (which every layer's
    attention shares) on each call, so replacing entries here takes effect for the whole model.
    """
    from sat.mpu import gather_from_model_parallel_region
    hooks = model.hooks
    attention_fn = hooks["attention_fn"]  # SelfAttentionWithFP32SoftmaxMixin.attention_fn

    def attention_fn_with_bool_mask(query, key, value, mask, *args, **kwargs):
        # Quirk 1: BaseTransformer.forward does `attention_mask.type_as(next(self.parameters()))`, so
        # GLM-130B's bool mask (True = masked) reaches the hook as fp16 0./1.; without apex the hook
        # runs `attention_scores.masked_fill_(attention_mask, -10000.0)`, which needs a bool mask and
        # raises on fp16. The values are exactly 0 and 1, so `.bool()` restores the mask losslessly.
        if mask.dtype != torch.bool:
            mask = mask.bool()
        return attention_fn(query, key, value, mask, *args, **kwargs)

    hooks["attention_fn"] = attention_fn_with_bool_mask
    if mp_size > 1:
        final_forward = hooks["final_forward"]  # FinalForwardMixin.final_forward

        def final_forward_gathered(logits, **kwargs):
            # Quirk 2: FinalForwardMixin.final_forward multiplies by this rank's vocab slice of the word
            # embeddings and ignores `parallel_output`, so each rank returns vocab/mp logits. Gather the
            # slices along the vocab dim in rank order, as Megatron's gather_output would.
            return gather_from_model_parallel_region(final_forward(logits, **kwargs))

        hooks["final_forward"] = final_forward_gathered


def check_sat_weights(model, shard_path: Path) -> dict:
    """Every tensor SAT loaded equals the file's, and every parameter came from the file."""
    module = torch.load(shard_path, map_location="cpu", weights_only=True)["module"]
    state = model.state_dict()
    not_in_model = sorted(k for k in module if k not in state)
    not_loaded = sorted(k for k in state if k not in module and not k.endswith("inv_freq"))
    # Compared in the file's dtype: an fp32 model holding fp16 checkpoint values casts back exactly.
    unequal = sorted(k for k in module
                     if k in state and not torch.equal(state[k].cpu().to(module[k].dtype), module[k]))
    if not_in_model or not_loaded or unequal:
        raise RuntimeError(f"SAT did not load {shard_path} faithfully: not in model {not_in_model}, "
                           f"not loaded {not_loaded}, unequal {unequal}")
    return {"tensors_checked": len(module)}


def _new_glm130b(args, jit_fusion: bool):
    from sat.model.official.glm130B_model import GLM130B
    # (sat.model.base_model.get_model cannot build it: it passes params_dtype, which GLM130B rejects.)
    model = GLM130B(args)
    if not jit_fusion:
        torch._C._jit_override_can_fuse_on_gpu(False)  # GLM130B.__init__ set it True
    return model


@torch.no_grad()
def _warm_rotary(model, config: GLMConfig, device) -> None:
    # initialize.py's warm-up call that builds the rotary cache for every position up to the maximum
    # (its 1x1 all-masked bool mask takes the hook's "auto-regressive, skip" branch, so no quirk).
    one = torch.ones(1, 1, device=device, dtype=torch.int64)
    model(one, one * config.max_sequence_length, torch.ones(1, 1, 1, 1, device=device, dtype=torch.bool))


def load_sat_checkpoint(config: GLMConfig, ckpt: Path, mp_size: int, device, fp16: bool = True,
                        patch: bool = True, jit_fusion: bool = True):
    """SAT's GLM130B loaded by SAT's own load_checkpoint as GLM-130B's initialize.py does it; (model, check).

    `check` reports the comparison of every loaded tensor with the shard file (`check_sat_weights`).
    Call after `init_distributed` (SAT's layers need its model-parallel state, even at size 1).
    """
    from sat.mpu import get_model_parallel_rank
    from sat.training.model_io import load_checkpoint
    args = sat_args(config, mp_size, fp16, device)
    args.load = str(ckpt)
    # initialize.py: GLM130B(args).half(); load_checkpoint(model, args); model.to(args.device); eval().
    model = _new_glm130b(args, jit_fusion)
    if fp16:
        model = model.half()
    load_checkpoint(model, args)  # reads mp_rank_<this rank>; warns only on unexpected keys: checked below
    model = model.to(device).eval()
    shard = ckpt / "1" / f"mp_rank_{get_model_parallel_rank():02d}_model_states.pt"
    check = check_sat_weights(model, shard)
    _warm_rotary(model, config, device)
    if patch:
        patch_sat_model(model, mp_size)
    return model, check


def load_sat_state_dict(config: GLMConfig, state: dict[str, torch.Tensor], mp_size: int, device,
                        patch: bool = True, jit_fusion: bool = True):
    """fp16 SAT GLM130B whose parameters ARE the tensors of `state` (shared storage, no copy).

    `state` is one rank's state dict in SAT's names, e.g. a glmkit model's `state_dict()` (glmkit keeps
    SAT's names and Megatron layout, so a tensor-parallel rank's dict fits SAT at the same MP size). SAT
    builds its layers uninitialised (`--skip-init`) on the CPU; those untouched allocations are then
    replaced by `state`'s tensors, so the weights exist once, wherever `state` keeps them. Call after
    `init_distributed` or `init_model_parallel`.
    """
    args = sat_args(config, mp_size, True, device)
    model = _new_glm130b(args, jit_fusion).half()
    own = model.state_dict()
    unexpected = sorted(k for k in state if k not in own)
    missing = sorted(k for k in own if k not in state and k != ROTARY_KEY)
    if unexpected or missing:
        raise ValueError(f"state dict does not fit SAT's GLM130B at MP={mp_size}: unexpected {unexpected[:5]}, "
                         f"missing {missing[:5]}")
    # assign=True adopts the tensors themselves; shapes are still checked against SAT's own.
    model.load_state_dict({k: v for k, v in state.items()}, strict=False, assign=True)
    model = model.to(device).eval()
    adopted = model.state_dict()
    copied = sorted(k for k in state if adopted[k].data_ptr() != state[k].data_ptr())
    if copied:
        raise RuntimeError(f"SAT copied instead of sharing {copied[:5]} (dtype or device differs from SAT's)")
    _warm_rotary(model, config, device)
    if patch:
        patch_sat_model(model, mp_size)
    return model


# ----------------------------------------------------------------------------- process groups

def init_distributed(rank: int, world: int, port: int, backend: str) -> None:
    """A process group over tcp://127.0.0.1:port plus SAT's model-parallel state of size `world`."""
    import torch.distributed as dist
    dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    init_model_parallel(world)


def init_model_parallel(world: int) -> None:
    """SAT's model-parallel groups over an initialised default process group (idempotent)."""
    from sat import mpu
    if not mpu.model_parallel_is_initialized():
        mpu.initialize_model_parallel(world)  # SAT's _simple_init then finds it initialised and keeps it


def close_distributed() -> None:
    """Tear down SAT's model-parallel state and the default process group."""
    import torch.distributed as dist
    from sat import mpu
    mpu.destroy_model_parallel()
    dist.destroy_process_group()


# ----------------------------------------------------------------------------- decoding

class SATRunner:
    """Prefill and decode with SAT's GLM130B the way filling_sequence calls it (mask True = masked)."""

    def __init__(self, model):
        from sat.generation.autoregressive_sampling import update_mems
        self.model, self.update_mems, self.mems = model, update_mems, None

    def _call(self, ids, positions, allowed):
        logits, *per_layer = self.model(input_ids=ids, position_ids=positions, attention_mask=~allowed,
                                        mems=self.mems, log_attention_weights=None, encoder_outputs=None)
        # filling_sequence: mem_kv of every layer -> update_mems -> (layers, b, cached length, 2*h/mp)
        self.mems = self.update_mems([o["mem_kv"] for o in per_layer], self.mems, max_memory_length=100000)
        return logits

    def prefill(self, ids, positions, allowed, total_length):
        self.mems = None
        return self._call(ids, positions, allowed)

    def step(self, ids, positions, allowed, start):
        assert self.mems.shape[2] == start, (self.mems.shape, start)
        return self._call(ids, positions, allowed)[:, -1]


def full_masks_and_positions(contexts: list[Context], total_length: int, device):
    """GLM attention mask (b, 1, T, T), True = allowed, and position ids (b, T) for prompt + generation.

    The whole-sequence tensors GLM-130B's get_masks_and_position_ids builds before filling_sequence
    slices them step by step: the context attends bidirectionally, generation causally, left padding
    is never attended, and [MASK] generations stay pinned to the mask's position.
    """
    ids, positions, _, pads = prefill_inputs(contexts, "cpu")
    length = ids.shape[1]
    query = torch.arange(total_length)[:, None]
    key = torch.arange(total_length)[None, :]
    glm = (key < length - 1) | (key <= query)  # (T, T)
    allowed = glm[None] & (key[None] >= pads[:, None, None])  # (b, T, T)
    later = torch.stack([next_positions(contexts, s) for s in range(1, total_length - length + 1)], dim=1) \
        if total_length > length else torch.zeros(len(contexts), 0, dtype=torch.long)
    return allowed[:, None].to(device), torch.cat([positions, later], dim=1).to(device), ids.to(device)


@torch.no_grad()
def sat_decode_loop(model, contexts: list[Context], new_tokens: int, device) -> dict:
    """Greedy decode with SAT's GLM130B in filling_sequence's shape; per-token timings in ms.

    Each step feeds `tokens[:, index:]` with the slices `position_ids[..., index:counter+1]` and
    `attention_mask[..., index:counter+1, :counter+1]` of the whole-sequence tensors, then concatenates
    the layers' `mem_kv` into `mems` (update_mems), takes the last logits, picks the next token and
    reads it back to the host (as filling_sequence's strategy does for its end-token check).

    Returns `prefill_ms` (host clock, prompt forward to the first token on the host), `step_ms` (one
    host-clock interval per generated token after the first: model call, update_mems and the pick),
    `forward_ms` (CUDA-event time of each decode step's model call alone; host clock on CPU) and `tokens`.
    """
    length = max(len(c.tokens) for c in contexts)
    total = length + new_tokens
    allowed, positions, tokens = full_masks_and_positions(contexts, total, device)
    masked = ~allowed  # SAT's convention: True = masked
    runner = SATRunner(model)
    cuda = torch.device(device).type == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    sync()
    started = time.perf_counter()
    logits = runner._call(tokens, positions[:, :length], allowed[..., :length, :length])
    chosen = logits[:, -1].argmax(dim=-1)
    generated = [chosen.tolist()]
    stamps = [time.perf_counter()]
    forward_ms = []
    counter = index = length  # counter: the position the next fed token occupies
    for _ in range(new_tokens - 1):
        tokens = torch.cat((tokens, chosen[:, None]), dim=1)
        if cuda:
            begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            begin.record()
        else:
            begin = time.perf_counter()
        logits, *per_layer = model(input_ids=tokens[:, index:], position_ids=positions[..., index:counter + 1],
                                   attention_mask=masked[..., index:counter + 1, :counter + 1], mems=runner.mems,
                                   log_attention_weights=None, encoder_outputs=None)
        if cuda:
            end.record()
        else:
            forward_ms.append((time.perf_counter() - begin) * 1e3)
        runner.mems = runner.update_mems([o["mem_kv"] for o in per_layer], runner.mems, max_memory_length=100000)
        counter += 1
        index = counter
        chosen = logits[:, -1].argmax(dim=-1)
        generated.append(chosen.tolist())  # the host sync filling_sequence's strategy also makes
        stamps.append(time.perf_counter())
        if cuda:
            forward_ms.append(begin.elapsed_time(end))
    step_ms = [(b - a) * 1e3 for a, b in zip(stamps, stamps[1:])]
    return {"prefill_ms": (stamps[0] - started) * 1e3, "step_ms": step_ms, "forward_ms": forward_ms,
            "tokens": torch.tensor(generated).T}


@torch.no_grad()
def time_sat_decode(model, prompts: dict[int, list[Context]], new_tokens: int, repeats: int, device,
                    world_size: int = 1) -> dict:
    """SAT's GLM130B on a glmkit `model`'s own weight tensors: logits agreement and decode timings.

    `model` is a glmkit GLM in fp16 (one tensor-parallel rank of `world_size`, in this process's group when
    world_size > 1); `prompts` maps each batch size to its contexts. SAT is built over the same tensors
    (load_sat_state_dict), checked against `model` on the first batch's first prompt (max abs logit
    difference of the prefill's last position), then timed with `sat_decode_loop`: one warm-up run of
    a few tokens, then `repeats` runs of `new_tokens`; medians over all steps of all runs.
    """
    import torch.distributed as dist

    # SAT's layers need its model-parallel state even at size 1, and that needs a process group.
    own_group = not dist.is_initialized()
    if own_group:
        from ..parallel.comm import free_port
        init_distributed(0, 1, free_port(), "nccl" if torch.device(device).type == "cuda" else "gloo")
    else:
        init_model_parallel(world_size)
    try:
        reference = load_sat_state_dict(model.config, model.state_dict(), world_size, device)
        first = next(iter(prompts.values()))[:1]
        ids, positions, allowed, _ = prefill_inputs(first, device)
        ours = model(ids, positions, allowed)[:, -1].float()
        theirs = reference(input_ids=ids, position_ids=positions, attention_mask=~allowed, mems=None)[0]
        records = []
        for batch, contexts in prompts.items():
            sat_decode_loop(reference, contexts, min(4, new_tokens), device)  # warm-up
            steps, forwards, prefills = [], [], []
            for _ in range(repeats):
                run = sat_decode_loop(reference, contexts, new_tokens, device)
                steps += run["step_ms"]
                forwards += run["forward_ms"]
                prefills.append(run["prefill_ms"])
            ms = statistics.median(steps)
            records.append({"batch": batch, "ms_per_token": ms, "forward_ms": statistics.median(forwards),
                            "prefill_ms": statistics.median(prefills), "tokens_per_s": batch * 1e3 / ms})
        del reference
    finally:
        if own_group:
            close_distributed()
    one = next((r for r in records if r["batch"] == 1), None)
    return {**{key: one[key] if one else None for key in ("ms_per_token", "forward_ms", "prefill_ms")},
            "batches": records,
            "prefill_max_abs_diff": float((theirs[:, -1].float() - ours).abs().max())}
