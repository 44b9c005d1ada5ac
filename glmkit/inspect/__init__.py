"""Look inside GLM: read activations and attention, the logit lens, activation patching — on both backends.

    glm = glmkit.load("glm-tiny")                      # or a GLMCluster: the same calls
    trace = glm.trace("def [MASK](self):", sites=["residual", "attention_probs"], layers=[0, 7])
    lens = glm.logit_lens("English: house\\nGerman:", target="▁H")  # '▁H': "H" starting a word
    sweep = glm.patch("English: house\\nGerman:", "English: mouse\\nGerman:", target="▁H")

Modules: `sites` (site names and the checks of a call's selectors), `sequence` (what GLM sees: mask and
positions), `capture` (hooks for one forward pass, `Trace`), `lens` (`LogitLens`, vocabulary-parallel top-k),
`patching` (the batched sweep), `comm` (the collectives across tensor-parallel shards), `requests` (the request
kinds), `calls` (the methods GLMPipeline and GLMCluster share).
"""
from .calls import ProbeCalls
from .capture import Trace
from .lens import LogitLens
from .requests import DEFAULT_MAX_BYTES, LensRequest, PatchRequest, TraceRequest
from .sites import PATCHABLE, SITES

__all__ = ["DEFAULT_MAX_BYTES", "LensRequest", "LogitLens", "PATCHABLE", "PatchRequest", "ProbeCalls", "SITES",
           "Trace", "TraceRequest"]
