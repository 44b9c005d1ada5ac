"""GPU kernels applied to a plain GLM as module swaps: DeepNorm add+LayerNorm, decode attention, INT8/INT4 matmuls."""
