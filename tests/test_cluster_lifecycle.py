"""Cluster lifecycle: timeouts are checked, and a cluster does not outlive the process that started it."""
from __future__ import annotations

import json
import math
import re
import socket
import subprocess
import sys
import textwrap
import time

import psutil
import pytest

import glmkit.serve.cluster as cluster_module
from glmkit.serve import watchdog
from glmkit.serve.cluster import GLMCluster, LeftoverProcessesWarning

# Starts a cluster (no model: the processes are what matters), prints its processes, then waits to be killed.
STARTER = textwrap.dedent("""
    import json, sys, time
    import psutil
    from glmkit.serve import watchdog
    from glmkit.serve.cluster import GLMCluster

    watchdog.POLL_S = float(sys.argv[1])
    cluster = GLMCluster(n=int(sys.argv[2])).start()
    processes = [{"pid": p.pid, "created": p.create_time(), "cmdline": p.cmdline()}
                 for p in psutil.Process().children(recursive=True)]
    print(json.dumps({"processes": processes, "engines": [r["pid"] for r in cluster._ranks]}), flush=True)
    time.sleep(600)
""")


def _running(process: dict) -> bool:
    try:
        p = psutil.Process(process["pid"])
        return p.create_time() == process["created"] and p.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


@pytest.fixture
def starter():
    """Start a cluster from a separate Python process; afterwards nothing of it is left, whatever happened."""
    started = []

    def start(poll_s: float, n: int) -> tuple[subprocess.Popen, dict]:
        process = subprocess.Popen([sys.executable, "-c", STARTER, str(poll_s), str(n)], stdout=subprocess.PIPE,
                                   text=True)
        started.append((process, []))
        line = process.stdout.readline()
        assert line, f"the starter exited with {process.wait()} before its cluster was up"
        info = json.loads(line)
        started[-1][1].extend(info["processes"])
        return process, info

    yield start
    for process, children in started:
        process.kill()
        process.wait()
        watchdog.stop([o for o in watchdog.find_orphans() if o["starter_pid"] == process.pid], timeout=4)
        for child in children:
            if _running(child):
                psutil.Process(child["pid"]).kill()


def test_timeouts_must_be_positive_seconds():
    for name in ("call_timeout", "start_timeout"):
        for bad in (0, -1, math.nan, math.inf, "10", True):
            with pytest.raises(ValueError, match=f"{name} must be a finite number of seconds > 0"):
                GLMCluster(**{name: bad})
    # A call's own timeout is checked where the call is made: see test_cluster.py's bad-input test.


# A process whose main thread never gets to a clean exit (as one blocked in a collective), with a child.
STUCK = textwrap.dedent("""
    import signal, subprocess, sys, time
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    print(child.pid, flush=True)
    time.sleep(120)
""")


def _watched(tmp_path, starter: subprocess.Popen, created: float) -> subprocess.Popen:
    # The documented command line of watchdog.py, as GLMCluster builds it, around the stuck module.
    (tmp_path / "stuck.py").write_text(STUCK)
    return subprocess.Popen([sys.executable, watchdog.SCRIPT, f"--starter-pid={starter.pid}",
                             f"--starter-created={created!r}", f"--starter-host={socket.gethostname()}",
                             "--poll=0.1", "--grace=1", "-m", "stuck"], cwd=tmp_path, stdout=subprocess.PIPE,
                            text=True)


def test_watchdog_ends_a_stuck_process_and_its_children_once_the_starter_is_gone(tmp_path):
    starter = subprocess.Popen(["sleep", "600"])
    watched = _watched(tmp_path, starter, psutil.Process(starter.pid).create_time())
    child = psutil.Process(int(watched.stdout.readline()))
    child_info = {"pid": child.pid, "created": child.create_time()}
    try:
        time.sleep(1.0)
        assert watched.poll() is None, "ended while its starter was alive"
        starter.kill()
        starter.wait()
        assert watched.wait(timeout=15) == 1  # os._exit after the grace: SIGTERM was ignored
        deadline = time.monotonic() + 5
        while _running(child_info):
            assert time.monotonic() < deadline, "the stuck process's child outlived it"
            time.sleep(0.1)
    finally:
        for process in (starter, watched):
            process.kill()
            process.wait()
        if _running(child_info):
            child.kill()


def test_watchdog_counts_a_reused_starter_pid_as_gone(tmp_path):
    starter = subprocess.Popen(["sleep", "600"])
    # The pid runs, but not the process that was recorded under it (a pid reused after the starter died).
    watched = _watched(tmp_path, starter, psutil.Process(starter.pid).create_time() - 100.0)
    try:
        assert watched.wait(timeout=15) is not None
        assert starter.poll() is None  # the process that now has the pid is left alone
    finally:
        for process in (starter, watched):
            process.kill()
            process.wait()


def test_cluster_goes_when_its_starter_is_killed(starter):
    process, info = starter(poll_s=1.0, n=2)
    modules = [p["cmdline"][p["cmdline"].index("-m") + 1] for p in info["processes"] if "-m" in p["cmdline"]]
    assert modules.count("ipyparallel.engine") == 2 and "ipyparallel.controller" in modules
    assert all(_running(p) for p in info["processes"])
    process.kill()
    process.wait()
    killed = time.monotonic()
    while any(_running(p) for p in info["processes"]):
        assert time.monotonic() - killed < 30, [p["cmdline"][:4] for p in info["processes"] if _running(p)]
        time.sleep(0.2)


def test_leftovers_of_a_killed_starter_are_reported_and_stopped(starter, monkeypatch):
    # A watchdog that looks only every 10 minutes: the processes stay, as they would if one could not act.
    process, info = starter(poll_s=600.0, n=1)
    process.kill()
    process.wait()
    leftovers = GLMCluster.find_leftovers()
    mine = leftovers[leftovers["starter_pid"] == process.pid]
    engine_pid = info["engines"][0]
    assert engine_pid in set(mine["pid"]) and "controller" in set(mine["role"])
    assert set(mine.loc[mine["pid"] == engine_pid, "role"]) == {"engine"}

    monkeypatch.setattr(cluster_module, "LEFTOVER_WAIT_S", 0.5)
    with pytest.warns(LeftoverProcessesWarning, match=r"GLMCluster.stop_leftovers\(\).*kill \d+") as warned:
        with GLMCluster(n=1) as fresh:
            assert fresh.world_size == 1  # leftovers are reported, not in the way of a new cluster
    message = str(next(w.message for w in warned if w.category is LeftoverProcessesWarning))
    assert re.search(rf"started them \(pid [\d, ]*\b{process.pid}\b[\d, ]*\) is gone", message)
    assert f"engine {engine_pid}" in message
    assert set(mine["pid"]) <= {int(pid) for pid in message.split("kill ")[-1].split()}
    stopped = GLMCluster.stop_leftovers(list(mine["pid"]))
    assert set(mine["pid"]) <= set(stopped)
    assert not any(_running(p) for p in info["processes"])  # with their children (an engine's nanny)
    assert process.pid not in set(GLMCluster.find_leftovers()["starter_pid"])
