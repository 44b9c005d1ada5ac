"""Engine side of the cluster: one tensor-parallel rank kept resident in an ipyparallel engine.

The notebook (`glmkit.serve.cluster`) creates one `ShardWorker` per engine, then sends every call to all
engines at once as one request (glmkit.generate.request): each rank runs `request.run(worker, channel)` on
its shard. Ranks stay in lockstep because they run the same request in the same order; the only decision
that could differ between ranks, whether to stop early, is taken by rank 0 and broadcast. What travels back
follows the request's declared reduction: rank 0's result, or every rank's.
"""
from __future__ import annotations

import os
import socket
import time
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.distributed as dist

from ..config import KitConfig
from ..generate.pipeline import load_model, load_tokenizer
from ..generate.request import Channel
from ..generate.tokens import Generator
from ..parallel.comm import free_port, init_process_groups
from ..parallel.transform import parallelize

__all__ = ["ShardWorker", "LoadRequest", "StatusRequest", "describe_engine", "free_port", "run_request"]

# The name the worker is stored under in each engine's namespace (ipyparallel `Reference` target).
WORKER_NAME = "_glmkit_worker"
# Streamed events are published at most this often (rank 0); the rest come back with the result.
PUBLISH_INTERVAL_S = 0.05


def describe_engine() -> dict:
    """Where this engine runs: host, pid and visible GPUs (the client maps ranks to GPUs from this)."""
    return {"host": socket.gethostname(), "pid": os.getpid(),
            "gpus": torch.cuda.device_count() if torch.cuda.is_available() else 0}


def abort_key(call_id: str) -> str:
    return f"glmkit/abort/{call_id}"


def batch_key(call_id: str, number: int) -> str:
    """The datapub key of a call's `number`-th batch of streamed events."""
    return f"{call_id}/{number}"


def run_request(worker: "ShardWorker", call_id: str, request):
    """Run `request` on this engine's shard (sent to every engine with an ipyparallel Reference to the worker)."""
    return worker.handle(call_id, request)


def _publish(data: dict) -> None:
    try:
        from ipyparallel.datapub import publish_data

        publish_data(data)
    except Exception:
        # Outside an engine (a plain process in tests) there is no IOPub channel to publish on.
        pass


class EngineChannel(Channel):
    """A request's channel on an engine: rank 0 streams its events to the notebook in batches (deltas, each
    published once under its own key), and every rank follows rank 0's reading of the notebook's stop."""

    def __init__(self, worker: "ShardWorker", call_id: str):
        super().__init__()
        self.worker, self.call_id = worker, call_id
        self.pending: list = []
        self.published = 0  # batches sent so far
        self.last_publish = time.perf_counter()

    @property
    def streaming(self) -> bool:
        return self.worker.rank == 0

    def emit(self, event) -> None:
        self.pending.append(event)
        now = time.perf_counter()
        if now - self.last_publish >= PUBLISH_INTERVAL_S:
            _publish({batch_key(self.call_id, self.published): self.pending})
            self.pending, self.published, self.last_publish = [], self.published + 1, now

    def should_abort(self) -> bool:
        # Rank 0 looks for the notebook's stop request in the store; everyone follows its verdict at the same
        # step. The broadcast runs on the gloo control group: host work, overlapping the queued GPU step.
        worker = self.worker
        flag = torch.zeros(1, dtype=torch.int32)
        if worker.rank == 0 and worker.groups.store.check([abort_key(self.call_id)]):
            flag.fill_(1)
        if worker.world_size > 1:
            dist.broadcast(flag, src=0, group=worker.groups.control)
        return bool(flag.item())


class ShardWorker:
    """Holds one rank's model shard (in a Generator), its tokenizer and its process groups between calls."""

    def __init__(self, rank: int, world_size: int, device: str, store_host: str, store_port: int,
                 timeout_s: float = 300.0, env: dict | None = None):
        os.environ.update(env or {})  # NCCL_* settings must be in place before the group starts
        # A shard loaded tensor by tensor (quantized while loading) leaves the caching allocator's blocks
        # fragmented: on an 80 GB card holding GLM-130B in INT4, a 3.3 GB KV cache then fails with 12 GB
        # free. Growable segments avoid that; this must be set before the engine's first CUDA allocation.
        os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
        self.rank, self.world_size = rank, world_size
        self.device = torch.device(device)
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        else:
            # CPU engines share the host's cores: each using all of them makes every rank slower.
            torch.set_num_threads(max(1, (os.cpu_count() or 1) // world_size))
        self.groups = init_process_groups(rank, world_size, self.device, store_host, store_port, timeout_s)
        self.generator: Generator | None = None
        self.tokenizer = None
        self.config: KitConfig | None = None
        self.load_seconds = 0.0

    @property
    def model(self):
        return None if self.generator is None else self.generator.model

    @property
    def group(self):
        """The process group the model's collectives use (probes combine their per-rank results over it)."""
        return self.groups.data

    def handle(self, call_id: str, request):
        """Run one request on this shard; what it returns follows the request's reduction."""
        if getattr(request, "needs_model", True) and self.generator is None:
            raise RuntimeError("no model loaded on this engine: call cluster.load(config) first")
        channel = EngineChannel(self, call_id)
        result = request.run(self, channel)
        if request.reduction == "all":
            return result
        return (result, channel.published, channel.pending) if self.rank == 0 else None

    def install(self, model, tokenizer, config: KitConfig | None = None) -> None:
        """Make `model` (this rank's shard, already parallelized) the one requests run on."""
        self.generator = Generator(model)
        self.tokenizer, self.config = tokenizer, config

    def load(self, config: KitConfig) -> dict:
        """Load this rank's shard of `config`'s checkpoint (repacked on the fly) onto this engine's device."""
        started = time.perf_counter()
        self.generator = None  # free the previous model (and its graphs) before loading the next
        config = config.replace(device=str(self.device))
        model = load_model(config, self.rank, self.world_size)
        self.install(parallelize(model, self.rank, self.world_size, self.groups.data), load_tokenizer(config), config)
        self.load_seconds = time.perf_counter() - started
        return self.status()

    def status(self) -> dict:
        """Rank, device, shard, load time and memory of this engine."""
        import psutil

        info = {"rank": self.rank, "world_size": self.world_size, "device": str(self.device),
                "shard": f"{self.rank + 1}/{self.world_size}",
                "model": self.config.name if self.config else None,
                "load_seconds": round(self.load_seconds, 3),
                "host_rss_gb": psutil.Process().memory_info().rss / 2**30}
        if self.device.type == "cuda":
            info["gpu_allocated_gb"] = torch.cuda.memory_allocated(self.device) / 2**30
            info["gpu_peak_gb"] = torch.cuda.max_memory_allocated(self.device) / 2**30
        if self.model is not None:
            info["parameters_local"] = sum(p.numel() for p in self.model.parameters())
        return info

    def close(self) -> None:
        """Release the model and leave the process groups."""
        self.generator = None
        self.groups.close()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()


@dataclass(frozen=True)
class LoadRequest:
    """Load `config`'s checkpoint on every engine, each its own shard; every rank's status comes back."""

    config: KitConfig
    reduction: ClassVar[str] = "all"
    needs_model: ClassVar[bool] = False

    def run(self, worker: ShardWorker, channel: Channel) -> dict:
        return worker.load(self.config)


@dataclass(frozen=True)
class StatusRequest:
    """Every engine's status row."""

    reduction: ClassVar[str] = "all"
    needs_model: ClassVar[bool] = False

    def run(self, worker: ShardWorker, channel: Channel) -> dict:
        return worker.status()
