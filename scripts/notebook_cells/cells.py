"""Cell constructors shared by the notebook sources: markdown, code, and the tagged code cells."""
from __future__ import annotations


def md(text: str) -> tuple[str, str, list[str]]:
    return ("markdown", text, [])


def code(text: str, *tags: str) -> tuple[str, str, list[str]]:
    return ("code", text, list(tags))


def config(text: str) -> tuple[str, str, list[str]]:
    return code(text, "config")


def gpu(text: str) -> tuple[str, str, list[str]]:
    return code(text, "gpu")


def teardown(text: str) -> tuple[str, str, list[str]]:
    return code(text, "teardown")


START_CLUSTER = """\
from glmkit.serve.cluster import GLMCluster

cluster = GLMCluster(config=CONFIG, n=ENGINES)
cluster.start()                 # engines up, one process group among them
cluster.load(cluster.config)    # each engine reads its own shard; returns cluster.status()"""
