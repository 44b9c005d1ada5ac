"""Keeps a cluster's controller and engines from outliving the process that started them.

ipyparallel stops its processes when the starting process exits normally, but a notebook kernel killed hard
(SIGKILL: the OOM killer, a forced shutdown, "kernel died") runs no cleanup, and the controller and every
engine then keep running for ever, each holding its GPU shard. So GLMCluster launches them through this
file, run as a script:

    python .../glmkit/serve/watchdog.py --starter-pid=PID --starter-created=T --starter-host=H \\
        --poll=S --grace=S -m ipyparallel.engine [ipyparallel's own arguments]

It starts a daemon thread that checks the starter (its pid *and* creation time, so a reused pid does not
count as alive) and then runs the module as `__main__` in this same process, so the pid ipyparallel records
is the watched one. When the starter is gone, the thread stops this process's children, asks the process to
shut down (SIGTERM: ipyparallel's own clean exit) and, if it is still there after the grace (its main thread
stuck in a collective waiting for a rank that is gone, say), ends it with os._exit.

The same arguments mark the processes, so `find_orphans` can list those whose starter is gone. This file
imports only the standard library and psutil: importing glmkit (and torch) would add seconds to every start.
A process on another host than its starter cannot watch it and runs unwatched; remote engines go once the
(local, watched) controller has gone and ipyparallel's heartbeat check notices.
"""
from __future__ import annotations

import os
import runpy
import signal
import socket
import sys
import threading
import time

import psutil

SCRIPT = os.path.abspath(__file__)
PID_ARG, CREATED_ARG, HOST_ARG = "--starter-pid=", "--starter-created=", "--starter-host="
# How often the starter is checked, and how long a process may take to shut down cleanly once it is gone.
POLL_S = 1.0
GRACE_S = 3.0
# psutil derives creation times from clock ticks since boot: equal processes agree far closer than this.
CREATED_TOLERANCE_S = 0.05


def wrap(cmd: list[str], poll_s: float | None = None, grace_s: float | None = None) -> list[str] | None:
    """`cmd` (a `python -m module ...` command) run under a watchdog of this process; None if not of that form."""
    if len(cmd) < 3 or cmd[1] != "-m":
        return None
    me = psutil.Process()
    return [cmd[0], SCRIPT, f"{PID_ARG}{me.pid}", f"{CREATED_ARG}{me.create_time()!r}",
            f"{HOST_ARG}{socket.gethostname()}", f"--poll={POLL_S if poll_s is None else poll_s}",
            f"--grace={GRACE_S if grace_s is None else grace_s}", *cmd[1:]]


def is_alive(pid: int, created: float) -> bool:
    """Whether the process `pid` that was created at `created` still runs (a zombie has ended)."""
    try:
        process = psutil.Process(pid)
        return (abs(process.create_time() - created) < CREATED_TOLERANCE_S
                and process.status() != psutil.STATUS_ZOMBIE)
    except psutil.NoSuchProcess:
        return False
    except psutil.Error:
        return True  # cannot tell (access denied): never end a process on a guess


def parse(argv: list[str]) -> tuple[dict, list[str]] | None:
    """The watchdog options and the `-m module ...` rest of a wrapped command line; None if it is not one."""
    if len(argv) < 2 or os.path.basename(argv[1]) != os.path.basename(SCRIPT):
        return None
    options, rest = {}, argv[2:]
    while rest and rest[0].startswith("--") and "=" in rest[0]:
        key, value = rest.pop(0)[2:].split("=", 1)
        options[key] = value
    try:
        watch = {"pid": int(options["starter-pid"]), "created": float(options["starter-created"]),
                 "host": options["starter-host"], "poll": float(options.get("poll", POLL_S)),
                 "grace": float(options.get("grace", GRACE_S))}
    except (KeyError, ValueError):
        return None
    return watch, rest


def find_orphans(wait_s: float = 0.0) -> list[dict]:
    """This user's watched processes on this host whose starter is gone: pid, role, starter pid, command.

    With `wait_s`, waits up to that long for them to end by themselves and returns those that have not."""
    orphans, deadline = _orphans(), time.monotonic() + wait_s
    while orphans and time.monotonic() < deadline:
        time.sleep(0.2)
        orphans = _orphans()
    return orphans


def _orphans() -> list[dict]:
    host, uid, orphans = socket.gethostname(), os.getuid(), []
    for process in psutil.process_iter(["pid", "cmdline", "uids", "create_time"]):
        try:
            info = process.info
            parsed = parse(info["cmdline"] or [])
            if parsed is None or info["uids"] is None or info["uids"].real != uid:
                continue
            watch, rest = parsed
            if watch["host"] != host or is_alive(watch["pid"], watch["created"]):
                continue
            if process.status() == psutil.STATUS_ZOMBIE:
                continue
            role = "controller" if "ipyparallel.controller" in rest else "engine"
            orphans.append({"pid": info["pid"], "created": info["create_time"], "role": role,
                            "starter_pid": watch["pid"], "command": " ".join(info["cmdline"])})
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return orphans


def stop(processes: list[dict], timeout: float = 10.0) -> list[int]:
    """End the given processes (from `find_orphans`) and their children: TERM, then KILL; the pids ended."""
    targets = []
    for info in processes:
        if not is_alive(info["pid"], info["created"]):
            continue  # gone already, or the pid now belongs to another process: leave that one alone
        try:
            process = psutil.Process(info["pid"])
            targets += [process, *process.children(recursive=True)]
        except psutil.NoSuchProcess:
            continue
    _end(targets, timeout)
    return [p.pid for p in targets]


def _end(processes: list[psutil.Process], timeout: float) -> None:
    for process in processes:
        try:
            process.terminate()
        except psutil.NoSuchProcess:
            pass
    _, alive = psutil.wait_procs(processes, timeout=timeout / 2)
    for process in alive:
        try:
            process.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(alive, timeout=timeout / 2)


def _watch(watch: dict) -> None:
    while is_alive(watch["pid"], watch["created"]):
        time.sleep(watch["poll"])
    try:
        print(f"glmkit watchdog: the process that started this cluster (pid {watch['pid']}) is gone; "
              f"pid {os.getpid()} is shutting down", file=sys.stderr, flush=True)
        # Children first (the controller's schedulers, an engine's nanny): once this process has gone they
        # would be nobody's, and only this thread knows them.
        _end(psutil.Process().children(recursive=True), watch["grace"])
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(watch["grace"])
        # Still here: the main thread did not get to its clean exit in time. Children it started since go too.
        for child in psutil.Process().children(recursive=True):
            try:
                child.kill()
            except psutil.NoSuchProcess:
                pass
    finally:
        os._exit(1)  # whatever failed above (a closed stderr, say), the process must not stay


def main(argv: list[str]) -> None:
    """Start watching the starter, then run the wrapped module as `python -m` would (`argv`: sys.argv)."""
    parsed = parse([sys.executable, *argv])
    if parsed is None or len(parsed[1]) < 2 or parsed[1][0] != "-m":
        sys.exit(f"usage: python {SCRIPT} {PID_ARG}PID {CREATED_ARG}T {HOST_ARG}H "
                 f"[--poll=S] [--grace=S] -m MODULE [ARGS...]")
    watch, (_, module, *args) = parsed
    if watch["host"] == socket.gethostname():
        threading.Thread(target=_watch, args=(watch,), name="glmkit-watchdog", daemon=True).start()
    # As under `python -m`: the working directory first on the path, not this file's folder (whose
    # engine.py and cluster.py would shadow any top-level modules of those names).
    sys.path[0] = os.getcwd()
    sys.argv = [module, *args]
    runpy.run_module(module, run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main(sys.argv)
