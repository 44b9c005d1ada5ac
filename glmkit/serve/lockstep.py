"""The calls a GLMCluster makes on its engines: every call is one request (glmkit.generate.request), validated
in the notebook, sent to all engines on the direct channel (glmkit.serve.channel) and run by them in lockstep
through one path, `call()`, with a timeout; rank 0 streams events back.

A stop request (`stop()`, a KeyboardInterrupt, `should_abort`) is handed to rank 0 through the process group's
TCP store and takes effect at the next token on every rank, so no collective is left waiting. Starting,
watching and restarting the engines is glmkit.serve.cluster's.
"""
from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from typing import Callable

from . import engine
from ..generate.blanks import GenerationResult, TextEvent, check_callbacks
from ..generate.request import GenerateRequest
from ..generate.scoring import ScoreRequest
from ..inspect.calls import ProbeCalls

POLL_S = 0.05
# After a rank failed, how long the others get to answer before the failure is raised.
FAILURE_GRACE_S = 5.0


class ClusterTimeoutError(TimeoutError):
    """A call did not finish in time, even after a stop request."""


class LockstepCalls(ProbeCalls):
    """generate, score, stream, call and the probes, for a cluster (GLMCluster) that provides `tokenizer`,
    `config`, `last_results`, `_lock`, `_channel`, `_store`, `_call_id`, `_timeout()`, `_ensure_alive()` and
    `_check_alive()`."""

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

    def score(self, contexts, continuations, *, timeout: float | None = None, **options):
        """Score continuations on all engines in lockstep (same forms and options as GLMPipeline.score)."""
        return self.call(ScoreRequest.build(self.tokenizer, self.config.model.max_sequence_length, contexts,
                                            continuations, **options), timeout=timeout)

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
            events = self._events(request, should_abort, timeout, holder, on_progress, stream=on_event is not None)
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

    def _events(self, request, should_abort, timeout, holder: dict, on_progress=None, stream=True) -> Iterator:
        timeout = self._timeout(timeout)
        call_id = uuid.uuid4().hex
        self._call_id = call_id
        try:
            pending = self._channel.send(call_id, request, stream)  # a request that cannot be pickled fails here
        except BaseException:
            self._call_id = None
            raise
        deadline, stopping, checked = time.monotonic() + timeout, False, time.monotonic()
        try:
            while not pending.done:
                yield from pending.events(POLL_S)  # returns as soon as anything arrives
                if on_progress is not None:
                    on_progress(len(pending.replies))
                now = time.monotonic()
                if pending.failures and not pending.done and deadline > now + FAILURE_GRACE_S:
                    # A rank failed: the others stop at the next token rather than wait for it in a collective.
                    self.stop()
                    stopping, deadline = True, now + FAILURE_GRACE_S
                elif not stopping and should_abort is not None and should_abort():
                    self.stop()
                    stopping = True
                if now - checked >= POLL_S:
                    self._check_alive()
                    checked = now
                if now > deadline and not pending.done:
                    if pending.failures:
                        break
                    if stopping:
                        raise ClusterTimeoutError(f"the call did not stop within {timeout:.0f} s; the engines "
                                                  f"may be stuck: call cluster.restart()")
                    self.stop()
                    stopping, deadline = True, now + min(30.0, timeout)
        except (KeyboardInterrupt, GeneratorExit):
            # Interrupted in the notebook, or the consumer stopped iterating: engines finish the
            # current token and return, so no collective is left waiting and they stay usable.
            self.stop()
            self._finish_quietly(pending)
            raise
        finally:
            self._call_id = None
        if pending.failures:
            self._check_alive()  # an engine that died is the cause to report
        holder["result"] = pending.result(request.reduction)

    @staticmethod
    def _finish_quietly(pending, grace: float = 30.0) -> None:
        deadline = time.monotonic() + grace
        try:
            while not pending.done and time.monotonic() < deadline:
                pending.events(POLL_S)
        except Exception:
            pass

