"""Communication for tensor-parallel ranks: process-group set-up (one helper for engines, bench, tests and
scripts), a free rendezvous port, and the all-reduce of decode-sized activations.
"""
from __future__ import annotations

import logging
import socket
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

log = logging.getLogger("glmkit")


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that is free on this host now, for a rank-0 rendezvous store."""
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


@dataclass
class ProcessGroups:
    """The groups of one rank: `data` carries the model's collectives (NCCL on GPUs, gloo on CPUs), `control`
    the host-side agreements between ranks (a stop request), always gloo, so they never wait on the GPU."""

    rank: int
    world_size: int
    store: dist.TCPStore
    data: dist.ProcessGroup
    control: dist.ProcessGroup

    def close(self) -> None:
        """Leave the groups (destroys the default group this process joined)."""
        if dist.is_initialized():
            dist.destroy_process_group()


def init_process_groups(rank: int, world_size: int, device: torch.device, store_host: str, store_port: int,
                        timeout_s: float = 300.0) -> ProcessGroups:
    """Join `world_size` ranks through a TCP store that rank 0 hosts on store_host:store_port (collective)."""
    timeout = timedelta(seconds=timeout_s)
    store = dist.TCPStore(store_host, store_port, world_size, is_master=rank == 0, timeout=timeout,
                          wait_for_workers=False)
    if dist.is_initialized():
        # A previous worker in this (long-lived engine) process left its group: replace it.
        dist.destroy_process_group()
    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(backend, store=store, rank=rank, world_size=world_size, timeout=timeout)
    data = dist.group.WORLD
    control = dist.new_group(backend="gloo", timeout=timeout) if backend == "nccl" else data
    return ProcessGroups(rank, world_size, store, data, control)


# Activations up to this size are summed by one-shot peer reads over NVLink instead of NCCL: a decode step
# all-reduces (batch, 1, hidden) twice a layer, and NCCL's latency for such small messages (about 20 us
# inside a CUDA graph on 4 H200s) made up a fifth of a 70-layer TP=4 step.
SYMMETRIC_MAX_BYTES = 1 << 20


class AllReduce:
    """In-place sum over the ranks of `group`: torch symmetric memory (one shot) for small GPU tensors, else NCCL.

    Make one with `AllReduce.setup` (collective). Symmetric memory is used only if every rank could set it up,
    so the ranks never disagree on which collective to call.
    """

    def __init__(self, group, buffer: torch.Tensor | None = None):
        self.group = group
        self.buffer = buffer  # the symmetric-memory staging buffer, or None for NCCL alone

    @classmethod
    def setup(cls, group, device: torch.device, dtype: torch.dtype, symmetric: bool = True,
              max_bytes: int = SYMMETRIC_MAX_BYTES) -> "AllReduce":
        """Collective: every rank of `group` calls it together; agrees on symmetric memory or NCCL."""
        buffer = None
        if symmetric and device.type == "cuda" and dist.get_world_size(group) > 1:
            buffer = cls._symmetric_buffer(group, device, dtype, max_bytes)
            agreed = torch.tensor([buffer is not None], dtype=torch.int32, device=device)
            dist.all_reduce(agreed, op=dist.ReduceOp.MIN, group=group)
            if not agreed.item():
                buffer = None
        return cls(group, buffer)

    @staticmethod
    def _symmetric_buffer(group, device, dtype, max_bytes):
        try:
            from torch.distributed import _symmetric_memory as symm_mem

            if not hasattr(torch.ops.symm_mem, "one_shot_all_reduce_out"):
                return None
            buffer = symm_mem.empty(max_bytes // torch.empty(0, dtype=dtype).element_size(), dtype=dtype,
                                    device=device)
            symm_mem.rendezvous(buffer, group.group_name)
            # A first sum, which also tells whether this torch has the op for `dtype` (torch 2.11 has it for
            # fp32 and bf16, not fp16). A missing dtype fails in dispatch, on every rank alike, before any
            # rank waits for another.
            probe = buffer[:8]
            probe.fill_(1)
            torch.ops.symm_mem.one_shot_all_reduce_out(probe, "sum", group.group_name, torch.empty_like(probe))
            return buffer
        except Exception as error:  # no peer access, an older torch, a dtype without the op: NCCL serves
            log.info("symmetric-memory all-reduce unavailable (%s); using NCCL", error)
            return None

    @property
    def symmetric(self) -> bool:
        return self.buffer is not None

    def __call__(self, tensor: torch.Tensor) -> torch.Tensor:
        buffer = self.buffer
        if (buffer is not None and tensor.dtype == buffer.dtype and tensor.is_contiguous()
                and tensor.numel() <= buffer.numel()):
            flat = tensor.view(-1)
            staged = buffer[:flat.numel()]
            staged.copy_(flat)
            torch.ops.symm_mem.one_shot_all_reduce_out(staged, "sum", self.group.group_name, flat)
        else:
            dist.all_reduce(tensor, group=self.group)
        return tensor


