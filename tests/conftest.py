"""Shared fixtures: the shipped demo model and tokenizer, loaded once per test session."""
from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import signal
import subprocess
import sys

import pytest
import torch

from glmkit.config import GLMConfig, load_config
from glmkit.model import GLM
from glmkit.generate.pipeline import GLMPipeline


@pytest.fixture(scope="session")
def demo_config():
    return load_config("glm-tiny")


@pytest.fixture(scope="session")
def pipeline(demo_config):
    return GLMPipeline.from_config(demo_config)


@pytest.fixture(scope="session")
def tokenizer(pipeline):
    return pipeline.tokenizer


@pytest.fixture
def one_thread():
    """One intra-op torch thread for the test: the CI machine's few cores are shared, and one thread makes the
    demo model's tiny forward passes several times faster (a cluster's engines set their own)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def forward_calls(pipeline):
    """How many forward passes the pipeline's model has run since the test started."""
    calls = []
    handle = pipeline.model.register_forward_pre_hook(lambda module, args: calls.append(1))
    yield calls
    handle.remove()


@pytest.fixture
def small_model():
    """A randomly initialised 2-layer GLM whose weights are large enough to give peaked distributions."""
    config = GLMConfig(num_layers=2, hidden_size=32, num_attention_heads=4, inner_hidden_size=48,
                       vocab_size=96, max_sequence_length=64)
    torch.manual_seed(0)
    model = GLM(config)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "layernorm" not in name:
                param.normal_(0, 0.3)
    return model.eval().requires_grad_(False)


@pytest.fixture(scope="module")
def interpreted(request):
    """What the requesting test module prints as its last line (JSON) when run as a script under Triton's
    interpreter: its kernel cases, on the CPU. TRITON_INTERPRET must be set before Triton is first imported,
    hence a fresh process."""
    if importlib.util.find_spec("triton") is None:
        pytest.skip("triton is not installed")
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    done = subprocess.run([sys.executable, request.module.__file__], env=env, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


class TimeLimitExceeded(BaseException):
    """Raised into a test body that ran past its time limit; a BaseException, so no `except Exception`
    in the code under test can swallow it."""


@pytest.fixture
def time_limit():
    """`with time_limit(seconds): ...` fails the test instead of hanging when the body runs longer.

    SIGALRM-based (pytest-timeout is not a dependency): the body must run in the main thread, and a
    single torch call is interrupted only when it returns, which is enough for loops that never end.
    """
    @contextlib.contextmanager
    def limit(seconds: float):
        def expire(signum, frame):
            raise TimeLimitExceeded(f"did not finish within {seconds} s")

        previous = signal.signal(signal.SIGALRM, expire)
        signal.setitimer(signal.ITIMER_REAL, seconds)
        try:
            yield
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, previous)

    return limit
