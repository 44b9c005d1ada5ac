"""The fuzz tests' verdict (tests/fuzzing.py) fails on each kind of bad outcome, so those tests can fail."""
from __future__ import annotations

import pytest
import torch

from glmkit.generate.sampling import GenerationSettings

from fuzzing import FuzzCall, fuzz, judge


def _ok(result) -> None:
    assert result == 1, "not one"


def _hang():
    while True:
        pass


def _call(run, wrong=(), check=_ok, **extra) -> FuzzCall:
    return FuzzCall("call", run, list(wrong), check, **extra)


def _torch_refusal():
    return torch.nn.functional.interpolate(torch.zeros(1, 1, 2), size=3, scale_factor=2.0)  # a ValueError in torch


def _glmkit_refusal():
    return GenerationSettings(max_new_tokens=0)  # glmkit's own ValueError naming max_new_tokens


@pytest.mark.parametrize("call, failure", [
    (_call(_torch_refusal, ["size"]), "raised outside glmkit"),
    (_call(lambda: torch.zeros(2) @ torch.zeros(3)), "RuntimeError: inconsistent tensor size"),
    (_call(lambda: int("x"), ["x"]), "raised outside glmkit"),
    (_call(_glmkit_refusal), "a valid call raised"),
    (_call(_glmkit_refusal, ["top_k"]), "names none of"),
    (_call(_glmkit_refusal, ["max_new_tokens"], refused_after_compute=lambda: True), "came after compute"),
    (_call(lambda: 1, ["top_k"]), "returned although"),
    (_call(lambda: 2), "bad result not one"),
    (_call(lambda: {}["key"]), "KeyError"),
    (_call(_hang), "TimeLimitExceeded"),
])
def test_each_bad_outcome_is_a_failure(call, failure, time_limit):
    outcome, found = judge(call, time_limit, 0.2)
    assert found is not None and failure in found, (outcome, found)


def test_good_outcomes_pass_and_are_counted(time_limit):
    assert judge(_call(_glmkit_refusal, ["max_new_tokens"]), time_limit, 5) == ("refused", None)
    assert judge(_call(lambda: 1), time_limit, 5) == ("returned", None)
    calls = iter([_call(lambda: 1), _call(_glmkit_refusal, ["max_new_tokens"]), _call(lambda: 1)])
    assert fuzz(0, 3, lambda rng: next(calls), time_limit=time_limit, seconds=5) == {"returned": 2, "refused": 1}


def test_a_failing_run_names_the_seed_and_the_call(time_limit):
    with pytest.raises(AssertionError, match=r"seed 7 failed:\ncall 0: call: a valid call raised"):
        fuzz(7, 3, lambda rng: _call(_glmkit_refusal), time_limit=time_limit, seconds=5)
