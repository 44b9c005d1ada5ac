"""The direct line between the notebook and its engines: requests out, streamed events and replies back.

ipyparallel starts, watches, restarts and stops the engines; calls do not go through it. One ipyparallel
apply is a round trip through the controller and each engine's kernel, about 6-7 ms on a CPU
(`python -m glmkit.lab.fixed_cost`), and that was most of a short call's fixed cost. Instead each engine's
worker serves requests on a ZMQ socket of its own (`RequestServer`, a thread that runs the requests one after
another, in the order they came), and the notebook (`ClientChannel`) sends every rank the same pickled request
and reads what comes back: rank 0's event batches, then each rank's reply. One connection per rank keeps them
in order, so the last events always arrive before the reply.

Every message is signed with a key the notebook hands the engines through ipyparallel (whose own messages
are signed), and a message whose signature does not match is dropped unread: a port that anyone on the host
can reach never unpickles what a stranger sent.
"""
from __future__ import annotations

import hashlib
import hmac
import pickle
import threading
import traceback
from typing import Any

import zmq

# How often an idle server looks whether it is being closed.
IDLE_POLL_S = 0.2


def _sign(key: bytes, payload: bytes) -> bytes:
    return hmac.new(key, payload, hashlib.sha256).digest()


def _pack(key: bytes, message: tuple) -> list[bytes]:
    payload = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
    return [_sign(key, payload), payload]


def _unpack(key: bytes, frames: list[bytes]):
    """The message of signed `frames`, or None for frames not signed with `key` (never unpickled)."""
    if len(frames) != 2 or not hmac.compare_digest(frames[0], _sign(key, frames[1])):
        return None
    return pickle.loads(frames[1])


class RequestServer:
    """An engine's end: a thread that runs each request arriving on its socket on `worker` and answers it.

    Messages in: ("call", call_id, pickled request, stream): the request is unpickled apart, so that one the
    engine cannot unpickle (its class unknown here) fails that call, not the server. Out: ("events", call_id,
    batch) from rank 0 while a streamed call runs, then ("done", call_id, value) or ("failed", call_id, type
    name, message, traceback).
    """

    def __init__(self, worker, key: bytes, host: str = "127.0.0.1"):
        self.worker, self._key = worker, key
        self._context = zmq.Context()
        self._socket = self._context.socket(zmq.ROUTER)
        self._socket.linger = 0
        self.port = self._socket.bind_to_random_port(f"tcp://{host}")
        self._closing = threading.Event()
        # From here on only the thread uses the socket (ZMQ sockets are not thread-safe).
        self._thread = threading.Thread(target=self._serve, name="glmkit-requests", daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        device = self.worker.device
        if device.type == "cuda":
            import torch

            torch.cuda.set_device(device)  # the current device is per thread
        try:
            while not self._closing.is_set():
                if not self._socket.poll(IDLE_POLL_S * 1000):
                    continue
                identity, *frames = self._socket.recv_multipart()
                message = _unpack(self._key, frames)
                if message is not None and message[0] == "call":
                    self._run(identity, *message[1:])
        finally:
            self._socket.close(linger=0)
            self._context.term()

    def _run(self, identity: bytes, call_id: str, request: bytes, stream: bool) -> None:
        def send(*message) -> None:
            self._socket.send_multipart([identity, *_pack(self._key, message)])

        publish = (lambda batch: send("events", call_id, batch)) if stream else None
        try:
            value = self.worker.handle(call_id, pickle.loads(request), publish)
            frames = _pack(self._key, ("done", call_id, value))  # an unpicklable result fails here, as a failure
        except BaseException as error:  # whatever the request raised, the notebook hears of it; serving goes on
            frames = _pack(self._key, ("failed", call_id, type(error).__name__, str(error), traceback.format_exc()))
        self._socket.send_multipart([identity, *frames])

    def close(self, timeout: float = 5.0) -> None:
        """Stop serving once the request now running (if any) is done."""
        self._closing.set()
        self._thread.join(timeout)


class PendingCall:
    """One call in flight: the events streamed so far and what each rank has answered."""

    def __init__(self, channel: "ClientChannel", call_id: str):
        self.channel, self.call_id = channel, call_id
        self.replies: dict[int, Any] = {}
        self.failures: dict[int, tuple[str, str, str]] = {}  # rank: (type name, message, traceback)

    @property
    def done(self) -> bool:
        return len(self.replies) + len(self.failures) == len(self.channel.addresses)

    def events(self, timeout: float) -> list:
        """The events that arrive within `timeout` seconds (returns as soon as anything arrives)."""
        events = []
        for rank, message in self.channel.receive(timeout):
            kind, call_id, *body = message
            if call_id != self.call_id:
                continue  # the end of an earlier call that was given up on
            if kind == "events":
                events.extend(body[0])
            elif kind == "done":
                self.replies[rank] = body[0]
            else:
                self.failures[rank] = tuple(body)
        return events

    def error(self) -> RuntimeError:
        """The first failed rank's error, naming the rank; its engine-side traceback as a note."""
        rank = min(self.failures)
        name, message, remote_traceback = self.failures[rank]
        error = RuntimeError(f"the call failed on rank {rank}: {name}: {message}")
        error.add_note(f"rank {rank}'s traceback:\n{remote_traceback}")
        unfinished = [r for r in range(len(self.channel.addresses)) if r not in self.replies and r not in self.failures]
        if unfinished:
            error.add_note(f"ranks {unfinished} had not finished the call; if the next one hangs, call "
                           f"cluster.restart()")
        return error

    def result(self, reduction: str):
        """Rank 0's value ("rank0") or every rank's ("all"), once `done`."""
        if self.failures:
            raise self.error()
        return [self.replies[r] for r in sorted(self.replies)] if reduction == "all" else self.replies[0]


class ClientChannel:
    """The notebook's end: one socket per rank, connected to that rank's RequestServer."""

    def __init__(self, addresses: list[str], key: bytes):
        self.addresses, self._key = list(addresses), key
        self._context = zmq.Context()
        self._sockets, self._poller = [], zmq.Poller()
        for address in self.addresses:
            sock = self._context.socket(zmq.DEALER)
            sock.linger = 0
            sock.connect(address)
            self._poller.register(sock, zmq.POLLIN)
            self._sockets.append(sock)

    def send(self, call_id: str, request, stream: bool) -> PendingCall:
        """Send `request` to every rank (the same bytes, pickled once); the call to follow its replies with."""
        frames = _pack(self._key, ("call", call_id, pickle.dumps(request, protocol=pickle.HIGHEST_PROTOCOL), stream))
        for sock in self._sockets:
            # Queued by ZMQ until the engine reads it; a full queue means the engine has stopped reading.
            sock.send_multipart(frames, flags=zmq.NOBLOCK)
        return PendingCall(self, call_id)

    def receive(self, timeout: float) -> list[tuple[int, tuple]]:
        """(rank, message) of everything that arrives within `timeout` seconds, in each rank's order."""
        received, ready = [], dict(self._poller.poll(timeout * 1000))
        for rank, sock in enumerate(self._sockets):
            while sock in ready:
                try:
                    frames = sock.recv_multipart(flags=zmq.NOBLOCK)
                except zmq.Again:
                    break
                message = _unpack(self._key, frames)
                if message is not None:
                    received.append((rank, message))
        return received

    def close(self) -> None:
        """Close the sockets (what is still queued is dropped)."""
        for sock in self._sockets:
            sock.close(linger=0)
        self._context.term()
