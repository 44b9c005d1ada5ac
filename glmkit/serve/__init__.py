"""The resident cluster: the notebook side (GLMCluster) and the engine side (ShardWorker)."""
