"""Notebook side of the cluster: an ipyparallel cluster with one engine per GPU, each holding a resident shard.

    with GLMCluster(config="glm-tiny", n=2) as cluster:
        print(cluster.generate("def [MASK](x):", max_new_tokens=8).text)

Ranks are assigned from the engines' ids after connecting (sorted), GPUs from the order of a host's engines
among those ids. ipyparallel starts, watches, restarts and stops the engines; this module does that and keeps
watch over their health. The calls themselves (generate, score, stream, the probes, all through `call()`)
run in lockstep on every engine, as glmkit.serve.lockstep describes.
"""
from __future__ import annotations

import math
import secrets
import socket
import threading
import time
import warnings
from contextlib import contextmanager
from datetime import timedelta
from pathlib import Path
from typing import Callable

import ipyparallel as ipp
import pandas as pd
import psutil
import torch.distributed as dist
from ipyparallel.cluster import launcher as ipp_launcher

from . import engine, watchdog
from .channel import ClientChannel
from .lockstep import POLL_S, ClusterTimeoutError, LockstepCalls
from ..config import KitConfig, load_config
from ..generate.blanks import GenerationResult
from ..tokenizer import GLMTokenizer

__all__ = ["ClusterTimeoutError", "EngineDiedError", "GLMCluster", "LeftoverProcessesWarning"]
# How long a new cluster waits for an earlier one's processes to end by themselves before reporting them:
# their watchdogs notice a killed starter within a poll and end them within a grace.
LEFTOVER_WAIT_S = watchdog.POLL_S + 2 * watchdog.GRACE_S + 1.0


class EngineDiedError(RuntimeError):
    """An engine process ended while the cluster needed it; `cluster.restart()` brings it back."""


class LeftoverProcessesWarning(UserWarning):
    """Processes of an earlier GLMCluster still run although the process that started them is gone."""


def _seconds(name: str, value, hint: str = "") -> float:
    """`value` checked as a timeout: a finite number of seconds > 0 (the error names `name`)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be a finite number of seconds > 0, got {value!r}{hint}")
    return float(value)


class GLMCluster(LockstepCalls):
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
        self._channel: ClientChannel | None = None
        self._tokenizer: GLMTokenizer | None = None
        self._call_id: str | None = None
        self._lock = threading.RLock()  # guards the ipyparallel client and the channel: neither is thread-safe
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
        world, key = len(ids), secrets.token_bytes(32)  # the channel's signing key, handed over by ipyparallel
        pending = [self._client[r["engine"]].apply_async(_make_worker, rank, world, r["device"], store_host, port,
                                                         self.call_timeout, self.nccl_env, key,
                                                         "127.0.0.1" if len(hosts) == 1 else "*")
                   for rank, r in enumerate(self._ranks)]
        ports = self._wait_all(pending, self.start_timeout, "forming the process group")
        self._close_channel()
        self._channel = ClientChannel([f"tcp://{store_host if len(hosts) == 1 else r['host']}:{p}"
                                       for r, p in zip(self._ranks, ports)], key)
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
            self._close_channel()
            if getattr(self, "_started_here", False):
                self._ipp.stop_cluster_sync()
            else:
                self._client.close()
        finally:
            self._client, self._store, self._ranks = None, None, []

    def _close_channel(self) -> None:
        channel, self._channel = self._channel, None
        if channel is not None:
            channel.close()

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

    # --- state -------------------------------------------------------------------------------------

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

    # --- health ------------------------------------------------------------------------------------

    def _timeout(self, timeout: float | None) -> float:
        """A call's timeout: None means call_timeout; anything else must be seconds > 0."""
        hint = " (pass None for the cluster's call_timeout)"
        return self.call_timeout if timeout is None else _seconds("timeout", timeout, hint)

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
        if rank_info["host"] != socket.gethostname():
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
def _make_worker(rank, world_size, device, store_host, store_port, timeout_s, env, key, host):
    """Runs on an engine: create its ShardWorker, keep it in the engine's namespace and serve requests on
    `host`; the port."""
    from glmkit.serve.engine import WORKER_NAME, ShardWorker

    previous = globals().get(WORKER_NAME)
    if previous is not None:
        previous.stop_serving()  # a worker of an earlier group on this engine must not read the next requests
    worker = globals()[WORKER_NAME] = ShardWorker(rank, world_size, device, store_host, store_port, timeout_s, env)
    return worker.serve(key, host)
