"""Engine side of the cluster: one tensor-parallel rank kept resident in an ipyparallel engine.

The notebook (`glmkit.serve.cluster`) creates one `ShardWorker` per engine and then calls its methods on every
engine at once. Ranks stay in lockstep because each makes the same calls in the same order; the only
decision that could differ between ranks, whether to stop early, is taken by rank 0 and broadcast.
"""
from __future__ import annotations

import os
import socket
import time
from datetime import timedelta

import torch
import torch.distributed as dist

from ..config import KitConfig
from ..generate.graphs import StepGraphs
from ..generate.blanks import TextEvent, fill_blanks
from ..generate.pipeline import load_model, load_tokenizer
from ..generate.sampling import GenerationSettings
from ..tensor_parallel import parallelize

# The name the worker is stored under in each engine's namespace (ipyparallel `Reference` target).
WORKER_NAME = "_glmkit_worker"
# Streamed events are published at most this often; the last ones also come back with the result.
PUBLISH_INTERVAL_S = 0.05


def describe_engine() -> dict:
    """Where this engine runs: host, pid and visible GPUs (the client maps ranks to GPUs from this)."""
    return {"host": socket.gethostname(), "pid": os.getpid(),
            "gpus": torch.cuda.device_count() if torch.cuda.is_available() else 0}


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that is free on this engine's host, for the rank-0 rendezvous store."""
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def abort_key(call_id: str) -> str:
    return f"glmkit/abort/{call_id}"


def call_worker(worker: "ShardWorker", method: str, *args, **kwargs):
    """Run `worker.method(*args, **kwargs)` (sent to engines with an ipyparallel Reference to the worker)."""
    return getattr(worker, method)(*args, **kwargs)


def _publish(data: dict) -> None:
    try:
        from ipyparallel.datapub import publish_data
    except ImportError:  # pragma: no cover - ipyparallel is a dependency
        return
    try:
        publish_data(data)
    except Exception:
        # Outside an engine (a plain process in tests) there is no IOPub channel to publish on.
        pass


class ShardWorker:
    """Holds one rank's model shard, its tokenizer and its process group between calls."""

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
        timeout = timedelta(seconds=timeout_s)
        self.store = dist.TCPStore(store_host, store_port, world_size, is_master=rank == 0, timeout=timeout,
                                   wait_for_workers=False)
        backend = "nccl" if self.device.type == "cuda" else "gloo"
        if dist.is_initialized():
            # A previous worker in this engine process left its group: replace it.
            dist.destroy_process_group()
        dist.init_process_group(backend, store=self.store, rank=rank, world_size=world_size, timeout=timeout)
        self.group = dist.group.WORLD
        self.model = None
        self.steps: StepGraphs | None = None
        self.tokenizer = None
        self.config: KitConfig | None = None
        self.load_seconds = 0.0

    def load(self, config: KitConfig) -> dict:
        """Load this rank's shard of `config`'s checkpoint (repacked on the fly) onto this engine's device."""
        started = time.perf_counter()
        self.model = self.steps = None  # free the previous model (and its graphs) before loading the next
        config = config.replace(device=str(self.device))
        model = load_model(config, self.rank, self.world_size)
        self.model = parallelize(model, self.rank, self.world_size, self.group)
        self.steps = StepGraphs(self.model) if self.device.type == "cuda" else None
        self.tokenizer = load_tokenizer(config)
        self.config = config
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

    def _should_abort(self, call_id: str) -> bool:
        # Rank 0 looks for the notebook's stop request; everyone follows its verdict at the same step.
        flag = torch.zeros(1, dtype=torch.int32, device=self.device)
        if self.rank == 0 and self.store.check([abort_key(call_id)]):
            flag.fill_(1)
        if self.world_size > 1:
            dist.broadcast(flag, src=0, group=self.group)
        return bool(flag.item())

    def generate(self, call_id: str, prompts: list[str], kwargs: dict):
        """Fill the prompts' blanks in lockstep; rank 0 streams events and returns (results, events)."""
        if self.model is None:
            raise RuntimeError("no model loaded on this engine: call cluster.load(config) first")
        settings = GenerationSettings.from_kwargs(**kwargs)
        events: list[TextEvent] = []
        last_publish = [0.0]

        def collect(event: TextEvent) -> None:
            events.append(event)
            now = time.perf_counter()
            if now - last_publish[0] >= PUBLISH_INTERVAL_S:
                _publish({"call": call_id, "events": list(events)})
                last_publish[0] = now

        results = fill_blanks(self.model, self.tokenizer, prompts, settings,
                              on_text=collect if self.rank == 0 else None,
                              should_abort=lambda: self._should_abort(call_id), steps=self.steps)
        return (results, events) if self.rank == 0 else None

    def close(self) -> None:
        """Release the model and leave the process group."""
        self.model = self.steps = None
        if dist.is_initialized():
            dist.destroy_process_group()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
