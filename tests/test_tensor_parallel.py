"""A live tensor-parallel model (2 gloo processes) computes the same logits and tokens as one process."""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from glmkit.config import load_config
from glmkit.generate.tokens import Context, generate_tokens, prefill_inputs
from glmkit.generate.pipeline import load_model
from glmkit.generate.sampling import GenerationSettings
from glmkit.parallel.comm import free_port
from glmkit.parallel.transform import parallelize

CONTEXT = Context(tuple(range(20050, 20080)) + (22004,), None)


def _rank_main(rank: int, world_size: int, port: int, results: dict) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size)
    try:
        config = load_config("glm-tiny")
        model = parallelize(load_model(config, rank, world_size), rank, world_size, group=dist.group.WORLD)
        ids, positions, allowed, _ = prefill_inputs([CONTEXT], "cpu")
        logits = model(ids, positions, allowed)
        tokens = generate_tokens(model, [CONTEXT], GenerationSettings(max_new_tokens=8), end_tokens=())[0].tokens
        results[rank] = (logits, tokens)
    finally:
        dist.destroy_process_group()


def test_two_rank_logits_and_greedy_tokens_match_single_process():
    config = load_config("glm-tiny")
    model = load_model(config)
    ids, positions, allowed, _ = prefill_inputs([CONTEXT], "cpu")
    expected = model(ids, positions, allowed)
    expected_tokens = generate_tokens(model, [CONTEXT], GenerationSettings(max_new_tokens=8), end_tokens=())[0].tokens
    with mp.Manager() as manager:
        results = manager.dict()
        mp.spawn(_rank_main, args=(2, free_port(), results), nprocs=2, join=True)
        results = dict(results)
    for rank in range(2):
        logits, tokens = results[rank]
        assert logits.shape == expected.shape
        # The row-parallel layers sum two partial products instead of one: fp32 rounding of the other order,
        # about 1e-6 of the logits' scale (|logits| reach ~21 here), grows through 8 layers.
        scale = expected.abs().max().item()
        assert torch.allclose(logits, expected, rtol=0, atol=2e-6 * scale), (logits - expected).abs().max()
        assert tokens == expected_tokens
