"""Model architecture and run configuration: frozen dataclasses, named presets, YAML overrides."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

import torch
import yaml

REPO_ROOT = Path(__file__).resolve().parent.parent
CONFIG_DIR = REPO_ROOT / "configs"

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
# Weight-only quantization modes (glmkit.quantization) and their bit widths; None means unquantized.
QUANTIZATION_BITS = {"int8": 8, "int4": 4}
ROTARY_PRECISIONS = ("sat", "fp32")  # GLMConfig.rotary_precision


@dataclass(frozen=True)
class GLMConfig:
    """Architecture of a GLM-130B-style model (post-LN DeepNorm, GeGLU, rotary, tied embeddings)."""

    num_layers: int
    hidden_size: int
    num_attention_heads: int
    inner_hidden_size: int
    vocab_size: int
    max_sequence_length: int = 2048
    layernorm_epsilon: float = 1e-5
    rotary_base: float = 10000.0
    # "sat": rotary tables as SAT's GLM130B computes them in the dtype the model runs in, frequencies
    # rounded to fp16/bf16 (what the official model computes; it differs from exact rotary at long
    # context); "fp32": exact frequencies (glmkit.model.rotary_tables).
    rotary_precision: str = "sat"

    def __post_init__(self):
        for name in ("num_layers", "hidden_size", "num_attention_heads", "inner_hidden_size",
                     "vocab_size", "max_sequence_length"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"GLMConfig.{name} must be a positive integer, got {value!r}")
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(f"hidden_size {self.hidden_size} is not divisible by "
                             f"num_attention_heads {self.num_attention_heads}")
        if self.head_dim % 2:
            raise ValueError(f"rotary embedding needs an even head dim, got {self.head_dim}")
        if self.rotary_precision not in ROTARY_PRECISIONS:
            raise ValueError(f"GLMConfig.rotary_precision must be one of {list(ROTARY_PRECISIONS)}, "
                             f"got {self.rotary_precision!r}")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def deepnorm_alpha(self) -> float:
        # DeepNorm scales the residual branch so 70 post-LN layers train stably.
        return (2 * self.num_layers) ** 0.5

    def num_parameters(self) -> int:
        """Number of parameters of the full (unsharded) model."""
        h, f = self.hidden_size, self.inner_hidden_size
        per_layer = (3 * h * h + 3 * h) + (h * h + h) + (2 * f * h + 2 * f) + (f * h + h) + 4 * h
        return self.vocab_size * h + self.num_layers * per_layer + 2 * h

    def check_shardable(self, num_shards: int) -> None:
        """Raise ValueError unless this model can be split into `num_shards` tensor-parallel ranks."""
        if num_shards < 1:
            raise ValueError(f"shard count must be at least 1, got {num_shards}")
        for what, size in (("num_attention_heads", self.num_attention_heads),
                           ("vocab_size", self.vocab_size),
                           ("inner_hidden_size", self.inner_hidden_size)):
            if size % num_shards:
                raise ValueError(f"{num_shards} shards do not divide {what}={size}; "
                                 f"choose a shard count that divides it")

    @classmethod
    def from_dict(cls, values: dict) -> "GLMConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown model config keys {unknown}; known keys: {sorted(known)}")
        return cls(**values)


PRESETS: dict[str, GLMConfig] = {
    "glm-130b": GLMConfig(num_layers=70, hidden_size=12288, num_attention_heads=96,
                          inner_hidden_size=32768, vocab_size=150528, max_sequence_length=2048),
}


def check_precision(dtype: str, quantization: str | None) -> None:
    """ValueError unless `dtype` is a known activation dtype and `quantization` None or a known mode."""
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    if quantization is not None and quantization not in QUANTIZATION_BITS:
        raise ValueError(f"quantization must be one of {sorted(QUANTIZATION_BITS)} or None, got {quantization!r}")


@dataclass(frozen=True)
class KitConfig:
    """What to load and how: architecture, checkpoint folder, tokenizer folder, dtype, device, quantization."""

    name: str
    model: GLMConfig
    checkpoint: Path | None = None
    tokenizer: Path | None = None
    dtype: str = "fp32"
    device: str = "cpu"
    extra: dict = field(default_factory=dict)
    # None, "int8" or "int4": weight-only quantization of the four linear weights of each layer. A quantized
    # checkpoint is loaded as is; an fp16 one is quantized while loading. Activations use `dtype`.
    quantization: str | None = None

    def __post_init__(self):
        check_precision(self.dtype, self.quantization)

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    @property
    def quantization_bits(self) -> int | None:
        """8 or 4 when the weights are quantized, else None."""
        return None if self.quantization is None else QUANTIZATION_BITS[self.quantization]

    def replace(self, **changes) -> "KitConfig":
        return dataclasses.replace(self, **changes)


def _resolve(base: Path, value: str | None) -> Path | None:
    if value is None:
        return None
    path = Path(value).expanduser()
    return path if path.is_absolute() else (base / path).resolve()


def load_config(name_or_path: str | Path) -> KitConfig:
    """Load a YAML run config: a file path, or a name under configs/ such as 'glm-tiny'."""
    path = Path(name_or_path)
    if not path.suffix:
        path = CONFIG_DIR / f"{name_or_path}.yaml"
    if not path.is_file():
        available = sorted(p.stem for p in CONFIG_DIR.glob("*.yaml"))
        raise FileNotFoundError(f"no config file {path}; pass a YAML path or one of {available}")
    raw = yaml.safe_load(path.read_text()) or {}
    if not isinstance(raw, dict):
        raise ValueError(f"{path}: expected a mapping at the top level")
    model_values = dict(raw.pop("model", {}) or {})
    preset = model_values.pop("preset", None)
    if preset is not None:
        if preset not in PRESETS:
            raise ValueError(f"{path}: unknown preset {preset!r}; known presets: {sorted(PRESETS)}")
        model_values = {**dataclasses.asdict(PRESETS[preset]), **model_values}
    try:
        model = GLMConfig.from_dict(model_values)
    except (TypeError, ValueError) as error:
        raise ValueError(f"{path}: bad model section: {error}") from None
    base = path.parent
    known = {"name", "checkpoint", "tokenizer", "dtype", "device", "quantization"}
    return KitConfig(
        name=raw.get("name", path.stem),
        model=model,
        checkpoint=_resolve(base, raw.get("checkpoint")),
        tokenizer=_resolve(base, raw.get("tokenizer")),
        dtype=raw.get("dtype", "fp32"),
        device=raw.get("device", "cpu"),
        quantization=raw.get("quantization"),
        extra={k: v for k, v in raw.items() if k not in known},
    )
