"""Tensor parallelism: the shard layout table (layout), the live transform (transform), and communication (comm)."""
