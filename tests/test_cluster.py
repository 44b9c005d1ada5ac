"""The resident cluster on CPU engines: lockstep generation, streaming, stop, interrupt, death, restart, teardown."""
from __future__ import annotations

import hashlib
import hmac
import os
import pickle
import random
import signal
import sys
import threading
import time
import types
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import ipyparallel as ipp
import psutil
import pytest
import zmq

from glmkit.serve.cluster import EngineDiedError, GLMCluster

PROMPTS = ["def [MASK](self):", "Hello", "x = [MASK] + [MASK]"]


@pytest.fixture(scope="module")
def cluster():
    with GLMCluster(config="glm-tiny", n=2, nccl_env={"NCCL_DEBUG": "WARN"}) as running:
        yield running
    assert running._client is None


def test_status_shows_one_shard_per_engine(cluster):
    status = cluster.status()
    assert list(status["rank"]) == [0, 1]
    assert list(status["shard"]) == ["1/2", "2/2"]
    assert set(status["device"]) == {"cpu"} and (status["load_seconds"] > 0).all()
    assert status["alive"].all()


@ipp.interactive  # sent by value: the engines cannot import this test module
def _engine_env(name):
    import os

    return os.environ.get(name)


def test_nccl_settings_reach_every_engine(cluster):
    assert cluster._client[:].apply_sync(_engine_env, "NCCL_DEBUG") == ["WARN", "WARN"]


@ipp.interactive
def _add_sys_path(path):
    import sys

    if path not in sys.path:
        sys.path.insert(0, path)


@pytest.fixture(scope="module")
def engines_import_this_module(cluster):
    """Requests are pickled by reference, as any request kind: let the engines import the ones defined here."""
    cluster._client[:].apply_sync(_add_sys_path, str(Path(__file__).parent))


@dataclass(frozen=True)
class FailOn:
    """Raises on rank `rank`; every other rank returns its rank."""

    rank: int
    reduction: ClassVar[str] = "all"
    needs_model: ClassVar[bool] = False

    def run(self, worker, channel) -> int:
        if worker.rank == self.rank:
            raise ValueError(f"refused on rank {worker.rank}")
        return worker.rank


@dataclass(frozen=True)
class Nothing:
    """Does nothing: its call is the call path alone."""

    reduction: ClassVar[str] = "rank0"
    needs_model: ClassVar[bool] = False

    def run(self, worker, channel) -> None:
        return None


def test_a_failure_on_one_rank_is_raised_naming_it_and_engines_stay_usable(cluster, engines_import_this_module):
    assert cluster.call(FailOn(-1)) == [0, 1]
    for rank in (0, 1):
        with pytest.raises(RuntimeError) as failed:
            cluster.call(FailOn(rank))
        assert str(failed.value) == f"the call failed on rank {rank}: ValueError: refused on rank {rank}"
        assert "raise ValueError" in "".join(failed.value.__notes__)  # the engine's traceback comes along
    assert cluster.generate("Hello", max_new_tokens=2).num_generated_tokens == 2


@dataclass(frozen=True)
class Carrying:
    """Carries `value` to the engines."""

    value: object
    reduction: ClassVar[str] = "rank0"
    needs_model: ClassVar[bool] = False

    def run(self, worker, channel) -> None:
        return None


def test_a_request_the_engines_cannot_unpickle_fails_that_call_alone(cluster, monkeypatch):
    with pytest.raises(TypeError, match="pickle"):  # fails here, before any engine is sent anything
        cluster.call(Carrying(threading.Lock()))
    assert cluster._call_id is None
    # As a request kind defined in a notebook's own module: the notebook pickles it, the engines cannot load it.
    monkeypatch.setattr(Nothing, "__module__", "notebook_only")
    monkeypatch.setitem(sys.modules, "notebook_only", types.SimpleNamespace(Nothing=Nothing))
    with pytest.raises(RuntimeError, match=r"^the call failed on rank 0: ModuleNotFoundError: No module named "
                                           r"'notebook_only'"):
        cluster.call(Nothing(), timeout=30)
    monkeypatch.undo()
    assert cluster.generate("Hello", max_new_tokens=2).num_generated_tokens == 2


def test_calls_go_on_the_direct_channel_not_through_ipyparallel(cluster, engines_import_this_module):
    """A call sends ipyparallel nothing: its client records every message it sends, and calls add none, while one
    apply adds one per engine. (What the direct channel saves per call is a benchmark's number:
    `python -m glmkit.lab.fixed_cost`, docs/benchmarks.md.)"""
    sent = len(cluster._client.history)
    cluster.call(Nothing())
    assert cluster.generate("Hello", max_new_tokens=2).num_generated_tokens == 2
    assert len(cluster._client.history) == sent
    cluster._client[[r["engine"] for r in cluster._ranks]].apply_sync(int)
    assert len(cluster._client.history) == sent + len(cluster._ranks)


class _Opens:
    """Unpickling it opens (creates) a file: what a message from a stranger must never get to do."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return open, (self.path, "w")


def test_engines_drop_unsigned_and_garbage_messages_unread(cluster, tmp_path):
    rng = random.Random(0)
    marker = tmp_path / "unpickled"
    payload = pickle.dumps(("call", "stranger", _Opens(marker), False))
    forged = [[b"", payload], [payload], [b"\0" * 32, payload],
              [hmac.new(b"another key", payload, hashlib.sha256).digest(), payload]]
    garbage = [[rng.randbytes(rng.randrange(64)) for _ in range(rng.randrange(1, 4))] for _ in range(200)]
    context = zmq.Context()
    try:
        for address in cluster._channel.addresses:
            sock = context.socket(zmq.DEALER)
            sock.linger = 0
            sock.connect(address)
            for frames in forged + garbage:
                sock.send_multipart(frames)
            assert sock.poll(500) == 0  # no answer to a stranger
            sock.close()
    finally:
        context.term()
    assert cluster.generate("Hello", max_new_tokens=2).num_generated_tokens == 2
    assert not marker.exists()


def test_a_call_past_its_timeout_stops_at_a_token_and_returns(cluster):
    started = time.monotonic()
    result = cluster.generate("Hello", max_new_tokens=500, min_new_tokens=500, timeout=0.5)
    assert result.finish_reason == "abort" and 0 < result.num_generated_tokens < 500
    assert time.monotonic() - started < 15
    assert cluster.generate("Hello", max_new_tokens=2).num_generated_tokens == 2


def test_calls_from_several_threads_take_turns(cluster, pipeline):
    """Widgets call from their own threads: each call gets its own result and its own streamed events."""
    prompts = ["def [MASK](self):", "Hello", "x = [MASK] + [MASK]", "import [MASK]"]
    expected = {p: pipeline.generate(p, max_new_tokens=4).text for p in prompts}
    got, errors = {}, []

    def work(prompt):
        try:
            events = []
            result = cluster.generate(prompt, max_new_tokens=4, on_text=events.append)
            got[prompt] = result.text
            assert "".join(e.text for e in events) == result.completion
        except Exception as error:  # reported below, in the test's thread
            errors.append(error)

    threads = [threading.Thread(target=work, args=(p,)) for p in prompts]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert not errors and got == expected


def test_tensor_parallel_generation_equals_single_process(cluster, pipeline):
    kwargs = dict(max_new_tokens=6, top_logprobs=2, stop=["zz"])
    remote = cluster.generate(PROMPTS, **kwargs)
    local = pipeline.generate(PROMPTS, **kwargs)
    for r, l in zip(remote, local):
        assert r.text == l.text
        assert [b.tokens for b in r.blanks] == [b.tokens for b in l.blanks]
        for rb, lb in zip(r.blanks, l.blanks):
            assert [t.token for t in rb.logprobs] == [t.token for t in lb.logprobs]
            assert all(abs(a.logprob - b.logprob) < 1e-4 for a, b in zip(rb.logprobs, lb.logprobs))


def test_seeded_sampling_matches_and_unseeded_runs(cluster, pipeline):
    kwargs = dict(max_new_tokens=6, do_sample=True, seed=5, temperature=0.8)
    assert cluster.generate("Once", **kwargs).text == pipeline.generate("Once", **kwargs).text
    assert cluster.generate("Once", max_new_tokens=3, do_sample=True).blanks


def test_streaming_callback_and_iterator(cluster):
    events = []
    result = cluster.generate("a [MASK] b [MASK] c", max_new_tokens=5, on_text=events.append)
    for number, blank in enumerate(result.blanks):
        assert "".join(e.text for e in events if e.blank == number) == blank.text
    streamed = list(cluster.stream("a [MASK] b", max_new_tokens=4))
    assert "".join(e.text for e in streamed) == cluster.last_results[0].blanks[0].text


def test_bad_input_fails_in_the_notebook_before_dispatch(cluster):
    with pytest.raises(ValueError, match="top_p"):
        cluster.generate("x", top_p=0.0)
    with pytest.raises(ValueError, match="malformed mask"):
        cluster.generate("x [mask]")
    for bad in (0, -1.5):  # 0 is not "no limit" nor "return at once": a clear error, not silently the default
        with pytest.raises(ValueError, match=r"timeout must be a finite number of seconds > 0.*None"):
            cluster.generate("x", max_new_tokens=2, timeout=bad)
        with pytest.raises(ValueError, match=r"timeout must be a finite number of seconds > 0"):
            next(cluster.stream("x", max_new_tokens=2, timeout=bad))
    assert cluster.tokenizer.encode("hi")  # tokenizer runs here, without engines


def test_stop_halts_all_engines_at_a_token_boundary(cluster):
    seen = threading.Event()

    def on_text(event):
        seen.set()

    outcome = {}
    worker = threading.Thread(target=lambda: outcome.setdefault(
        "result", cluster.generate("Hello", max_new_tokens=500, min_new_tokens=500, on_text=on_text)))
    worker.start()
    assert seen.wait(30)
    cluster.stop()
    worker.join(30)
    assert not worker.is_alive()
    result = outcome["result"]
    assert result.finish_reason == "abort" and 0 < result.num_generated_tokens < 500
    assert cluster.generate("Hello", max_new_tokens=3).num_generated_tokens == 3  # still usable


def test_should_abort_and_keyboard_interrupt_leave_engines_usable(cluster):
    calls = []
    result = cluster.generate("Hello", max_new_tokens=500, min_new_tokens=500,
                              should_abort=lambda: calls.append(1) or len(calls) > 3)
    assert result.finish_reason == "abort"

    def interrupt(event):
        raise KeyboardInterrupt

    started = time.monotonic()
    with pytest.raises(KeyboardInterrupt):
        cluster.generate("Hello", max_new_tokens=500, min_new_tokens=500, on_text=interrupt)
    assert time.monotonic() - started < 30
    assert cluster.generate("Hello", max_new_tokens=2).num_generated_tokens == 2


def test_repeated_calls_leak_neither_memory_nor_processes(cluster):
    cluster.generate("warm up", max_new_tokens=4)
    before = cluster.status()["host_rss_gb"].tolist()
    children = len(psutil.Process().children(recursive=True))
    for _ in range(15):
        cluster.generate(PROMPTS, max_new_tokens=4)
    after = cluster.status()["host_rss_gb"].tolist()
    assert all(a - b < 0.05 for a, b in zip(after, before)), (before, after)
    assert len(psutil.Process().children(recursive=True)) == children
    assert len(cluster._client.results) < 10  # results are purged after each call


def test_killed_engine_is_reported_and_restart_recovers():
    with GLMCluster(config="glm-tiny", n=2) as cluster:
        pids = [r["pid"] for r in cluster._ranks]
        os.kill(pids[1], signal.SIGKILL)
        started = time.monotonic()
        with pytest.raises(EngineDiedError, match=r"engine \d+ \(rank 1, pid \d+"):
            cluster.generate("Hello", max_new_tokens=200, min_new_tokens=200)
        assert time.monotonic() - started < 15
        # Idle until the controller has dropped the engine too: the next call must still name it, at once,
        # not fail inside ipyparallel on the missing engine id.
        deadline = time.monotonic() + 30
        while cluster._ranks[1]["engine"] in cluster._client.ids:
            assert time.monotonic() < deadline, "the controller never noticed the dead engine"
            time.sleep(0.1)
        started = time.monotonic()
        with pytest.raises(EngineDiedError, match=r"engine \d+ \(rank 1, pid \d+ on .*cluster.restart\(\)"):
            cluster.generate("Hello", max_new_tokens=2)
        with pytest.raises(EngineDiedError, match=r"rank 1"):
            next(cluster.stream("Hello", max_new_tokens=2))
        assert time.monotonic() - started < 2
        assert cluster.status()["alive"].tolist() == [True, False]
        cluster.restart()
        assert cluster.generate("Hello", max_new_tokens=3).num_generated_tokens == 3
        new_pids = [r["pid"] for r in cluster._ranks]
        assert not set(new_pids) & set(pids)
    deadline = time.monotonic() + 15
    while any(psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE for p in new_pids):
        assert time.monotonic() < deadline, "engines outlived the context manager"
        time.sleep(0.2)


@pytest.mark.parametrize("engines,launcher", [("mpi", "MPIEngineSetLauncher"), ("slurm", "SlurmEngineSetLauncher"),
                                              ("ssh", "SSHEngineSetLauncher")])
def test_launcher_configuration_reaches_ipyparallel(engines, launcher):
    cluster = GLMCluster(n=4, engines=engines, profile="glmkit-test",
                         launcher_options={"controller_ip": "0.0.0.0"}, nccl_env={"NCCL_IB_DISABLE": "1"})
    ipp_cluster = cluster.build_ipp_cluster()
    assert ipp_cluster.engine_launcher_class.__name__ == launcher
    assert ipp_cluster.n == 4 and ipp_cluster.profile == "glmkit-test" and ipp_cluster.controller_ip == "0.0.0.0"
    assert cluster.nccl_env == {"NCCL_IB_DISABLE": "1"}


def test_bad_calls_fail_as_in_process_before_any_engine_starts(pipeline):
    """GLMCluster.generate and GLMPipeline.generate share their checks: same error type, same message."""
    from test_infilling import BAD_CALLS

    idle = GLMCluster(config="glm-tiny")
    idle._tokenizer = pipeline.tokenizer  # what load() sets; no engine is started or contacted
    for args, kwargs, _ in BAD_CALLS:
        with pytest.raises((TypeError, ValueError)) as remote:
            idle.generate(*args, **kwargs)
        with pytest.raises((TypeError, ValueError)) as local:
            pipeline.generate(*args, **kwargs)
        assert (type(remote.value), str(remote.value)) == (type(local.value), str(local.value)), kwargs
    assert idle._client is None
