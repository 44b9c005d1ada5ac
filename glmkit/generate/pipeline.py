"""Build and load a GLM from a run config, and generate text with it in this process."""
from __future__ import annotations

from pathlib import Path
from typing import Callable

import torch

from ..checkpoint import load_rank_state_dict
from ..config import KitConfig, load_config
from ..inspect.calls import ProbeCalls
from ..model import GLM
from ..quantization import convert_for_runtime
from ..tokenizer import GLMTokenizer
from .blanks import GenerationResult, TextEvent, check_callbacks
from .request import Channel, GenerateRequest
from .tokens import Generator


def _check_device(device: str) -> torch.device:
    try:
        device = torch.device(device)
    except RuntimeError as error:
        raise ValueError(f"bad device {device!r}: {error}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"config asks for device {device} but this machine has no CUDA GPU; "
                         f"set device: cpu")
    return device


def load_model(config: KitConfig, rank: int = 0, world_size: int = 1) -> GLM:
    """The model of `config` (or one tensor-parallel rank of it) with its checkpoint weights loaded.

    With `config.quantization` set, the four linear kinds are QuantizedLinear: a checkpoint quantized that
    way is read as is, an unquantized one is quantized while loading, weight by weight, on the target device.
    """
    if config.checkpoint is None:
        raise ValueError(f"config {config.name!r} names no checkpoint folder; set `checkpoint:` in it")
    device = _check_device(config.device)
    bits = config.quantization_bits
    # Tensors go to the device as they are read (and are quantized there), so host RAM never holds the model.
    state = load_rank_state_dict(config.checkpoint, config.model, rank, world_size, dtype=config.torch_dtype,
                                 quantization=bits, device=device)
    # Build on the meta device and adopt the loaded tensors, so the model never exists twice in memory.
    with torch.device("meta"):
        model = GLM(config.model)
    if bits is not None:
        convert_for_runtime(model, bits)
    if world_size > 1:
        from ..parallel.transform import resize_for_rank
        resize_for_rank(model, world_size)
    model.load_state_dict(state, strict=True, assign=True)
    return model.to(device).eval()


def load_tokenizer(config: KitConfig) -> GLMTokenizer:
    """The tokenizer of `config`: its folder, or icetk's standard location when it names none."""
    return GLMTokenizer.load(config.tokenizer)


class GLMPipeline(ProbeCalls):
    """A model and its tokenizer in this process: `generate()` fills blanks in one or more prompts; `trace()`,
    `logit_lens()` and `patch()` look inside (glmkit.inspect)."""

    # Where this shard is, said as an engine's ShardWorker says it: the whole model, rank 0 of 1, no group.
    rank, world_size, group = 0, 1, None

    def __init__(self, model: GLM, tokenizer: GLMTokenizer, config: KitConfig | None = None):
        if tokenizer.num_tokens > model.config.vocab_size:
            raise ValueError(f"tokenizer has {tokenizer.num_tokens} ids but the model's vocab_size is "
                             f"{model.config.vocab_size}: they do not belong together")
        self.tokenizer = tokenizer
        self.config = config
        # The generator's decode steps (CUDA graphs, KV caches) and kernels live as long as the model.
        self.generator = Generator(model)

    @property
    def model(self) -> GLM:
        return self.generator.model

    @classmethod
    def from_config(cls, config: str | Path | KitConfig = "glm-tiny", **overrides) -> "GLMPipeline":
        """Load a config by name or path (e.g. 'glm-tiny'), with optional field overrides such as dtype."""
        if not isinstance(config, KitConfig):
            config = load_config(config)
        if overrides:
            config = config.replace(**overrides)
        return cls(load_model(config), load_tokenizer(config), config)

    def generate(self, prompts: str | list[str] | GenerateRequest, *,
                 on_text: Callable[[TextEvent], None] | None = None,
                 should_abort: Callable[[], bool] | None = None,
                 **kwargs) -> GenerationResult | list[GenerationResult]:
        """Fill the blanks of a prompt (or a list of prompts); keyword names follow HF `generate()`."""
        request = prompts if isinstance(prompts, GenerateRequest) else self.request(prompts, **kwargs)
        check_callbacks(on_text, should_abort)  # as GLMCluster.generate checks them
        results = self.run(request, Channel(on_text, should_abort))
        return results[0] if request.single else results

    def request(self, prompts: str | list[str], **kwargs) -> GenerateRequest:
        """The validated request of a generate() call (what the pipeline and the cluster both run)."""
        return GenerateRequest.build(self.tokenizer, self.model.config.max_sequence_length, prompts, **kwargs)

    def run(self, request, channel: Channel | None = None):
        """Run any request kind here, as every engine of a cluster would (glmkit.generate.request)."""
        return request.run(self, channel or Channel())

    @property
    def _probe_config(self):
        return self.model.config

    def _run_probe(self, request):
        return self.run(request)


def load(config: str | Path | KitConfig = "glm-tiny", **overrides) -> GLMPipeline:
    """Shortcut for `GLMPipeline.from_config`."""
    return GLMPipeline.from_config(config, **overrides)
