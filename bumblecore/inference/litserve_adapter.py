"""Every use of LitServe beyond its public surface (LitAPI, LitSpec, LitServer, its loops and
callbacks), in this one module, each with the reason it is needed. tests/inference/test_litserve_adapter.py
checks that every name used here still exists with the shape relied on, so a LitServe upgrade that
moves one fails there, naming it, rather than in a running server.

Four kinds of use. The request queue and the reply buffers are how a LitSpec's own endpoint talks
to the inference worker (LitServe's OpenAISpec does the same), for which LitServe has no public
method. A decode step's replies travel as one transport message (`send_step`, `StepFanOut`):
LitServe sends one per request per step. The replies travel through an OS pipe (`PipeTransport`)
instead of LitServe's default transport, a queue of its manager process. And `InProcessLitServer`
runs the HTTP server in a thread of this process and can be stopped from another thread, which
LitServer's public `run()` cannot do.
"""

import asyncio
import json
import multiprocessing
import os
import pickle
import threading
import time
from collections import deque
from typing import Any, Optional

import litserve as ls
import uvicorn
from litserve.loops.base import _SENTINEL_VALUE
from litserve.specs.base import LitSpec
from litserve.transport.base import MessageTransport
from litserve.utils import LitAPIStatus, LoopResponseType, ResponseBufferItem, WorkerSetupStatus

_timeout = getattr(asyncio, "timeout", None)  # Python 3.11+
GRACEFUL_SHUTDOWN_SECONDS = 3  # uvicorn's wait for open connections at shutdown (LitServe's: 30)
MONITOR_INTERVAL = 0.25  # LitServe's worker-health poll, in seconds (its default: 2)

# ---------------------------------------------------------------------------- the request queue


def is_stop_message(item) -> bool:
    """LitServe's own loops stop on this message; a loop that reads the queue itself must too."""
    return item == _SENTINEL_VALUE


def unpack_request(item) -> tuple[int, str, Any]:
    """(reply queue id, uid, payload) of a request-queue message; LitServe's messages also carry
    the time they were queued, which we do not use (no request timeout)."""
    response_queue_id, uid, _queued_at, payload = item
    return response_queue_id, uid, payload


def send_to_worker(spec: LitSpec, uid: str, payload) -> None:
    """Queue a message for the inference worker, as LitServe's own request handlers do: its
    handlers are not used for a spec's endpoints, and no public method queues a request."""
    spec.request_queue.put((spec.response_queue_id, uid, time.monotonic(), payload))


class ReplyBuffer:
    """The worker's messages for one request, (data, status) pairs, as LitServe's reply reader
    hands them over: appended to the buffer registered under the request's uid, with an event set."""

    def __init__(self, spec: LitSpec, uid: str):
        self.spec, self.uid = spec, uid
        self.item = ResponseBufferItem(event=asyncio.Event(), response_queue=deque())
        spec.response_buffer[uid] = self.item

    async def wait(self, timeout: Optional[float]) -> None:
        """Until a message arrives or `timeout` seconds pass (None: until a message arrives)."""
        if self.item.event.is_set():
            return
        if timeout is None:
            await self.item.event.wait()
            return
        try:
            if _timeout is None:  # Python 3.10
                await asyncio.wait_for(self.item.event.wait(), timeout=timeout)
            else:  # no task per wait, as wait_for makes (this runs per request per step)
                async with _timeout(timeout):
                    await self.item.event.wait()
        except asyncio.TimeoutError:
            pass

    async def pause(self, seconds: float) -> None:
        """Sleep `seconds`, or less: StepFanOut ends the pause when the request's last message arrives."""
        loop = asyncio.get_running_loop()
        self.item.ending = ending = loop.create_future()  # an attribute of ours on LitServe's buffer item
        timer = loop.call_later(seconds, _resolve, ending)
        try:
            await ending
        finally:
            timer.cancel()
            self.item.ending = None

    def next(self) -> Optional[tuple[Any, str]]:
        return self.item.response_queue.popleft() if self.item.response_queue else None

    def clear(self) -> None:
        """Taken all: wait for the next message."""
        self.item.event.clear()

    def close(self) -> None:
        """Forget the request: later messages for it are dropped."""
        self.spec.response_buffer.pop(self.uid, None)


# ---------------------------------------------------------------------------- one message per step

STEP_UID = "bumblecore-step"  # the reply buffer that takes a step's message and hands it out


def send_step(loop, transport, replies: dict[int, list]) -> None:
    """A decode step's replies, [(uid, data, status), ...] per reply-queue id, one message each.
    Each message through LitServe's transport is a round trip to its manager process and one more
    read on the HTTP side; per request per token that cost ~10x the tiny model's own step."""
    for response_queue_id, items in replies.items():
        loop.put_response(transport, response_queue_id, STEP_UID, items, LitAPIStatus.OK, LoopResponseType.STREAMING)


class _FanOutQueue:
    def __init__(self, response_buffer: dict):
        self.response_buffer = response_buffer

    def append(self, response) -> None:
        items, _status = response
        for uid, data, status in items:
            item = self.response_buffer.get(uid)
            if item is not None:  # else its client is gone (its buffer closed): dropped, as LitServe does
                item.response_queue.append((data, status))
                item.event.set()
                ending = getattr(item, "ending", None)
                if ending is not None and status != LitAPIStatus.OK:  # its end: a paused reply goes out now
                    _resolve(ending)


def _resolve(future: asyncio.Future) -> None:
    if not future.done():
        future.set_result(None)


class _NoEvent:
    def set(self) -> None:
        pass


class StepFanOut(ResponseBufferItem):
    """Registered as the reply buffer of STEP_UID: LitServe's reply reader appends a step's message
    to it, and it appends each (data, status) to its own request's buffer, as the reader itself
    would have done for a message per request."""

    def __init__(self, response_buffer: dict):
        super().__init__(event=_NoEvent(), response_queue=_FanOutQueue(response_buffer))

    @classmethod
    def install(cls, spec: LitSpec) -> None:
        spec.response_buffer[STEP_UID] = cls(spec.response_buffer)


def worker_error_message(data) -> str:
    """The message of a worker's error reply: our step's `{"error": ...}` (a dict in a step's
    message), or what LitServe pickles: an exception of its own, or a JSON line."""
    if isinstance(data, dict) and "error" in data:
        return str(data["error"])
    try:
        data = pickle.loads(data) if isinstance(data, bytes) else data
        return json.loads(data).get("error", str(data)) if isinstance(data, str) else str(data)
    except Exception:
        return "see the server log"


# ---------------------------------------------------------------------------- the reply transport

FRAME_HEADER = 4  # bytes: each message on the pipe is its pickle's length (little-endian), then the pickle


class PipeTransport(MessageTransport):
    """The worker's replies to the HTTP process through one OS pipe, read on the HTTP server's event
    loop as they arrive. LitServe's default transport is a queue of its manager process: each message
    a round trip from the worker to that process and another from a thread of the HTTP process (per
    decode step, more than a small model's step). Its `fast_queue=True` (ZeroMQ) is not selected by
    LitServe 0.2.19 (a misnamed field), and its PUB/SUB sockets drop messages past their high-water
    mark; a full pipe makes the worker wait instead. One reader: the one HTTP server
    InProcessLitServer starts (LitServe's consumer 0)."""

    def __init__(self, writer=None):
        self._reader = None
        if writer is None:  # in the HTTP process; the worker gets the writing end only (__reduce__)
            self._reader, writer = multiprocessing.get_context("spawn").Pipe(duplex=False)
        self._writer = writer
        self._sending = threading.Lock()  # the worker sends from its decode thread and its event loop
        self._arrived: Optional[asyncio.Queue] = None
        self._pipe: Optional[asyncio.ReadTransport] = None
        self._loop: Optional[asyncio.AbstractEventLoop] = None
        self._closed = False

    def __reduce__(self):
        return PipeTransport, (self._writer,)

    def send(self, item: Any, consumer_id: int) -> None:
        payload = pickle.dumps(item, protocol=pickle.HIGHEST_PROTOCOL)
        frame = memoryview(len(payload).to_bytes(FRAME_HEADER, "little") + payload)
        with self._sending:
            while frame:
                frame = frame[os.write(self._writer.fileno(), frame) :]

    async def areceive(self, consumer_id: Optional[int] = None, timeout: Optional[float] = None):
        if self._arrived is None:  # first call, on the HTTP server's event loop: start reading there
            self._arrived, self._loop = asyncio.Queue(), asyncio.get_running_loop()
            self._pipe, _ = await self._loop.connect_read_pipe(lambda: _FrameReader(self._arrived), self._reader)
        if self._closed and self._arrived.empty():
            raise asyncio.CancelledError("transport closed")
        try:
            item = await asyncio.wait_for(self._arrived.get(), timeout) if timeout else await self._arrived.get()
        except asyncio.TimeoutError:
            return None  # as LitServe's own transport answers a timeout
        if item is _FrameReader.CLOSED:
            self._closed = True
            raise asyncio.CancelledError("transport closed")
        return item

    def close(self, send_sentinel: bool = True) -> None:
        # From LitServe's shutdown, on another thread: the read end closes on its own event loop.
        self._closed = True
        if self._pipe is not None:
            try:
                self._loop.call_soon_threadsafe(self._pipe.close)
            except RuntimeError:  # its loop is closed already
                pass


class _FrameReader(asyncio.Protocol):
    """Cuts the pipe's bytes into messages, unpickles each and queues it for areceive()."""

    CLOSED = object()

    def __init__(self, arrived: asyncio.Queue):
        self.arrived, self.buffer = arrived, bytearray()

    def data_received(self, data: bytes) -> None:
        buffer = self.buffer
        buffer += data
        start = 0
        while len(buffer) - start >= FRAME_HEADER:
            end = start + FRAME_HEADER + int.from_bytes(buffer[start : start + FRAME_HEADER], "little")
            if end > len(buffer):
                break
            self.arrived.put_nowait(pickle.loads(buffer[start + FRAME_HEADER : end]))
            start = end
        del buffer[:start]

    def connection_lost(self, exc) -> None:
        self.arrived.put_nowait(self.CLOSED)


# ---------------------------------------------------------------------------- the server


class HTTPThread(threading.Thread):
    """The uvicorn server in a thread, with the process-like stop methods LitServe's shutdown calls."""

    def __init__(self, server: uvicorn.Server, sockets):
        super().__init__(target=server.run, kwargs={"sockets": sockets}, name="bumblecore-http", daemon=True)
        self.server = server

    def terminate(self):
        self.server.should_exit = True

    def kill(self):
        self.server.force_exit = True


class InProcessLitServer(ls.LitServer):
    """A LitServer whose one HTTP server runs in a thread of this process (the tokenizer is loaded
    once; LitServe forks a process per HTTP server, or starts threads it cannot stop), which stops
    from another thread (`stop()`), and which does not wait forever for a worker that died."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.monitor_internal = MONITOR_INTERVAL  # sic: LitServe's name for it

    def _init_manager(self, num_api_servers: int):
        # LitServe's hook that makes its queues and its reply transport, before it starts the worker.
        # Its request queues are queues of its manager process: a put blocks the HTTP event loop for a
        # round trip to that process (long when the machine is busy). A multiprocessing queue's put
        # returns at once (a thread of this process writes it to a pipe) and the worker reads it directly.
        manager = super()._init_manager(num_api_servers)
        for path in self.litapi_request_queues:
            requests = multiprocessing.get_context("spawn").Queue()
            requests.cancel_join_thread()  # at exit, do not wait for a worker that is gone to read it
            self.litapi_request_queues[path] = requests
        self._transport = PipeTransport()
        return manager

    def replace_get_route(self, path: str, endpoint) -> None:
        """Serve GET `path` with `endpoint` instead of LitServe's own route there ("/" answers "litserve running")."""
        routes = self.app.router.routes
        routes[:] = [route for route in routes if getattr(route, "path", None) != path]
        self.app.add_api_route(path, endpoint, methods=["GET"], include_in_schema=False)

    def _start_server(self, port, num_uvicorn_servers, log_level, sockets, uvicorn_worker_type, **kwargs):
        # LitServe's hook that starts its HTTP servers; `kwargs` are run()'s uvicorn options.
        # LitServe sets these ids per server it starts: ours is its only one.
        self.app.response_queue_id = 0
        self.lit_api.spec.response_queue_id = 0
        config = uvicorn.Config(
            app=self.app, log_level=log_level, timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_SECONDS, **kwargs
        )
        thread = HTTPThread(uvicorn.Server(config), sockets)
        thread.start()
        return {0: thread}

    def verify_worker_status(self):
        # LitServe waits for READY or ERROR; a worker that dies before it can say either (an import
        # error, killed while loading) would leave it waiting forever.
        while not any(v == WorkerSetupStatus.READY for v in self.workers_setup_status.values()):
            failed = any(v == WorkerSetupStatus.ERROR for v in self.workers_setup_status.values())
            if failed or not all(worker.is_alive() for worker in self.inference_workers):
                for worker in self.inference_workers:
                    worker.terminate()
                self.transport_config.manager.shutdown()
                raise RuntimeError("the inference worker failed to start: see its log above")
            time.sleep(0.05)

    def _perform_graceful_shutdown(self, manager, uvicorn_workers, shutdown_reason="normal"):
        # Let LitServe's monitor thread see the shutdown flag before the manager it polls goes away.
        time.sleep(self.monitor_internal + 0.1)
        super()._perform_graceful_shutdown(manager, uvicorn_workers, shutdown_reason)

    def stop(self) -> None:
        """End a server started with run() (from another thread): run() waits on this event."""
        if self._shutdown_event is not None:
            try:
                self._shutdown_event.set()
            except OSError:  # its manager is gone: the server already shut down (or never started)
                pass
