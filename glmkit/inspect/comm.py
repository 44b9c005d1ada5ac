"""The collectives a probe needs across the tensor-parallel shards of one model, through the shard's own group.

Every shard says where it is the same way: `rank`, `world_size` and `group` (a GLMPipeline is rank 0 of 1 with
no group; an engine's ShardWorker its rank in the cluster's process group). In one process every collective
is the identity. Each rank counts the bytes it contributes, so a probe can show that what it exchanges does
not grow with the vocabulary.
"""
from __future__ import annotations

import torch
import torch.distributed as dist


class ShardComm:
    """Gather and reduce small tensors across the ranks of a shard's group (identity for one rank)."""

    def __init__(self, rank: int = 0, world_size: int = 1, group=None):
        self.rank, self.world_size, self.group = rank, world_size, group
        self.sent_bytes = 0  # what this rank contributed to collectives so far

    @classmethod
    def of(cls, shard) -> "ShardComm":
        """The communicator of a GLMPipeline or an engine's ShardWorker (both say rank, world_size, group)."""
        return cls(shard.rank, shard.world_size, shard.group)

    def _count(self, tensor: torch.Tensor) -> None:
        self.sent_bytes += tensor.numel() * tensor.element_size()

    def gather(self, tensor: torch.Tensor, dim: int) -> torch.Tensor:
        """Every rank's `tensor` (same shape on all) concatenated along `dim` in rank order."""
        if self.world_size == 1:
            return tensor
        tensor = tensor.contiguous()
        self._count(tensor)
        pieces = [torch.empty_like(tensor) for _ in range(self.world_size)]
        dist.all_gather(pieces, tensor, group=self.group)
        return torch.cat(pieces, dim=dim)

    def sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """The elementwise sum over the ranks (a new tensor)."""
        return self._reduce(tensor, dist.ReduceOp.SUM)

    def max(self, tensor: torch.Tensor) -> torch.Tensor:
        """The elementwise maximum over the ranks (a new tensor)."""
        return self._reduce(tensor, dist.ReduceOp.MAX)

    def _reduce(self, tensor: torch.Tensor, op) -> torch.Tensor:
        tensor = tensor.clone(memory_format=torch.contiguous_format)
        if self.world_size > 1:
            self._count(tensor)
            dist.all_reduce(tensor, op=op, group=self.group)
        return tensor
