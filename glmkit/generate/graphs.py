"""Fixed-shape decode steps, replayed from CUDA graphs so a token costs one launch instead of hundreds.

At batch 1 a decode step is hundreds of small kernels per token; launching them from Python costs more
than the weights take to stream on a fast GPU. `StepGraphs` keeps, per (batch size, cache length), a KV
cache and a captured decode step whose inputs are copied into fixed buffers before each replay. On CPU
(or with `use_graphs=False`) the same fixed-shape step runs eagerly, so every device decodes the same way.
"""
from __future__ import annotations

import torch

from ..model import GLM, KVCache

# Cache lengths are rounded up to this, so calls with similar lengths reuse one captured graph.
LENGTH_BUCKET = 256
# Each kept step holds a KV cache; beyond this many shapes the least recently used is dropped.
MAX_KEPT_STEPS = 4


class DecodeStep:
    """One fixed-shape decode step for `batch_size` sequences over a cache of `length` positions."""

    def __init__(self, model: GLM, batch_size: int, length: int, use_graphs: bool):
        self.model = model
        self.cache = KVCache.allocate(model, batch_size, length)
        device = self.cache.keys.device
        b = batch_size
        # One int64 buffer holds a step's inputs, [ids (b) | positions (b) | left pads (b) | cache slot], so
        # each step costs one host-to-device copy (from pinned memory on a GPU); the attention mask is
        # computed from pads and slot inside the step. Decoding is latency-bound: host work is GPU idle time.
        self.inputs = torch.zeros(3 * b + 1, dtype=torch.long, device=device)
        self.staging = torch.zeros(3 * b + 1, dtype=torch.long, pin_memory=device.type == "cuda")
        self.ids = self.inputs[:b].view(b, 1)
        self.positions = self.inputs[b:2 * b].view(b, 1)
        self.pads = self.inputs[2 * b:3 * b]
        self.index = self.inputs[3 * b:]
        self.keys = torch.arange(length, device=device)
        self.copied = torch.cuda.Event() if device.type == "cuda" else None  # the staging buffer's last copy
        self.graph = None
        self.logits = None
        if use_graphs:
            self._capture()

    @property
    def batch_size(self) -> int:
        return self.pads.shape[0]

    @property
    def allowed(self) -> torch.Tensor:
        """(b, 1, 1, length): the cache slots each row may attend to (its own tokens up to the current slot)."""
        return ((self.keys >= self.pads[:, None]) & (self.keys <= self.index))[:, None, None]

    def run_eager(self) -> torch.Tensor:
        """The step on the current input buffers, launched op by op (what the graph recorded)."""
        return self.model(self.ids, self.positions, self.allowed, self.cache, self.index)[:, -1]

    def replay(self) -> torch.Tensor:
        """The step on the current input buffers: a graph replay where captured, else eager."""
        if self.graph is None:
            return self.run_eager()
        self.graph.replay()
        return self.logits

    def _capture(self) -> None:
        # Warm up on a side stream (allocator and library handles settle), then record the step. The
        # garbage this writes into cache slot 0 is overwritten by the next prefill.
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side), torch.inference_mode():
            for _ in range(2):
                self.run_eager()
        torch.cuda.current_stream().wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph), torch.inference_mode():
            self.logits = self.run_eager()

    @torch.inference_mode()
    def __call__(self, ids: torch.Tensor, positions: torch.Tensor, index: int, pads: torch.Tensor) -> torch.Tensor:
        """Logits (b, vocab) for tokens `ids` (b, 1) at `positions` (b, 1), written at cache slot `index`.

        Row r attends to slots pads[r] .. index: its left padding is hidden. `ids` may already be on the
        device (the tokens just chosen there): then the step is queued without waiting for the host.
        With graphs the logits are the step's fixed output buffer, overwritten by the next call.
        """
        b = self.batch_size
        staging = self.staging
        if self.copied is not None:
            self.copied.synchronize()  # the previous asynchronous copy has read the staging buffer
        on_device = ids.device == self.inputs.device and ids.device.type != "cpu"
        if not on_device:
            staging[:b] = ids.view(-1)
        staging[b:2 * b] = positions.view(-1)
        staging[2 * b:3 * b] = pads
        staging[3 * b] = index
        self.inputs.copy_(staging, non_blocking=True)
        if on_device:
            self.inputs[:b].copy_(ids.view(-1))
        if self.copied is not None:
            self.copied.record()
        return self.replay()


class StepGraphs:
    """The decode steps of one model, kept between calls (a Generator owns one)."""

    def __init__(self, model: GLM, use_graphs: bool | None = None):
        device = model.transformer.word_embeddings.weight.device
        self.model = model
        self.use_graphs = device.type == "cuda" if use_graphs is None else use_graphs
        self.steps: dict[tuple[int, int], DecodeStep] = {}

    def step_for(self, batch_size: int, needed_length: int) -> DecodeStep:
        """A decode step (and its cache) for `batch_size` rows holding at least `needed_length` positions."""
        limit = self.model.config.max_sequence_length
        length = min(max(needed_length, -(-needed_length // LENGTH_BUCKET) * LENGTH_BUCKET), limit)
        length = max(length, needed_length)
        key = (batch_size, length)
        step = self.steps.pop(key, None)
        if step is None:
            while len(self.steps) >= MAX_KEPT_STEPS:
                self.steps.pop(next(iter(self.steps)))  # dicts keep insertion order: oldest first
            step = DecodeStep(self.model, batch_size, length, self.use_graphs)
        self.steps[key] = step  # re-inserted: now the most recently used
        return step

    def clear(self) -> None:
        """Drop every captured step and its cache (frees GPU memory)."""
        self.steps.clear()
