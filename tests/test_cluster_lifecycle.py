"""Cluster lifecycle: timeouts are checked, and a cluster does not outlive the process that started it."""
from __future__ import annotations

import math

import pytest

from glmkit.serve.cluster import GLMCluster


def test_timeouts_must_be_positive_seconds():
    for name in ("call_timeout", "start_timeout"):
        for bad in (0, -1, math.nan, math.inf, "10", True):
            with pytest.raises(ValueError, match=f"{name} must be a finite number of seconds > 0"):
                GLMCluster(**{name: bad})
    # A call's own timeout is checked where the call is made: see test_cluster.py's bad-input test.

