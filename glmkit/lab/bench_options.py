"""What `glmkit bench` measures: BenchOptions (checked on construction), the config a name or path stands for,
the default device, and the checks that fail fast before any GPU work. The measuring is glmkit.lab.bench's."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

import torch

from ..config import PRESETS, GLMConfig, check_precision, load_config


@dataclass(frozen=True)
class BenchModel:
    """The random model a benchmark builds: architecture, precision and device (decode and score benches)."""

    config: GLMConfig
    config_name: str = "custom"
    dtype: str = "fp16"
    device: str = "cuda"
    quantization: str | None = None  # None, "int8" or "int4"

    def __post_init__(self):
        check_precision(self.dtype, self.quantization)


@dataclass(frozen=True)
class BenchOptions(BenchModel):
    """What to measure: the model, parallelism and run lengths."""

    tp: int = 1
    batches: tuple[int, ...] = (1,)
    prompt_tokens: int = 128
    new_tokens: int = 64
    repeats: int = 3
    copy_bytes: int | None = None  # None: 1 GiB on CUDA, 64 MiB on CPU
    against: str | None = None  # "sat": SAT's GLM130B on the same weights
    seed: int = 0
    verify_context: bool = False
    kernel_configs: str | None = None  # tuned quantized-kernel launch parameters (None: the shipped file)
    all_reduce: str = "auto"  # "auto": symmetric memory for small GPU all-reduces where available; "nccl"

    def __post_init__(self):
        super().__post_init__()
        object.__setattr__(self, "batches", tuple(self.batches))
        if not self.batches or any(b < 1 for b in self.batches):
            raise ValueError(f"batches must be positive sizes, got {self.batches}")
        if self.tp < 1:
            raise ValueError(f"tp must be at least 1, got {self.tp}")
        self.config.check_shardable(self.tp)
        if self.prompt_tokens < 1 or self.new_tokens < 2 or self.repeats < 1:
            raise ValueError("prompt_tokens >= 1, new_tokens >= 2 and repeats >= 1 are needed")
        if self.prompt_tokens + self.new_tokens > self.config.max_sequence_length:
            raise ValueError(f"prompt_tokens + new_tokens = {self.prompt_tokens + self.new_tokens} exceeds "
                             f"max_sequence_length {self.config.max_sequence_length}")
        if self.against not in (None, "sat"):
            raise ValueError(f"against must be None or 'sat', got {self.against!r}")
        if self.against == "sat" and (self.dtype != "fp16" or self.quantization is not None):
            raise ValueError("--against sat needs --dtype fp16 without quantization: SAT's GLM130B runs fp16 "
                             "only (it casts attention probabilities with .half())")
        if self.all_reduce not in ("auto", "nccl"):
            raise ValueError(f"all_reduce must be 'auto' or 'nccl', got {self.all_reduce!r}")
        if self.kernel_configs is not None and not Path(self.kernel_configs).is_file():
            raise ValueError(f"kernel_configs {self.kernel_configs!r} is not a file; write one with "
                             f"scripts/bench_quant.py kernels --write-configs PATH")
        if self.verify_context and self.tp > 1:
            raise ValueError("verify_context runs at tp=1 only (an out-of-memory on one rank would leave the "
                             "others waiting in a collective)")


def default_device() -> str:
    """Where a benchmark runs unless told otherwise: the first GPU if there is one, else the CPU."""
    return "cuda:0" if torch.cuda.is_available() else "cpu"


def resolve_config(name_or_path: str, layers: int | None = None):
    """(name, GLMConfig, KitConfig or None) for a preset name, a config under configs/ or a YAML path."""
    kit = None
    try:
        kit = load_config(name_or_path)
        config = kit.model
    except FileNotFoundError:
        if name_or_path not in PRESETS:
            raise FileNotFoundError(f"{name_or_path!r} is neither a preset ({sorted(PRESETS)}) nor a config "
                                    f"name under configs/ nor a YAML path") from None
        config = PRESETS[name_or_path]
    if layers is not None:
        config = dataclasses.replace(config, num_layers=layers)
    name = Path(name_or_path).stem if kit is None else kit.name
    return name, config, kit


def check_can_run(options: BenchOptions) -> None:
    """Fail fast, before any GPU work, on what would fail later (missing GPUs, SAT, quantization)."""
    device = torch.device(options.device)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {options.device} asked for, but this machine has no CUDA GPU; "
                             f"use --device cpu")
        if options.tp > torch.cuda.device_count():
            raise ValueError(f"--tp {options.tp} needs {options.tp} GPUs; {torch.cuda.device_count()} visible")
    if options.against == "sat":
        from .sat_reference import require_sat
        require_sat(need_cuda=True)
