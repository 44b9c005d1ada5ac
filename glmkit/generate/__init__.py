"""One generator for every caller: sampling, token-level decoding, CUDA-graph steps, blank filling, the in-process pipeline."""
