"""Notebook side of the cluster: an ipyparallel cluster with one engine per GPU, each holding a resident shard.

    with GLMCluster(config="glm-tiny", n=2) as cluster:
        print(cluster.generate("def [MASK](x):", max_new_tokens=8).text)

Ranks are assigned from the engines' ids after connecting (sorted), GPUs from the order of a host's engines
among those ids. Every call runs on all engines in lockstep and has a timeout; a stop request (`stop()`, a
KeyboardInterrupt, `should_abort`) is handed to rank 0 through the process group's TCP store and takes
effect at the next token on every rank, so no collective is left waiting.
"""
from __future__ import annotations

import random
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Callable

import ipyparallel as ipp
import pandas as pd
import psutil
import torch.distributed as dist

from . import engine
from ..config import KitConfig, load_config
from ..generate.blanks import GenerationResult, TextEvent, check_call, plan_prompt
from ..generate.sampling import GenerationSettings
from ..tokenizer import GLMTokenizer

POLL_S = 0.05


class EngineDiedError(RuntimeError):
    """An engine process ended while the cluster needed it; `cluster.restart()` brings it back."""


class ClusterTimeoutError(TimeoutError):
    """A call did not finish in time, even after a stop request."""


class GLMCluster:
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
        self.call_timeout, self.start_timeout = call_timeout, start_timeout
        self._ipp: ipp.Cluster | None = None
        self._client: ipp.Client | None = None
        self._ranks: list[dict] = []  # per rank: engine id, host, pid, device
        self._store: dist.TCPStore | None = None
        self._tokenizer: GLMTokenizer | None = None
        self._call_id: str | None = None
        self._lock = threading.RLock()  # guards the ipyparallel client, which is not thread-safe
        self.last_results: list[GenerationResult] | None = None

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
            self._ipp = self.build_ipp_cluster()
            self._client = self._ipp.start_and_connect_sync()
            self._started_here = True
        self._client.wait_for_engines(self.n or len(self._client.ids) or 1, timeout=self.start_timeout)
        self._form_group()
        return self

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

    def load(self, config: str | Path | KitConfig) -> pd.DataFrame:
        """Load `config`'s checkpoint: each engine reads only its own shard. Shows a progress bar."""
        from tqdm.auto import tqdm

        self.config = load_config(config) if isinstance(config, (str, Path)) else config
        if self._client is None:
            self.start()
        self._tokenizer = GLMTokenizer.load(self.config.tokenizer)  # notebook-side, for prompt checks
        with self._lock:
            pending = [self._client[r["engine"]].apply_async(
                engine.call_worker, ipp.Reference(engine.WORKER_NAME), "load", self.config) for r in self._ranks]
            with tqdm(total=len(pending), desc=f"loading {self.config.name} shards", unit="shard") as bar:
                self._wait_all(pending, self.call_timeout, "loading", on_done=lambda: bar.update(1))
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
        self._ipp.start_engines_sync(n=len(self._ranks) or self._engine_count())
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
        rows = []
        for r in self._ranks:
            alive = psutil.pid_exists(r["pid"]) if self._is_local(r) else None
            row = {"engine": r["engine"], "host": r["host"], "pid": r["pid"], "alive": alive}
            if alive is not False:
                row.update(self._client[r["engine"]].apply_sync(
                    engine.call_worker, ipp.Reference(engine.WORKER_NAME), "status"))
            rows.append(row)
        return rows

    def stop(self) -> None:
        """Ask the running generation to stop at the next token on every engine."""
        call_id = self._call_id
        if call_id is not None and self._store is not None:
            self._store.set(engine.abort_key(call_id), "1")

    def generate(self, prompts: str | list[str], *, on_text: Callable[[TextEvent], None] | None = None,
                 should_abort: Callable[[], bool] | None = None, timeout: float | None = None,
                 **kwargs) -> GenerationResult | list[GenerationResult]:
        """Fill blanks on all engines in lockstep (same keywords as GLMPipeline.generate); rank 0's result."""
        batch = check_call(prompts, on_text, should_abort)
        kwargs = self._checked(batch, kwargs)
        holder: dict = {}
        with self._lock:  # one call at a time, also from widget threads: engines run calls in order
            run = self._run(batch, kwargs, should_abort, timeout or self.call_timeout, holder)
            try:
                for event in run:
                    if on_text is not None:
                        on_text(event)
            finally:
                # An exception in the callback (a KeyboardInterrupt, say) must still stop the engines:
                # closing the generator runs its cleanup now, not whenever it is collected.
                run.close()
        results = holder["results"]
        return results[0] if isinstance(prompts, str) else results

    def stream(self, prompts: str | list[str], *, should_abort: Callable[[], bool] | None = None,
               timeout: float | None = None, **kwargs) -> Iterator[TextEvent]:
        """Yield TextEvents as engines generate; the results are in `last_results` afterwards."""
        batch = check_call(prompts, None, should_abort)
        kwargs = self._checked(batch, kwargs)
        holder: dict = {}
        with self._lock:
            yield from self._run(batch, kwargs, should_abort, timeout or self.call_timeout, holder)
            self.last_results = holder["results"]

    def _checked(self, batch: list[str], kwargs: dict) -> dict:
        # Validate here, before any engine works: bad input gets the same clear errors as in-process.
        if not batch:
            raise ValueError("no prompts given: pass a string or a non-empty list of strings")
        settings = GenerationSettings.from_kwargs(**kwargs)
        for prompt in batch:
            plan_prompt(self.tokenizer, prompt, self.config.model.max_sequence_length)
        if settings.seed is None and not settings.greedy:
            # Every rank must draw the same samples, so an unseeded call still gets one shared seed.
            kwargs = {**kwargs, "seed": random.randrange(2**31)}
        return kwargs

    def _run(self, batch, kwargs, should_abort, timeout, holder: dict) -> Iterator[TextEvent]:
        call_id = uuid.uuid4().hex
        self._call_id = call_id
        view = self._client[[r["engine"] for r in self._ranks]]
        ar = view.apply_async(engine.call_worker, ipp.Reference(engine.WORKER_NAME), "generate",
                              call_id, batch, kwargs)
        emitted, deadline, stopping = 0, time.monotonic() + timeout, False
        try:
            while not ar.ready():
                data = ar.data[0] if ar.data else None
                if data and data.get("call") == call_id:
                    events = data["events"]
                    yield from events[emitted:]
                    emitted = max(emitted, len(events))
                if not stopping and should_abort is not None and should_abort():
                    self.stop()
                    stopping = True
                self._check_alive()
                if time.monotonic() > deadline:
                    if stopping:
                        raise ClusterTimeoutError(f"generation did not stop within {timeout:.0f} s; the engines "
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
        results, events = self._result(ar)
        holder["results"] = results
        self._call_id = None
        yield from events[emitted:]

    def _result(self, ar):
        try:
            values = ar.get(timeout=0)
        except ipp.error.CompositeError as error:
            self._check_alive()
            raise RuntimeError(f"generation failed on the engines: {error.elist[0][0]}: {error.elist[0][1]}") from None
        except ipp.error.RemoteError as error:
            self._check_alive()
            raise RuntimeError(f"generation failed on an engine: {error.ename}: {error.evalue}") from None
        finally:
            self._client.purge_local_results(ar)
        return values[0]

    def _finish_quietly(self, ar, grace: float = 30.0) -> None:
        try:
            ar.wait(grace)
            self._client.purge_local_results(ar)
        except Exception:
            pass

    # --- health ------------------------------------------------------------------------------------

    def _is_local(self, rank_info: dict) -> bool:
        return rank_info["host"] == socket.gethostname()

    def _check_alive(self) -> None:
        registered = set(self._client.ids)
        for rank, r in enumerate(self._ranks):
            gone = r["engine"] not in registered
            if self._is_local(r):
                try:
                    gone = gone or psutil.Process(r["pid"]).status() == psutil.STATUS_ZOMBIE
                except psutil.NoSuchProcess:
                    gone = True
            if gone:
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
