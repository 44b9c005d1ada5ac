"""Write the demo checkpoint: glm-tiny with deterministic random weights, 2 SAT shards, fp16.

A stand-in until the trained demo model lands: it exercises every format and code path (SAT layout,
repacking, tensor parallelism) but its text is noise. Usage: python scripts/make_demo_model.py
"""
from __future__ import annotations

import dataclasses
import shutil

import torch

from glmkit.checkpoint import save_checkpoint
from glmkit.config import load_config
from glmkit.model import GLM
from glmkit.tensor_parallel import split_tensor
from glmkit.tokenizer import GLMTokenizer

SEED = 1234
NUM_SHARDS = 2


def init_weights(model: GLM, seed: int, std: float = 0.02) -> None:
    """Normal(0, std) matrices and embeddings, zero biases, unit LayerNorms, from one seeded generator."""
    generator = torch.Generator().manual_seed(seed)
    for name, param in model.named_parameters():
        if "layernorm" in name:
            param.data.fill_(1.0 if name.endswith("weight") else 0.0)
        elif name.endswith("bias"):
            param.data.zero_()
        else:
            param.data.normal_(0.0, std, generator=generator)


def main() -> None:
    config = load_config("glm-tiny")
    tokenizer = GLMTokenizer.load(config.tokenizer)
    if tokenizer.num_tokens > config.model.vocab_size:
        raise SystemExit(f"tokenizer has {tokenizer.num_tokens} ids; raise vocab_size in glm-tiny.yaml")
    model = GLM(config.model)
    init_weights(model, SEED)
    state = {name: tensor.to(torch.float16) for name, tensor in model.state_dict().items()}
    shards = [{name: split_tensor(name, t, rank, NUM_SHARDS).clone() for name, t in state.items()}
              for rank in range(NUM_SHARDS)]
    if config.checkpoint.exists():
        shutil.rmtree(config.checkpoint)
    model_config = {**dataclasses.asdict(config.model), "model_parallel_size": NUM_SHARDS}
    save_checkpoint(config.checkpoint, shards, iteration=1, model_config=model_config)
    print(f"wrote {config.checkpoint}: {config.model.num_parameters():,} parameters in {NUM_SHARDS} shards")


if __name__ == "__main__":
    main()
