"""The inference worker of `bumblecore serve`: the model and one `GenerationEngine`, in the process
LitServe starts for it. Requests reach it through LitServe's request queue and text deltas go back
through its transport.

LitServe's `ContinuousBatchingLoop` drives the engine: a new request joins the running batch between
two decode steps, and each step hands back every active request's text delta. Our subclass adds
what LitServe's loop lacks: a request whose client went away is cancelled (its slot is free at the
next step), an idle worker waits for work instead of spinning, and a step's deltas for all requests
go back as one transport message (LitServe sends one per request, which costs more than a tiny
model's whole step). A request the engine fails on
fails alone; the engine never keeps a failed request (else every later step fails too), and /health
turns 503 while the engine cannot serve.
"""

import asyncio
import logging
import multiprocessing
import os
import time
from collections import deque
from typing import Optional

import litserve as ls
from fastapi import Request
from litserve.loops import ContinuousBatchingLoop, Output
from litserve.specs.base import LitSpec
from litserve.utils import LitAPIStatus, LoopResponseType

from bumblecore.inference.litserve_adapter import is_stop_message, send_step, unpack_request
from bumblecore.inference.request_guard import PUBLIC_PATHS, check_key
from bumblecore.inference.serve_settings import ServeSettings, context_length

CANCEL = {"cancel": True}  # sent through the request queue, under the uid of the request to stop
FAILURES_UNTIL_UNHEALTHY = 3  # requests failed in a row by the engine, none served in between
log = logging.getLogger("bumblecore.serve")


class EngineLoop(ContinuousBatchingLoop):
    """LitServe's continuous-batching loop, plus cancellation and an idle wait."""

    def __init__(self):
        super().__init__()
        self.server_pid = os.getpid()  # made in the server process, before LitServe starts the worker
        self.work_arrived: Optional[asyncio.Event] = None  # made inside the worker's event loop

    def _wake(self) -> None:
        if self.work_arrived is not None:
            self.work_arrived.set()

    async def prefill(
        self, pending_requests, lit_api, lit_spec, request_queue, transport, max_batch_size=None, batch_timeout=None
    ):
        """Take one message from the request queue: a new request joins (or waits for a slot), a
        cancellation acts at once, even when every slot is busy."""
        while pending_requests and lit_api.has_capacity():
            response_queue_id, uid, request = pending_requests.pop(0)
            self.response_queue_ids[uid] = response_queue_id
            self.add_request(uid, request, lit_api, lit_spec, transport)
            self._wake()
        # Waiting requests retry soon, as slots free up between steps; otherwise block on the queue.
        item = await asyncio.to_thread(self.get_request, request_queue, timeout=0.01 if pending_requests else 1.0)
        if item is None:
            return pending_requests
        if is_stop_message(item):
            raise asyncio.CancelledError("server shutting down")
        response_queue_id, uid, request = unpack_request(item)
        if request == CANCEL:
            waiting = [p for p in pending_requests if p[1] == uid]
            if waiting:
                pending_requests.remove(waiting[0])
            elif uid in self.active_sequences:
                lit_api.cancel_request(uid)
                self._wake()
        elif lit_api.has_capacity():
            self.response_queue_ids[uid] = response_queue_id
            self.add_request(uid, request, lit_api, lit_spec, transport)
            self._wake()
        else:
            pending_requests.append((response_queue_id, uid, request))
        return pending_requests

    async def run(self, lit_api, device, worker_id, request_queue, transport, workers_setup_status, callback_runner):
        if self.work_arrived is None:
            self.work_arrived = asyncio.Event()
        if not lit_api.has_active_requests():
            if os.getppid() != self.server_pid:  # the server process is gone (killed): do not linger
                os._exit(0)
            # LitServe calls run() again at once when it returns; wait here instead of spinning.
            try:
                await asyncio.wait_for(self.work_arrived.wait(), timeout=0.5)
            except asyncio.TimeoutError:
                pass
            self.work_arrived.clear()
            return
        # The decode steps run in one thread while requests are active (not a thread hop per step);
        # this event loop meanwhile takes new requests and cancellations (prefill).
        await asyncio.to_thread(self.decode_while_active, lit_api, transport)
        lit_api.publish_health()

    def decode_while_active(self, lit_api, transport) -> None:
        """Decode steps while any request is active (LitServe's run(), with one message per step)."""
        try:
            while lit_api.has_active_requests():
                outputs = lit_api.step(None)
                if not outputs:
                    time.sleep(0.001)
                    continue
                replies: dict[int, list] = {}
                done = []
                for out in outputs:
                    response_queue_id = self.response_queue_ids.get(out.uid)
                    if response_queue_id is None:
                        continue
                    replies.setdefault(response_queue_id, []).append((out.uid, out.output, out.status))
                    if out.status in (LitAPIStatus.FINISH_STREAMING, LitAPIStatus.ERROR):
                        done.append(out.uid)
                send_step(self, transport, replies)
                for uid in done:
                    self.mark_completed(uid)
        except Exception as err:  # as LitServe's loop does: every request it tracks gets the error
            log.exception("error in the serving loop")
            for uid, response_queue_id in list(self.response_queue_ids.items()):
                self.put_error_response(transport, response_queue_id, uid, err, LoopResponseType.STREAMING)
            self.response_queue_ids.clear()
            self.active_sequences.clear()


class EngineAPI(ls.LitAPI):
    """The model behind the API. In the worker: requests in, one text delta per request per step
    out. In the HTTP process it only checks API keys (`authorize`, LitServe's hook)."""

    def __init__(self, settings: ServeSettings, spec: Optional[LitSpec]):
        super().__init__(max_batch_size=settings.max_batch_size, stream=True, spec=spec, loop=EngineLoop())
        self.settings = settings
        # Shared memory, handed to the worker process as LitServe starts it: the worker writes
        # whether its engine can serve, LitServe's /health (in this process) reads it through health().
        self.engine_serving = multiprocessing.get_context("spawn").Value("b", 1, lock=False)

    def setup(self, device):
        from bumblecore.inference.generate import GenerationEngine
        from bumblecore.inference.loading import load_for_inference

        settings = self.settings
        device = device if settings.device_map == "auto" else settings.device_map
        model, tokenizer, eos = load_for_inference(
            settings.model_path,
            settings.dtype,
            device,
            trust_remote_code=settings.trust_remote_code,
            chat_template=settings.chat_template,
            base_model_path=settings.base_model_path,
            ignore_base_mismatch=settings.ignore_base_mismatch,
        )
        max_len = context_length(settings.model_path, settings.max_model_len, settings.base_model_path)
        self.engine = GenerationEngine(
            model,
            tokenizer,
            settings.max_batch_size,
            max_len,
            eos_token_ids=eos,
            prefix_cache_mb=settings.prefix_cache_mb,
            static_cache=settings.static_cache,
        )
        # add_request runs on the loop's event-loop thread, step() on another: hand over through deques.
        self.arrivals: deque = deque()
        self.cancellations: deque = deque()
        self.engine_ids: dict[str, int] = {}  # LitServe uid -> engine request id
        self.requests: dict[int, list] = {}  # engine request id -> [uid, tokens generated so far]
        self.failures_in_a_row = 0

    @property
    def healthy(self) -> bool:
        """False once several requests in a row failed in the engine with none served in between
        (a request that fails alone among working ones does not count against it)."""
        return self.failures_in_a_row < FAILURES_UNTIL_UNHEALTHY

    def publish_health(self) -> None:
        """In the worker: tell the HTTP process (health()) whether the engine can serve."""
        self.engine_serving.value = self.healthy

    def health(self) -> bool:
        """LitServe's hook for /health (in the HTTP process): 503 while the engine cannot serve."""
        return bool(self.engine_serving.value)

    async def authorize(self, request: Request) -> None:
        # async: FastAPI runs a plain function dependency in its thread pool, a thread hop per request
        if request.url.path not in PUBLIC_PATHS:
            check_key(self.settings.api_key, request.headers.get("authorization", ""))

    def add_request(self, uid: str, request: dict) -> None:
        self.arrivals.append((uid, request))

    def cancel_request(self, uid: str) -> None:
        self.cancellations.append(uid)

    def has_capacity(self) -> bool:
        return self.engine.free_slots - len(self.arrivals) > 0

    def has_active_requests(self) -> bool:
        return bool(self.engine.active or self.arrivals or self.cancellations)

    def step(self, prev_outputs) -> list[Output]:
        try:
            return self._step()
        except Exception as err:
            # The engine isolates a failing request itself; this is a failure it could not pin on
            # one. Fail every request it holds and start clean, so the next step does not raise again.
            log.exception("the engine's step failed; failing the requests it held")
            return self._fail_all(err)

    def _step(self) -> list[Output]:
        outputs = []
        while self.arrivals:
            # Taken off the deque only once it holds a slot, so has_capacity() (read from the other
            # thread meanwhile) never counts a slot twice.
            uid, request = self.arrivals[0]
            try:
                request_id = self.engine.add(request["prompt_ids"], request["params"])
            except Exception as err:  # checked in the HTTP process already; kept as a guard
                self.arrivals.popleft()
                self.failures_in_a_row += 1
                outputs.append(Output(uid, {"error": f"{type(err).__name__}: {err}"}, LitAPIStatus.ERROR))
                continue
            self.engine_ids[uid] = request_id
            self.requests[request_id] = [uid, 0]
            self.arrivals.popleft()
        # After the arrivals: a request cancelled right after it arrived is dropped before its prefill.
        while self.cancellations:
            uid = self.cancellations.popleft()
            request_id = self.engine_ids.pop(uid, None)
            if request_id is not None:
                self.engine.cancel(request_id)
                self.requests.pop(request_id, None)
                outputs.append(Output(uid, "", LitAPIStatus.FINISH_STREAMING))
        for event in self.engine.step():
            state = self.requests[event.request_id]
            uid = state[0]
            if event.error is not None:  # this request alone failed; its slot is free already
                log.error("request %s failed in the engine: %s", uid, event.error)
                self.failures_in_a_row += 1
                outputs.append(Output(uid, {"error": event.error}, LitAPIStatus.ERROR))
                del self.requests[event.request_id], self.engine_ids[uid]
                continue
            self.failures_in_a_row = 0
            state[1] += event.token_id is not None  # a prompt-scoring request ends with no token
            piece = {"text": event.text, "finish_reason": event.finish_reason, "completion_tokens": state[1]}
            if event.logprobs is not None:  # only for requests that ask: the others' messages stay small
                piece["logprobs"] = event.logprobs
            if event.prompt_logprobs is not None:
                piece["prompt_logprobs"] = event.prompt_logprobs
            outputs.append(Output(uid, piece, LitAPIStatus.OK))
            if event.finished:
                outputs.append(Output(uid, "", LitAPIStatus.FINISH_STREAMING))
                del self.requests[event.request_id], self.engine_ids[uid]
        return outputs

    def _fail_all(self, err: Exception) -> list[Output]:
        """An error for every request the engine or the arrivals hold, each uid once; their slots freed."""
        outputs: dict[str, Output] = {}
        error = {"error": f"{type(err).__name__}: {err}"}
        for uid, request_id in list(self.engine_ids.items()):
            self.engine.cancel(request_id)
            outputs[uid] = Output(uid, error, LitAPIStatus.ERROR)
        for uid, _ in self.arrivals:
            outputs[uid] = Output(uid, error, LitAPIStatus.ERROR)
        for uid in self.cancellations:  # their clients are gone: just close them
            outputs.setdefault(uid, Output(uid, "", LitAPIStatus.FINISH_STREAMING))
        self.arrivals.clear()
        self.cancellations.clear()
        self.engine_ids.clear()
        self.requests.clear()
        self.engine.pending.clear()
        for slot in range(len(self.engine.slots)):
            self.engine.slots[slot] = None
        self.failures_in_a_row += max(1, len(outputs))
        return list(outputs.values())

    def encode_response(self, output):
        return output  # unused: EngineLoop sends a step's outputs itself, as they are (pickled)

    def decode_request(self, request):
        return request
