"""`trace`, `logit_lens` and `patch`: the same probe calls on a GLMPipeline and on a GLMCluster.

Each builds its request where the call is made (bad input fails here, before any compute) and hands it to the
backend, which runs it in this process or on every engine (glmkit.inspect.requests).
"""
from __future__ import annotations

import pandas as pd

from .capture import Trace
from .lens import LogitLens
from .requests import DEFAULT_MAX_BYTES, LensRequest, PatchRequest, TraceRequest


class ProbeCalls:
    """Probe calls for a backend that has `tokenizer`, `_probe_config` (its GLMConfig) and `_run_probe(request)`."""

    def trace(self, prompt: str, *, sites=("residual",), layers=None, positions=None, max_new_tokens: int = 0,
              max_bytes: int = DEFAULT_MAX_BYTES) -> Trace:
        """Read `sites` (residual, attention, mlp, attention_probs or module names) at `layers` and `positions`
        along the prompt as GLM sees it when it fills its first blank, and its `max_new_tokens` greedy tokens."""
        return self._run_probe(TraceRequest.build(self.tokenizer, self._probe_config, prompt, sites, layers,
                                                  positions, max_new_tokens, max_bytes))

    def logit_lens(self, prompt: str, *, layers=None, positions=None, top_k: int = 10, target=None,
                   max_new_tokens: int = 0, max_bytes: int = DEFAULT_MAX_BYTES) -> LogitLens:
        """The final LayerNorm and output head applied after every block (of `layers`) at every position: the
        top-k next tokens, and `target`'s (a token id or one token's text) probability and rank."""
        return self._run_probe(LensRequest.build(self.tokenizer, self._probe_config, prompt, layers, positions,
                                                 top_k, target, max_new_tokens, max_bytes))

    def patch(self, clean: str, corrupted: str, target, *, sites="residual", layers=None, positions=None,
              target_position: int = -1, batch_size: int | None = None) -> pd.DataFrame:
        """Copy each (site, layer, position) of the clean run into the corrupted one (same token length), one at a
        time, and report the change in log p(target) at `target_position` (default: sop, the first new token)."""
        return self._run_probe(PatchRequest.build(self.tokenizer, self._probe_config, clean, corrupted, target,
                                                  sites, layers, positions, target_position, batch_size))
