"""Notebook side of the cluster: an ipyparallel cluster with one engine per GPU, each holding a resident shard.

    with GLMCluster(config="glm-tiny", n=2) as cluster:
        print(cluster.generate("def [MASK](x):", max_new_tokens=8).text)

Ranks are assigned from the engines' ids after connecting (sorted), GPUs from the order of a host's engines
among those ids. Every call is one request (glmkit.generate.request), validated here and run by all engines
in lockstep through one path, `call()`, with a timeout; rank 0 streams events back as deltas. A stop request
(`stop()`, a KeyboardInterrupt, `should_abort`) is handed to rank 0 through the process group's TCP store and
takes effect at the next token on every rank, so no collective is left waiting.
"""
from __future__ import annotations

import math
import socket
import threading
import time
import uuid
import warnings
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from datetime import timedelta
from pathlib import Path
from typing import Callable

import ipyparallel as ipp
import pandas as pd
import psutil
import torch.distributed as dist
from ipyparallel.cluster import launcher as ipp_launcher

from . import engine, watchdog
from ..config import KitConfig, load_config
from ..generate.blanks import GenerationResult, TextEvent, check_callbacks
from ..generate.request import GenerateRequest
from ..inspect.calls import ProbeCalls
from ..tokenizer import GLMTokenizer

POLL_S = 0.05
# A streamed batch may still be on its way (IOPub) when the result (another socket) has arrived.
LATE_EVENTS_WAIT_S = 5.0
# How long a new cluster waits for an earlier one's processes to end by themselves before reporting them:
# their watchdogs notice a killed starter within a poll and end them within a grace.
LEFTOVER_WAIT_S = watchdog.POLL_S + 2 * watchdog.GRACE_S + 1.0


class EngineDiedError(RuntimeError):
    """An engine process ended while the cluster needed it; `cluster.restart()` brings it back."""


class ClusterTimeoutError(TimeoutError):
    """A call did not finish in time, even after a stop request."""


class LeftoverProcessesWarning(UserWarning):
    """Processes of an earlier GLMCluster still run although the process that started them is gone."""


def _seconds(name: str, value, hint: str = "") -> float:
    """`value` checked as a timeout: a finite number of seconds > 0 (the error names `name`)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be a finite number of seconds > 0, got {value!r}{hint}")
    return float(value)


class GLMCluster(ProbeCalls):
    """One ipyparallel engine per GPU (or N CPU engines), each keeping its tensor-parallel shard loaded."""

    def __init__(self, config: str | Path | KitConfig | None = None, n: int | None = None, *,
                 engines: str = "local", profile: str | None = None, connect: bool = False,
                 cluster_id: str | None = None, launcher_options: dict | None = None,
                 nccl_env: dict | None = None, call_timeout: float = 600.0, start_timeout: float = 120.0,
                 device: str | None = None):
        self.config = load_config(config) if isinstance(config, (str, Path)) else config
        if self.config is not None and device is not None:
            self.config = self.config.replace(device=device)
        self.n = n
        self.engines, self.profile, self.connect, self.cluster_id = engines, profile, connect, cluster_id
        self.launcher_options = dict(launcher_options or {})
        self.nccl_env = dict(nccl_env or {})
        self.call_timeout = _seconds("call_timeout", call_timeout)
        self.start_timeout = _seconds("start_timeout", start_timeout)
        self._ipp: ipp.Cluster | None = None
        self._client: ipp.Client | None = None
        self._ranks: list[dict] = []  # per rank: engine id, host, pid, device
        self._store: dist.TCPStore | None = None
        self._tokenizer: GLMTokenizer | None = None
        self._call_id: str | None = None
        self._lock = threading.RLock()  # guards the ipyparallel client, which is not thread-safe
        self.last_results: list[GenerationResult] | None = None
        self.load_results: list | None = None

    # --- lifecycle ---------------------------------------------------------------------------------

    def __enter__(self) -> "GLMCluster":
        self.start()
        if self.config is not None:
            self.load(self.config)
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def build_ipp_cluster(self) -> ipp.Cluster:
        """The ipyparallel Cluster this GLMCluster would start (launcher, profile and options applied)."""
        options = dict(self.launcher_options)
        if self.profile is not None:
            options["profile"] = self.profile
        return ipp.Cluster(n=self._engine_count(), engines=self.engines, log_level=40, **options)

    def _engine_count(self) -> int:
        if self.n is not None:
            if self.n < 1:
                raise ValueError(f"n must be at least 1, got {self.n}")
            return self.n
        wants_gpu = self.config is not None and self.config.device.startswith("cuda")
        if wants_gpu:
            import torch

            if torch.cuda.device_count() == 0:
                raise ValueError("the config asks for CUDA but no GPU is visible: set device='cpu' or n=")
            return torch.cuda.device_count()
        return 2

    def start(self) -> "GLMCluster":
        """Start engines (or connect to a running cluster) and form the process group."""
        if self._client is not None:
            return self
        if self.connect:
            self._ipp = ipp.Cluster.from_file(profile=self.profile or "default", cluster_id=self.cluster_id or "")
            self._client = self._ipp.connect_client_sync()
            self._started_here = False
        else:
            self._report_leftovers()
            self._ipp = self.build_ipp_cluster()
            # As ipyparallel's start_and_connect, but with the controller and engines under a watchdog.
            self._ipp.start_controller_sync(**self._watched("controller"))
            time.sleep(self._ipp.delay)  # ipyparallel's own pause for the controller to come up
            self._ipp.start_engines_sync(**self._watched("engine"))
            self._client = self._ipp.connect_client_sync()
            self._started_here = True
        self._client.wait_for_engines(self.n or len(self._client.ids) or 1, timeout=self.start_timeout)
        self._form_group()
        return self

    def _watched(self, kind: str) -> dict:
        """Launcher keywords that run the controller or the engines under a watchdog of this process.

        It ends them when this process is gone, even killed with SIGKILL. Only local processes can be
        watched: for other launchers (MPI, SSH, batch systems) this returns no keywords."""
        if kind == "controller":
            cls, local = self._ipp.controller_launcher_class, ipp_launcher.LocalControllerLauncher
        else:
            cls, local = self._ipp.engine_launcher_class, ipp_launcher.LocalEngineSetLauncher
        if not issubclass(cls, local) or issubclass(cls, ipp_launcher.SSHLauncher):
            return {}
        # The command as configured (an ipcluster_config.py may set its own python), wrapped.
        configured = getattr(cls(parent=self._ipp, log=self._ipp.log, profile_dir=self._ipp.profile_dir,
                                 cluster_id=self._ipp.cluster_id), f"{kind}_cmd")
        wrapped = watchdog.wrap(list(configured))
        if wrapped is None:
            warnings.warn(f"the {kind} command {configured} is not `python -m ...`, so glmkit cannot watch it: "
                          f"its processes will outlive a kernel that is killed", stacklevel=3)
            return {}
        return {f"{kind}_cmd": wrapped}

    def _report_leftovers(self) -> None:
        leftovers = watchdog.find_orphans(wait_s=LEFTOVER_WAIT_S)  # their watchdogs may be ending them now
        if not leftovers:
            return
        pids = " ".join(str(p["pid"]) for p in leftovers)
        roles = ", ".join(f"{p['role']} {p['pid']}" for p in leftovers)
        starters = ", ".join(sorted({str(p["starter_pid"]) for p in leftovers}))
        warnings.warn(LeftoverProcessesWarning(
            f"{len(leftovers)} processes of an earlier GLMCluster still run although the process that started "
            f"them (pid {starters}) is gone: {roles}. They may hold memory or GPUs this cluster needs. Stop them "
            f"with GLMCluster.stop_leftovers(), or from a shell: kill {pids}"), stacklevel=3)

    @staticmethod
    def find_leftovers() -> pd.DataFrame:
        """Controllers and engines of earlier GLMClusters whose starting process is gone (pid, role, command)."""
        return pd.DataFrame(watchdog.find_orphans(), columns=["pid", "role", "starter_pid", "created", "command"])

    @staticmethod
    def stop_leftovers(pids: list[int] | None = None) -> list[int]:
        """Stop the leftovers (all of them, or those with the given pids) and their children; the pids ended."""
        leftovers = watchdog.find_orphans()
        if pids is not None:
            leftovers = [p for p in leftovers if p["pid"] in set(pids)]
        return watchdog.stop(leftovers)

    def _form_group(self) -> None:
        ids = sorted(self._client.ids)
        infos = [self._client[i].apply_sync(engine.describe_engine) for i in ids]
        local_index: dict[str, int] = {}
        device_type = "cuda" if self.config is not None and self.config.device.startswith("cuda") else "cpu"
        self._ranks = []
        for engine_id, info in zip(ids, infos):
            index = local_index.get(info["host"], 0)
            local_index[info["host"]] = index + 1
            if device_type == "cuda" and index >= info["gpus"]:
                raise ValueError(f"host {info['host']} runs more engines than it has GPUs ({info['gpus']})")
            device = f"cuda:{index}" if device_type == "cuda" else "cpu"
            self._ranks.append({"engine": engine_id, "host": info["host"], "pid": info["pid"], "device": device})
        hosts = {r["host"] for r in self._ranks}
        store_host = "127.0.0.1" if len(hosts) == 1 else self._ranks[0]["host"]
        port = self._client[ids[0]].apply_sync(engine.free_port, "127.0.0.1" if len(hosts) == 1 else "")
        world = len(ids)
        env = self.nccl_env
        pending = [self._client[r["engine"]].apply_async(_make_worker, rank, world, r["device"], store_host, port,
                                                         self.call_timeout, env)
                   for rank, r in enumerate(self._ranks)]
        self._wait_all(pending, self.start_timeout, "forming the process group")
        # The notebook joins the rank-0 store as a client: that is how stop requests reach the engines.
        self._store = dist.TCPStore(store_host, port, world, is_master=False,
                                    timeout=timedelta(seconds=self.start_timeout), wait_for_workers=False)

    def load(self, config: str | Path | KitConfig, weights=None) -> pd.DataFrame:
        """Load `config`'s checkpoint: each engine reads only its own shard. Shows a progress bar.

        `weights`, a request that installs a model on every engine (e.g. the benchmark's random weights),
        replaces reading the checkpoint; what each rank's load returned is kept in `load_results`.
        """
        from tqdm.auto import tqdm

        self.config = load_config(config) if isinstance(config, (str, Path)) else config
        if self._client is None:
            self.start()
        self._tokenizer = GLMTokenizer.load(self.config.tokenizer)  # notebook-side, for prompt checks
        progress = tqdm(total=self.world_size, desc=f"loading {self.config.name} shards", unit="shard")
        with self._engines_vanished(), progress as bar:
            self.load_results = self.call(weights or engine.LoadRequest(self.config), timeout=self.call_timeout,
                                          on_progress=lambda done: bar.update(done - bar.n))
        return self.status()

    def close(self) -> None:
        """Stop every engine and process this cluster started (a connected cluster is left running)."""
        if self._client is None:
            return
        try:
            if getattr(self, "_started_here", False):
                self._ipp.stop_cluster_sync()
            else:
                self._client.close()
        finally:
            self._client, self._store, self._ranks = None, None, []

    def restart(self) -> pd.DataFrame | None:
        """Replace all engines with fresh ones and reload the model (after a death or a hung call)."""
        if self._ipp is None:
            raise RuntimeError("the cluster was never started")
        self._ipp.stop_engines_sync()
        watched = self._watched("engine") if self._started_here else {}  # a connected cluster is the user's
        self._ipp.start_engines_sync(n=len(self._ranks) or self._engine_count(), **watched)
        self._client.wait_for_engines(len(self._ranks) or self._engine_count(), timeout=self.start_timeout)
        self._wait_for_old_engines_to_leave()
        self._form_group()
        return self.load(self.config) if self.config is not None else None

    def _wait_for_old_engines_to_leave(self) -> None:
        old = {r["engine"] for r in self._ranks}
        deadline = time.monotonic() + self.start_timeout
        while old & set(self._client.ids) and time.monotonic() < deadline:
            time.sleep(POLL_S)

    # --- calls -------------------------------------------------------------------------------------

    @property
    def tokenizer(self) -> GLMTokenizer:
        """The tokenizer, loaded in this (notebook) process: counting tokens needs no engine round trip."""
        if self._tokenizer is None:
            raise RuntimeError("no model loaded: call cluster.load(config) first")
        return self._tokenizer

    @property
    def world_size(self) -> int:
        return len(self._ranks)

    def status(self) -> pd.DataFrame:
        """One row per engine: engine id, host, pid, device, shard, load seconds and memory."""
        with self._lock:
            rows = self._status_rows()
        return pd.DataFrame(rows)

    def _status_rows(self) -> list[dict]:
        rows, registered = [], set(self._client.ids) if self._client is not None else set()
        for r in self._ranks:
            alive = self._rank_alive(r, registered)
            row = {"engine": r["engine"], "host": r["host"], "pid": r["pid"], "alive": alive}
            if alive:
                with self._engines_vanished():
                    row.update(self._client[r["engine"]].apply_sync(
                        engine.run_request, ipp.Reference(engine.WORKER_NAME), "status", engine.StatusRequest()))
            rows.append(row)
        return rows

    def stop(self) -> None:
        """Ask the running generation to stop at the next token on every engine."""
        call_id = self._call_id
        if call_id is not None and self._store is not None:
            self._store.set(engine.abort_key(call_id), "1")

    def request(self, prompts: str | list[str], **kwargs) -> GenerateRequest:
        """The validated request of a generate() call; bad input fails here, before any engine works."""
        return GenerateRequest.build(self.tokenizer, self.config.model.max_sequence_length, prompts, **kwargs)

    def generate(self, prompts: str | list[str] | GenerateRequest, *,
                 on_text: Callable[[TextEvent], None] | None = None,
                 should_abort: Callable[[], bool] | None = None, timeout: float | None = None,
                 **kwargs) -> GenerationResult | list[GenerationResult]:
        """Fill blanks on all engines in lockstep (same keywords as GLMPipeline.generate); rank 0's result."""
        request = prompts if isinstance(prompts, GenerateRequest) else self.request(prompts, **kwargs)
        check_callbacks(on_text, should_abort)  # as GLMPipeline.generate checks them
        results = self.call(request, on_event=on_text, should_abort=should_abort, timeout=timeout)
        return results[0] if request.single else results

    def stream(self, prompts: str | list[str], *, should_abort: Callable[[], bool] | None = None,
               timeout: float | None = None, **kwargs) -> Iterator[TextEvent]:
        """Yield TextEvents as engines generate; the results are in `last_results` afterwards."""
        check_callbacks(None, should_abort)
        request = self.request(prompts, **kwargs)
        holder: dict = {}
        with self._lock:
            self._ensure_alive()
            yield from self._events(request, should_abort, timeout, holder)
        self.last_results = holder["result"]

    def call(self, request, *, on_event: Callable | None = None, should_abort: Callable[[], bool] | None = None,
             timeout: float | None = None, on_progress: Callable[[int], None] | None = None):
        """Run any request kind on every engine (glmkit.generate.request); its reduction says what comes back:
        rank 0's result, or a list with every rank's. Streamed events go to `on_event` as they arrive."""
        holder: dict = {}
        with self._lock:  # one call at a time, also from widget threads: engines run calls in order
            self._ensure_alive()
            events = self._events(request, should_abort, timeout, holder, on_progress)
            try:
                for event in events:
                    if on_event is not None:
                        on_event(event)
            finally:
                # An exception in the callback (a KeyboardInterrupt, say) must still stop the engines:
                # closing the generator runs its cleanup now, not whenever it is collected.
                events.close()
        return holder["result"]

    _run_probe, _probe_config = call, property(lambda self: self.config.model)  # trace/logit_lens/patch

    def _events(self, request, should_abort, timeout, holder: dict, on_progress=None) -> Iterator:
        timeout = self._timeout(timeout)
        call_id = uuid.uuid4().hex
        self._call_id = call_id
        with self._engines_vanished():  # an engine that died since the liveness check
            view = self._client[[r["engine"] for r in self._ranks]]
            ar = view.apply_async(engine.run_request, ipp.Reference(engine.WORKER_NAME), call_id, request)
        received, deadline, stopping = 0, time.monotonic() + timeout, False
        try:
            while not ar.ready():
                for batch in self._new_batches(ar, call_id, received):
                    received += 1
                    yield from batch
                if on_progress is not None:
                    on_progress(ar.progress)
                if not stopping and should_abort is not None and should_abort():
                    self.stop()
                    stopping = True
                self._check_alive()
                if time.monotonic() > deadline:
                    if stopping:
                        raise ClusterTimeoutError(f"the call did not stop within {timeout:.0f} s; the engines "
                                                  f"may be stuck: call cluster.restart()")
                    self.stop()
                    stopping, deadline = True, time.monotonic() + min(30.0, timeout)
                ar.wait(POLL_S)
        except (KeyboardInterrupt, GeneratorExit):
            # Interrupted in the notebook, or the consumer stopped iterating: engines finish the
            # current token and return, so no collective is left waiting and they stay usable.
            self.stop()
            self._finish_quietly(ar)
            self._call_id = None
            raise
        values = self._values(ar)
        self._call_id = None
        if on_progress is not None:
            on_progress(len(values))
        if request.reduction == "all":
            holder["result"] = values
            return
        result, published, tail = values[0]
        late = time.monotonic() + LATE_EVENTS_WAIT_S
        while received < published and time.monotonic() < late:
            batches = list(self._new_batches(ar, call_id, received))
            for batch in batches:
                received += 1
                yield from batch
            if not batches:
                time.sleep(POLL_S / 5)
        holder["result"] = result
        yield from tail

    @staticmethod
    def _new_batches(ar, call_id: str, received: int) -> Iterator[list]:
        """Event batches rank 0 published since the `received`-th, in order (each is sent once: deltas)."""
        data = ar.data[0] if ar.data else None
        while data and engine.batch_key(call_id, received) in data:
            yield data[engine.batch_key(call_id, received)]
            received += 1

    def _values(self, ar) -> list:
        try:
            with self._engines_vanished():
                return ar.get(timeout=0)
        except ipp.error.CompositeError as error:
            self._check_alive()
            raise RuntimeError(f"the call failed on the engines: {error.elist[0][0]}: {error.elist[0][1]}") from None
        except ipp.error.RemoteError as error:
            self._check_alive()
            raise RuntimeError(f"the call failed on an engine: {error.ename}: {error.evalue}") from None
        finally:
            self._client.purge_local_results(ar)

    def _finish_quietly(self, ar, grace: float = 30.0) -> None:
        with suppress(Exception):
            ar.wait(grace)
            self._client.purge_local_results(ar)

    # --- health ------------------------------------------------------------------------------------

    def _is_local(self, rank_info: dict) -> bool:
        return rank_info["host"] == socket.gethostname()

    def _timeout(self, timeout: float | None) -> float:
        """A call's timeout: None means call_timeout; anything else must be seconds > 0."""
        if timeout is None:
            return self.call_timeout
        return _seconds("timeout", timeout, " (pass None for the cluster's call_timeout)")

    def _ensure_alive(self) -> None:
        """Raise EngineDiedError naming the engine if one has gone; call before sending work to the engines.

        Without it, a call after an engine died while the cluster was idle fails inside ipyparallel
        (a KeyError for the engine id the controller has dropped)."""
        if self._client is None:
            raise RuntimeError("the cluster is not running: call cluster.start() (or use `with GLMCluster(...)`)")
        self._check_alive()

    @contextmanager
    def _engines_vanished(self):
        """Turn an ipyparallel error caused by an engine that has gone into EngineDiedError naming it."""
        try:
            yield
        except (KeyError, IndexError, ipp.error.EngineError, ipp.error.NoEnginesRegistered) as error:
            if self._ranks and self._client is not None:
                try:
                    self._check_alive()
                except EngineDiedError as died:
                    raise died from error
            raise

    def _rank_alive(self, rank_info: dict, registered: set) -> bool:
        # An engine the controller has dropped is gone; a local one is also gone as soon as its process is,
        # which the controller notices only later.
        if rank_info["engine"] not in registered:
            return False
        if not self._is_local(rank_info):
            return True
        try:
            return psutil.Process(rank_info["pid"]).status() != psutil.STATUS_ZOMBIE
        except psutil.NoSuchProcess:
            return False

    def _check_alive(self) -> None:
        registered = set(self._client.ids)
        for rank, r in enumerate(self._ranks):
            if not self._rank_alive(r, registered):
                raise EngineDiedError(f"engine {r['engine']} (rank {rank}, pid {r['pid']} on {r['host']}) died; "
                                      f"the other ranks cannot continue without it: call cluster.restart()")

    def _wait_all(self, pending, timeout: float, what: str, on_done: Callable[[], None] | None = None) -> list:
        deadline, done = time.monotonic() + timeout, set()
        while len(done) < len(pending):
            for i, ar in enumerate(pending):
                if i not in done and ar.ready():
                    done.add(i)
                    if on_done is not None:
                        on_done()
            if self._ranks:
                self._check_alive()
            if time.monotonic() > deadline:
                raise ClusterTimeoutError(f"{what} took longer than {timeout:.0f} s")
            time.sleep(POLL_S)
        values = []
        for rank, ar in enumerate(pending):
            try:
                with self._engines_vanished():
                    values.append(ar.get(timeout=0))
            except ipp.error.RemoteError as error:
                raise RuntimeError(f"{what} failed on rank {rank}: {error.ename}: {error.evalue}") from None
            finally:
                self._client.purge_local_results(ar)
        return values


@ipp.interactive  # runs in the engine's user namespace, where ipyparallel References are resolved
def _make_worker(rank, world_size, device, store_host, store_port, timeout_s, env):
    """Runs on an engine: create its ShardWorker and keep it in the engine's namespace."""
    from glmkit.serve.engine import WORKER_NAME, ShardWorker

    globals()[WORKER_NAME] = ShardWorker(rank, world_size, device, store_host, store_port, timeout_s, env)
    return WORKER_NAME
