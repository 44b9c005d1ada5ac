"""The verdict shared by the fuzz tests: each seeded random call must either return a result that passes the
test's own checks, or be refused with a ValueError/TypeError raised in glmkit's own code that names a parameter
the test made wrong. Anything else (a deep torch traceback, an error from outside glmkit, a call that runs past
its time limit) fails the test, which prints the seed and each failing call.

The tests build each call from parts known by construction to be valid or invalid, never by asking the code
under test, so the verdict knows which calls must succeed and which names an error must give.
"""
from __future__ import annotations

import random
import re
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import glmkit

GLMKIT_DIR = str(Path(glmkit.__file__).parent)
MAX_FAILURES = 10  # enough to see the pattern; a broken build should not spend minutes on every call


def _never() -> bool:
    return False


@dataclass
class FuzzCall:
    """One random call. `wrong` holds regular expressions, one of which a refusal must match (empty: the
    call is valid); `check` asserts on a valid call's result; `refused_after_compute` says whether a
    refusal came only after the model had run (requests must be checked before any compute)."""
    described: str
    run: Callable[[], object]
    wrong: list[str]
    check: Callable[[object], None]
    refused_after_compute: Callable[[], bool] = _never


def raised_in_glmkit(error: BaseException) -> bool:
    """Whether the innermost frame of the error's traceback is glmkit's own code (not torch's, nor a test's)."""
    frames = traceback.extract_tb(error.__traceback__)
    return bool(frames) and frames[-1].filename.startswith(GLMKIT_DIR)


def judge(call: FuzzCall, time_limit, seconds: float) -> tuple[str | None, str | None]:
    """(how the call ended: "returned", "refused" or None for anything else; what is wrong with that, or None)."""
    try:
        with time_limit(seconds):
            result = call.run()
    except (ValueError, TypeError) as error:
        if not call.wrong:
            return "refused", f"a valid call raised {error!r}"
        if not raised_in_glmkit(error):
            return "refused", f"{error!r} was raised outside glmkit"
        if not any(re.search(pattern, str(error)) for pattern in call.wrong):
            return "refused", f"{error!r} names none of {call.wrong}"
        if call.refused_after_compute():
            return "refused", f"{error!r} came after compute"
        return "refused", None
    except KeyboardInterrupt:  # the person running the tests pressed Ctrl-C: stop, do not record a failure
        raise
    except BaseException as error:  # noqa: BLE001 - anything else (a time limit too) is what fuzzing looks for
        return None, f"{type(error).__name__}: {error}"
    if call.wrong:
        return "returned", f"returned although {call.wrong} is wrong"
    try:
        call.check(result)
    except AssertionError as error:
        return "returned", f"bad result {error}"
    return "returned", None


def fuzz(seed: int, calls: int, make_call: Callable[[random.Random], FuzzCall], *, time_limit,
         seconds: float) -> dict[str, int]:
    """Makes `calls` calls from `random.Random(seed)`, each under `time_limit(seconds)`; fails naming the seed
    and up to MAX_FAILURES calls, else returns how many calls returned and how many were refused."""
    rng = random.Random(seed)
    failures, outcomes = [], {"returned": 0, "refused": 0}
    for number in range(calls):
        call = make_call(rng)
        outcome, failure = judge(call, time_limit, seconds)
        if outcome is not None:
            outcomes[outcome] += 1
        if failure is not None:
            failures.append(f"call {number}: {call.described}: {failure}")
            if len(failures) >= MAX_FAILURES:
                break
    assert not failures, f"fuzzing with seed {seed} failed:\n" + "\n".join(failures)
    return outcomes
