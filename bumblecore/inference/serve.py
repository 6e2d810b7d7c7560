"""`bumblecore serve`: an OpenAI-compatible chat API and a web chat page, hosted by LitServe.

Two processes, in LitServe's layout. This one runs the HTTP server (one uvicorn server in a thread):
it checks each request, renders and tokenizes the prompt with the model's chat template, and streams
the reply. LitServe's inference worker process holds the model and one `GenerationEngine`; requests
reach it through LitServe's request queue and text deltas come back through its ZeroMQ transport.

In the worker, LitServe's `ContinuousBatchingLoop` drives the engine: a new request joins the running
batch between two decode steps, and each step hands back every active request's text delta. Our
subclass adds what LitServe's loop lacks: a request whose client went away is cancelled (its slot is
free at the next step), and an idle worker waits for work instead of spinning. A request the engine
fails on fails alone; the engine never keeps a failed request (else every later step fails too), and
/health turns 503 while the engine cannot serve.

In front of every route, `RequestGuard` refuses what a browser on another site could send: a foreign
`Host` (DNS rebinding) on a loopback server, a foreign `Origin`; bodies must be `application/json`.
"""

import asyncio
import ipaddress
import json
import logging
import os
import pickle
import secrets
import signal
import socket
import sys
import threading
import time
import urllib.request
import uuid
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional

import litserve as ls
import uvicorn
from fastapi import Request
from fastapi.responses import FileResponse, JSONResponse
from litserve.loops.base import _SENTINEL_VALUE
from litserve.loops.continuous_batching_loop import ContinuousBatchingLoop, Output
from litserve.specs.base import LitSpec
from litserve.utils import LitAPIStatus, ResponseBufferItem, WorkerSetupStatus
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.middleware.cors import CORSMiddleware
from starlette.responses import StreamingResponse
from starlette.staticfiles import StaticFiles
from uvicorn.protocols.http.h11_impl import H11Protocol

from bumblecore.inference.generate import SamplingParams
from bumblecore.inference.openai_api import (MIN_REPETITION_PENALTY, APIError, ChatRequest, ToolCallStream, chat_chunk,
                                             chat_completion, completion_id, merge_deltas, model_card, model_list,
                                             parse_chat_request, usage)

WEB_DIR = Path(__file__).parent / "web"
PUBLIC_PATHS = ("/", "/health")  # the page asks for the key itself; load balancers probe /health without one
DOCS_PATHS = ("/docs", "/docs/oauth2-redirect", "/redoc", "/openapi.json")  # FastAPI's: behind the key when one is set
CANCEL = {"cancel": True}  # sent through the request queue, under the uid of the request to stop
DEFAULT_CONTEXT_CAP = 4096
LOOPBACK_NAMES = ("localhost", "127.0.0.1", "::1")
FAILURES_UNTIL_UNHEALTHY = 3  # requests failed in a row by the engine, none served in between
ENGINE_FAILING = "engine_failing"  # a worker status that is not READY: LitServe's /health answers 503
log = logging.getLogger("bumblecore.serve")


@dataclass
class ServeSettings:
    model_path: str
    model_name: str = "bumblebee"
    api_key: Optional[str] = None
    training_stage: str = "sft"
    system_prompt: Optional[str] = None
    max_batch_size: int = 16
    max_model_len: Optional[int] = None
    max_request_bytes: int = 1_000_000
    dtype: str = "auto"
    device_map: str = "auto"
    trust_remote_code: bool = False
    host: str = "127.0.0.1"
    allowed_hosts: tuple[str, ...] = ()
    """Host names served besides the loopback ones (a loopback server) or instead of any (others); "*": any."""
    allowed_origins: tuple[str, ...] = ()
    """Web origins (scheme://host[:port]) whose pages may call the API besides the server's own; "*": any."""
    header_timeout: float = 10.0
    """Seconds a connection may take to send a request's line and headers (or stay idle between requests)."""
    body_timeout: float = 30.0
    """Seconds a client may take to send a request's body."""
    # Defaults for requests that leave a field out (the original's generation flags).
    max_new_tokens: Optional[int] = None
    do_sample: bool = True
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    repetition_penalty: float = 1.0


def model_dirs(model_path: str) -> tuple[Path, Path]:
    """(directory with the model's config.json, directory with its tokenizer); a LoRA adapter's base
    holds the config, and the tokenizer too unless the adapter saved one."""
    path = Path(model_path)
    adapter = path / "adapter_config.json"
    if adapter.is_file():
        base = Path(json.loads(adapter.read_text(encoding="utf-8")).get("base_model_name_or_path") or "")
        return base, path if (path / "tokenizer_config.json").is_file() else base
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{path} is not a model directory (no config.json)")
    return path, path


def context_length(model_path: str, max_model_len: Optional[int]) -> int:
    """Tokens per request (prompt + reply): --max_model_len, else the model's own, capped so the
    preallocated KV cache of every slot stays small."""
    config_dir, _ = model_dirs(model_path)
    config = json.loads((config_dir / "config.json").read_text(encoding="utf-8"))
    own = config.get("max_position_embeddings") or DEFAULT_CONTEXT_CAP
    return min(max_model_len, own) if max_model_len else min(own, DEFAULT_CONTEXT_CAP)


# ---------------------------------------------------------------------------- the worker side


class EngineLoop(ContinuousBatchingLoop):
    """LitServe's continuous-batching loop, plus cancellation and an idle wait."""

    def __init__(self):
        super().__init__()
        self.work_arrived: Optional[asyncio.Event] = None  # made inside the worker's event loop

    def _wake(self) -> None:
        if self.work_arrived is not None:
            self.work_arrived.set()

    async def prefill(self, pending_requests, lit_api, lit_spec, request_queue, transport,
                      max_batch_size=None, batch_timeout=None):
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
        if item == _SENTINEL_VALUE:
            raise asyncio.CancelledError("server shutting down")
        response_queue_id, uid, _, request = item
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
            if os.getppid() != self._server_pid:  # the server process is gone (killed): do not linger
                os._exit(0)
            # LitServe calls run() again at once when it returns; wait here instead of spinning.
            try:
                await asyncio.wait_for(self.work_arrived.wait(), timeout=0.5)
            except asyncio.TimeoutError:
                pass
            self.work_arrived.clear()
            return
        await super().run(lit_api, device, worker_id, request_queue, transport, workers_setup_status, callback_runner)
        status = WorkerSetupStatus.READY if lit_api.healthy else ENGINE_FAILING
        key = f"{lit_api.api_path.split('/')[-1]}_{worker_id}"  # LitServe's key for this worker
        if workers_setup_status.get(key) != status:
            workers_setup_status[key] = status


class EngineAPI(ls.LitAPI):
    """The model behind the API. In the worker: requests in, one text delta per request per step
    out. In the HTTP process it only checks API keys (`authorize`, LitServe's hook)."""

    def __init__(self, settings: ServeSettings, spec: LitSpec):
        super().__init__(max_batch_size=settings.max_batch_size, stream=True, spec=spec, loop=EngineLoop())
        self.settings = settings

    def setup(self, device):
        from bumblecore.inference.generate import GenerationEngine
        from bumblecore.inference.loading import load_for_inference

        settings = self.settings
        device = device if settings.device_map == "auto" else settings.device_map
        model, tokenizer, eos = load_for_inference(settings.model_path, settings.dtype, device,
                                                   trust_remote_code=settings.trust_remote_code)
        max_len = context_length(settings.model_path, settings.max_model_len)
        self.engine = GenerationEngine(model, tokenizer, settings.max_batch_size, max_len, eos_token_ids=eos)
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

    def authorize(self, request: Request) -> None:
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
            state[1] += 1
            outputs.append(Output(uid, {"text": event.text, "finish_reason": event.finish_reason,
                                        "completion_tokens": state[1]}, LitAPIStatus.OK))
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
        return output  # LitServe sends dicts as JSON lines

    def decode_request(self, request):
        return request


# ---------------------------------------------------------------------------- the HTTP side


@dataclass
class Submission:
    """One request handed to the worker: its uid and the buffer LitServe fills with its deltas."""
    uid: str
    buffer: ResponseBufferItem
    prompt_tokens: int
    finished: bool = False


class ChatCompletionsSpec(LitSpec):
    """OpenAI's `/v1/chat/completions` (streaming and not) and `/v1/models`, on our own checks."""

    def __init__(self, settings: ServeSettings):
        super().__init__()
        self.settings = settings
        self.api_path = "/v1/chat/completions"
        self.tokenizer = None
        self.tokenizing = None  # one thread: a fast tokenizer is not safe to call from several at once
        self.max_len = context_length(settings.model_path, settings.max_model_len)
        self.created = int(time.time())

    def __getstate__(self):
        state = super().__getstate__()
        state["tokenizer"] = state["tokenizing"] = None  # the worker loads its own
        return state

    @property
    def stream(self):
        return True

    def pre_setup(self, lit_api):
        self.add_endpoint("/v1/chat/completions", self.chat_completions, ["POST"])
        self.add_endpoint("/v1/models", self.models, ["GET"])
        self.add_endpoint("/v1/models/{model_id}", self.model, ["GET"])

    def setup(self, server):
        from bumblecore.tokenizer import load_tokenizer

        super().setup(server)
        self.tokenizer = load_tokenizer(model_dirs(self.settings.model_path)[1], trust_remote_code=self.settings.trust_remote_code)
        self.tokenizing = ThreadPoolExecutor(1, thread_name_prefix="bumblecore-tokenize")

    def decode_request(self, request, context_kwargs=None):
        return request

    def encode_response(self, output, context_kwargs=None):
        return output

    async def models(self):
        return model_list(self.settings.model_name, self.created)

    async def model(self, model_id: str):
        self.check_model(model_id)
        return model_card(model_id, self.created)

    def check_model(self, name: str) -> None:
        if name != self.settings.model_name:
            raise APIError(404, f"The model {name!r} does not exist; this server serves {self.settings.model_name!r}.",
                           param="model", code="model_not_found")

    # -- a chat completion

    async def chat_completions(self, request: Request):
        chat = parse_chat_request(await read_json(request, self.settings.max_request_bytes, self.settings.body_timeout))
        if chat.model:
            self.check_model(chat.model)
        # Off the event loop (a 1 MB prompt takes ~1 s): the other clients' streams keep flowing.
        prompt = await asyncio.get_running_loop().run_in_executor(self.tokenizing, self.prompt_ids, chat)
        if len(prompt) >= self.max_len:
            raise APIError(400, f"The prompt is {len(prompt)} tokens; this server's context is {self.max_len} tokens "
                                f"for prompt and reply together.", param="messages", code="context_length_exceeded")
        submission = self.submit(prompt, sampling_params(chat, self.settings, self.max_len))
        if chat.stream:
            return CleanupStreamingResponse(self.stream_chunks(chat, submission), on_close=lambda: self.release(submission),
                                            media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        try:
            replies = ReplyDeltas(chat)
            deltas, finish_reason, tokens = [], None, 0
            async for piece in self.pieces(submission, request):
                deltas += replies.push(piece["text"])
                if piece["finish_reason"]:
                    deltas += replies.finish()
                    finish_reason = replies.finish_reason(piece["finish_reason"])
                tokens = piece["completion_tokens"]
            return chat_completion(completion_id(), self.settings.model_name, merge_deltas(deltas), finish_reason,
                                   usage(submission.prompt_tokens, tokens))
        finally:
            self.release(submission)

    def prompt_ids(self, chat: ChatRequest) -> list[int]:
        """The same prompt `bumblecore generate` and `chat` build."""
        from bumblecore.inference.commands import build_prompt_ids

        stage = self.settings.training_stage
        if stage in ("pretrain", "continue_pretrain"):
            # A base model continues raw text: the messages' contents, one after another.
            text = "\n".join(m["content"] for m in chat.messages if m["content"])
            ids = build_prompt_ids(self.tokenizer, text, stage)
            if not ids:
                raise APIError(400, "The prompt is empty.", param="messages", code="invalid_value")
            return ids
        return build_prompt_ids(self.tokenizer, chat.messages, stage, self.settings.system_prompt, chat.tools)

    def submit(self, prompt: list[int], params: SamplingParams) -> Submission:
        uid = str(uuid.uuid4())
        buffer = ResponseBufferItem(event=asyncio.Event(), response_queue=deque())
        self.response_buffer[uid] = buffer
        self.request_queue.put((self.response_queue_id, uid, time.monotonic(), {"prompt_ids": prompt, "params": params}))
        return Submission(uid, buffer, len(prompt))

    def release(self, submission: Submission) -> None:
        """However a request ends: forget its buffer, and stop it in the worker if it is still running."""
        self.response_buffer.pop(submission.uid, None)
        if not submission.finished:
            submission.finished = True
            self.request_queue.put((self.response_queue_id, submission.uid, time.monotonic(), CANCEL))

    async def pieces(self, submission: Submission, request: Optional[Request] = None):
        """The worker's messages for one request: {"text", "finish_reason", "completion_tokens"}.
        With `request` (non-streaming replies), a client that hangs up is noticed within a second;
        a stream notices through Starlette, which cancels it."""
        buffer, last_check = submission.buffer, time.monotonic()
        while True:
            try:
                await asyncio.wait_for(buffer.event.wait(), timeout=1.0)
            except asyncio.TimeoutError:
                pass
            if request is not None and time.monotonic() - last_check >= 1.0:
                last_check = time.monotonic()
                if await request.is_disconnected():
                    return
            while buffer.response_queue:
                data, status = buffer.response_queue.popleft()
                if status == LitAPIStatus.FINISH_STREAMING:
                    submission.finished = True
                    return
                if status == LitAPIStatus.ERROR:
                    submission.finished = True
                    raise APIError(500, f"generation failed: {worker_error(data)}", error_type="server_error")
                piece = json.loads(data)
                if piece["finish_reason"]:
                    submission.finished = True
                yield piece
            buffer.event.clear()

    async def stream_chunks(self, chat: ChatRequest, submission: Submission):
        request_id, created, model = completion_id(), int(time.time()), self.settings.model_name
        yield sse(chat_chunk(request_id, model, {"role": "assistant", "content": ""}, created=created))
        replies = ReplyDeltas(chat)
        try:
            async for piece in self.pieces(submission):
                deltas = replies.push(piece["text"]) + (replies.finish() if piece["finish_reason"] else [])
                for delta in deltas:
                    yield sse(chat_chunk(request_id, model, delta, created=created))
                if piece["finish_reason"]:
                    reason = replies.finish_reason(piece["finish_reason"])
                    yield sse(chat_chunk(request_id, model, {}, reason, created=created))
                    if chat.include_usage:
                        counts = usage(submission.prompt_tokens, piece["completion_tokens"])
                        yield sse(chat_chunk(request_id, model, {}, usage_counts=counts, created=created))
        except APIError as err:  # the status line is sent already: report in the stream, as OpenAI does
            yield sse(err.body())
        yield "data: [DONE]\n\n"


class ReplyDeltas:
    """A reply's text deltas as OpenAI message deltas: plain `content`, or, when the request offered
    tools, `tool_calls` for the template's `<tool_call>` blocks (finish_reason "tool_calls")."""

    def __init__(self, chat: ChatRequest):
        self.tool_calls = ToolCallStream() if chat.tools else None

    def push(self, text: str) -> list[dict]:
        if self.tool_calls is None:
            return [{"content": text}] if text else []
        return self.tool_calls.push(text)

    def finish(self) -> list[dict]:
        return self.tool_calls.finish() if self.tool_calls is not None else []

    def finish_reason(self, engine_reason: str) -> str:
        return "tool_calls" if self.tool_calls is not None and self.tool_calls.calls and engine_reason == "stop" else engine_reason


class CleanupStreamingResponse(StreamingResponse):
    """Runs on_close however the response ends: finished, client gone (Starlette cancels the
    stream when the client disconnects), or cancelled before the first chunk."""

    def __init__(self, content, on_close, **kwargs):
        super().__init__(content, **kwargs)
        self.on_close = on_close

    async def __call__(self, scope, receive, send):
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.on_close()


def sse(payload: dict) -> str:
    return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"


def worker_error(data) -> str:
    try:
        data = pickle.loads(data) if isinstance(data, bytes) else data  # LitServe pickles error payloads
        return json.loads(data).get("error", str(data)) if isinstance(data, str) else str(data)
    except Exception:
        return "see the server log"


def sampling_params(chat: ChatRequest, settings: ServeSettings, max_len: int) -> SamplingParams:
    """The request's values, else the server's defaults. A request's temperature 0 is greedy; without
    any max_tokens a reply may run to the end of the context."""
    def pick(value, default):
        return default if value is None else value

    if chat.temperature is None:
        do_sample, temperature = settings.do_sample and settings.temperature > 0, settings.temperature
    else:
        do_sample, temperature = chat.temperature > 0, chat.temperature
    return SamplingParams(max_new_tokens=chat.max_tokens or settings.max_new_tokens or max_len, do_sample=do_sample,
                          temperature=temperature if temperature > 0 else 1.0, top_k=pick(chat.top_k, settings.top_k),
                          top_p=pick(chat.top_p, settings.top_p),
                          repetition_penalty=pick(chat.repetition_penalty, settings.repetition_penalty),
                          stop=chat.stop, ignore_eos=chat.ignore_eos, seed=chat.seed)


async def read_json(request: Request, limit: int, timeout: float = 30.0):
    """The body as JSON: only `application/json` (a page on another site can POST text/plain to any
    server without asking; JSON needs the browser's CORS permission first), refusing bodies over
    `limit` bytes before reading them whole, and a body that takes longer than `timeout` to arrive."""
    media_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if media_type != "application/json":
        raise APIError(415, f"Content-Type must be application/json, got {media_type or 'none'!r}.",
                       code="unsupported_media_type")
    declared = request.headers.get("content-length", "")
    too_large = APIError(413, f"The request body is larger than this server's limit of {limit} bytes.",
                         code="request_too_large")
    if declared.isdigit() and int(declared) > limit:
        raise too_large
    body = bytearray()
    try:
        async with asyncio.timeout(timeout):
            async for chunk in request.stream():
                body += chunk
                if len(body) > limit:
                    raise too_large
    except TimeoutError:
        raise APIError(408, f"The request body did not arrive within {timeout:g} s.", code="request_timeout") from None
    try:
        return json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise APIError(400, f"The request body is not valid JSON: {err}", code="invalid_json") from None
    except RecursionError:
        raise APIError(400, "The request body is nested too deeply.", code="invalid_json") from None


def check_key(key: Optional[str], authorization: str) -> None:
    if key is None:
        return
    scheme, _, token = authorization.partition(" ")
    if scheme.lower() != "bearer" or not secrets.compare_digest(token.strip().encode(), key.encode()):
        raise APIError(401, "Incorrect or missing API key: send the header `Authorization: Bearer <key>`.",
                       code="invalid_api_key")


def host_name(host_header: str) -> str:
    """The name in a Host header, without the port: "localhost:8000" -> "localhost", "[::1]:80" -> "::1"."""
    host = host_header.strip().lower()
    if host.startswith("["):
        return host[1:].partition("]")[0]
    return host.rpartition(":")[0] if host.count(":") == 1 else host


def is_loopback(host: str) -> bool:
    if host in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class RequestGuard:
    """ASGI middleware in front of every route, against requests a hostile web page makes a browser
    send. DNS rebinding: the page's own name resolves to 127.0.0.1, so the browser thinks the
    server is same-origin; its Host header still names the page, so a loopback server serves only
    loopback names (plus --allowed_hosts). Cross-site requests: the browser sends the page's
    Origin; a foreign one is refused (unless --allowed_origins), before any work is done. And,
    with a key, FastAPI's /docs and /openapi.json need it as the API does."""

    def __init__(self, app, settings: ServeSettings):
        self.app, self.settings = app, settings
        self.any_host = "*" in settings.allowed_hosts
        self.hosts = {h.lower() for h in settings.allowed_hosts}
        self.loopback = is_loopback(host_name(settings.host))
        if self.loopback:
            self.hosts |= set(LOOPBACK_NAMES)
        elif not self.hosts:
            self.any_host = True  # exposed on purpose (0.0.0.0, a LAN address): every name reaching it
        self.any_origin = "*" in settings.allowed_origins
        self.origins = {o.lower().rstrip("/") for o in settings.allowed_origins}

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in scope["headers"]}
        try:
            self.check(scope, headers)
        except APIError as err:
            return await JSONResponse(err.body(), status_code=err.status)(scope, receive, send)
        await self.app(scope, receive, send)

    def check(self, scope, headers: dict) -> None:
        host = headers.get("host", "")
        name = host_name(host)
        if host and not (self.any_host or name in self.hosts or (self.loopback and is_loopback(name))):
            raise APIError(403, f"Host {host!r} is not served here; start the server with --allowed_hosts {name} to serve it.",
                           code="host_not_allowed")
        origin = headers.get("origin")
        if origin is not None and not self.any_origin:
            origin = origin.lower().rstrip("/")
            own = origin.partition("://")[2] == host.lower() and origin.partition("://")[0] in ("http", "https")
            if not own and origin not in self.origins:
                raise APIError(403, f"Requests from the web origin {origin!r} are refused; start the server with "
                                    f"--allowed_origins {origin} to allow its pages.", code="origin_not_allowed")
        if scope["path"] in DOCS_PATHS:
            check_key(self.settings.api_key, headers.get("authorization", ""))


class HeadTimeoutH11Protocol(H11Protocol):
    """uvicorn's h11 protocol, plus a deadline for the request line and headers: uvicorn arms its
    keep-alive timer only after a response, so a client that connects and sends half a request
    line (or nothing) would hold its connection, and a file descriptor, forever."""

    head_timeout = 10.0

    def connection_made(self, transport):
        super().connection_made(transport)
        self.head_timer = self.loop.call_later(self.head_timeout, self.head_timed_out)

    def data_received(self, data: bytes) -> None:
        waiting = self.cycle is None or self.cycle.response_complete
        if waiting and self.head_timer is None:  # the first bytes of a next request on a kept-alive connection
            self.head_timer = self.loop.call_later(self.head_timeout, self.head_timed_out)
        super().data_received(data)
        if self.head_timer is not None and self.cycle is not None and not self.cycle.response_complete:
            self.head_timer.cancel()  # a whole request head arrived
            self.head_timer = None

    def head_timed_out(self) -> None:
        self.head_timer = None
        if (self.cycle is None or self.cycle.response_complete) and not self.transport.is_closing():
            self.transport.close()

    def connection_lost(self, exc) -> None:
        if getattr(self, "head_timer", None) is not None:
            self.head_timer.cancel()
            self.head_timer = None
        super().connection_lost(exc)


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


class BumbleServer(ls.LitServer):
    def __init__(self, settings: ServeSettings):
        import torch

        on_gpu = settings.device_map.startswith("cuda") or (settings.device_map == "auto" and torch.cuda.is_available())
        api = EngineAPI(settings, ChatCompletionsSpec(settings))
        super().__init__(api, accelerator="cuda" if on_gpu else "cpu", devices=1, timeout=False, fast_queue=True)
        self.settings = settings
        self.monitor_internal = 0.25  # LitServe's worker-health poll, in seconds (its default: 2)
        app = self.app
        app.router.routes[:] = [r for r in app.router.routes if getattr(r, "path", None) != "/"]  # LitServe's "/" text
        app.add_api_route("/", self.page, methods=["GET"], include_in_schema=False)
        app.mount("/web", StaticFiles(directory=WEB_DIR), name="web")
        app.add_exception_handler(APIError, api_error_response)
        app.add_exception_handler(StarletteHTTPException, http_error_response)
        app.add_exception_handler(Exception, server_error_response)
        if settings.allowed_origins:  # their pages call the API cross-origin: answer the browser's CORS checks
            app.add_middleware(CORSMiddleware, allow_origins=list(settings.allowed_origins), allow_methods=["GET", "POST"],
                               allow_headers=["Authorization", "Content-Type"], max_age=600)
        app.add_middleware(RequestGuard, settings=settings)  # added last: outermost, before any other work

    async def page(self):
        return FileResponse(WEB_DIR / "index.html", media_type="text/html; charset=utf-8")

    def _start_server(self, port, num_uvicorn_servers, log_level, sockets, uvicorn_worker_type, **kwargs):
        # One HTTP server in a thread of this process, instead of LitServe's forked processes: the
        # tokenizer is loaded once, and stop() can end it (LitServe cannot stop a thread).
        self.app.response_queue_id = 0
        self.lit_api.spec.response_queue_id = 0
        protocol = type("HeadTimeoutH11", (HeadTimeoutH11Protocol,), {"head_timeout": self.settings.header_timeout})
        kwargs.setdefault("timeout_keep_alive", self.settings.header_timeout)
        config = uvicorn.Config(app=self.app, log_level=log_level, timeout_graceful_shutdown=3, http=protocol,
                                h11_max_incomplete_event_size=64 * 1024, **kwargs)
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
        """End a server started with run() (from another thread)."""
        if self._shutdown_event is not None:
            try:
                self._shutdown_event.set()
            except OSError:  # its manager is gone: the server already shut down (or never started)
                pass


async def api_error_response(request, err: APIError):
    return JSONResponse(err.body(), status_code=err.status)


async def server_error_response(request, err: Exception):
    # Anything unforeseen still answers in OpenAI's shape, not Starlette's plain-text 500.
    log.error("error serving %s %s: %r", request.method, request.url.path, err)
    return JSONResponse(APIError(500, "The server failed to handle this request; see its log.", error_type="server_error",
                                 code="internal_error").body(), status_code=500)


async def http_error_response(request, err: StarletteHTTPException):
    code = {404: "not_found", 405: "method_not_allowed"}.get(err.status_code)
    return JSONResponse(APIError(err.status_code, str(err.detail), code=code).body(), status_code=err.status_code,
                        headers=getattr(err, "headers", None))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def running_server(model_path: str, port: Optional[int] = None, startup_timeout: float = 180, **options) -> Iterator[str]:
    """Serve from a background thread of this process (tests, benchmarks); yields the base URL and
    shuts everything down (HTTP server, worker process) on exit."""
    port = port or free_port()
    server = BumbleServer(ServeSettings(model_path, **options))
    thread = threading.Thread(target=server.run, name="bumblecore-serve", daemon=True,
                              kwargs=dict(host=server.settings.host, port=port, log_level="warning", generate_client_file=False))
    thread.start()
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until_healthy(url, thread.is_alive, startup_timeout)
        yield url
    finally:
        server.stop()
        thread.join(timeout=30)


def wait_until_healthy(url: str, alive, timeout: float) -> None:
    """Poll {url}/health until it answers 200 (the model is loaded); fail early if `alive()` turns false."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            with urllib.request.urlopen(url + "/health", timeout=2) as reply:
                if reply.status == 200:
                    return
        except OSError:
            pass
        if not alive():
            raise RuntimeError("the server stopped while starting; see its log above")
        if time.monotonic() > deadline:
            raise TimeoutError(f"the server did not become healthy within {timeout} s")
        time.sleep(0.2)


def serve(
    model_path: str,
    host: str = "127.0.0.1",
    port: int = 8000,
    api_key: Optional[str] = None,
    model_name: str = "bumblebee",
    training_stage: str = "sft",
    system_prompt: Optional[str] = None,
    max_batch_size: int = 16,
    max_model_len: Optional[int] = None,
    max_request_bytes: int = 1_000_000,
    allowed_hosts: Optional[list[str]] = None,
    allowed_origins: Optional[list[str]] = None,
    dtype: str = "auto",
    device_map: str = "auto",
    trust_remote_code: bool = False,
    max_new_tokens: Optional[int] = None,
    do_sample: bool = True,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    repetition_penalty: float = 1.0,
    log_level: str = "info",
) -> None:
    """Serve a model: OpenAI-compatible /v1/chat/completions (streaming too), /v1/models, /health, and a web chat page at /.

    Args:
        model_path: a model directory (HF layout) or a LoRA adapter directory.
        host: address to bind; 127.0.0.1 (this machine only) unless you mean to expose it (0.0.0.0 or ::).
        port: TCP port.
        api_key: when set, API routes need `Authorization: Bearer <key>`. Prefer the environment variable BUMBLECORE_API_KEY (the default): a flag shows in `ps` to every user of the machine. None: any key is accepted.
        model_name: the model id clients send and /v1/models lists.
        training_stage: pretrain/continue_pretrain serve raw-text completion; sft/dpo chat through the template.
        system_prompt: system message for conversations without one (default: whatever the template adds itself; "": none).
        max_batch_size: requests decoded together (KV-cache slots); more wait for a free slot.
        max_model_len: tokens per request, prompt and reply together (default: the model's, at most 4096).
        max_request_bytes: larger request bodies are refused with 413.
        allowed_hosts: Host names to serve besides localhost/127.0.0.1/::1 when bound to loopback (else: the only names served; default any); "*" serves any (this disables the DNS-rebinding guard).
        allowed_origins: web origins (scheme://host[:port]) whose pages may call the API, besides the server's own page; "*" allows any site's pages.
        dtype: auto (the checkpoint's), float32, float16 or bfloat16.
        device_map: auto, cpu or cuda:N.
        trust_remote_code: allow a model or tokenizer that ships its own Python code (only for directories you trust).
        max_new_tokens: reply length for requests without max_tokens (default: up to the end of the context).
        do_sample: for requests without temperature: sample (true, OpenAI's default) or greedy (false).
        temperature: for requests without temperature.
        top_k: for requests without top_k (0: no top-k filter).
        top_p: for requests without top_p.
        repetition_penalty: for requests without repetition_penalty.
        log_level: uvicorn/LitServe log level (debug, info, warning, error).
    """
    if training_stage not in ("pretrain", "continue_pretrain", "sft", "dpo"):
        raise ValueError(f"training_stage {training_stage!r}: expected pretrain, continue_pretrain, sft or dpo")
    if max_batch_size < 1:
        raise ValueError("max_batch_size must be at least 1")
    if api_key and any(arg == "--api_key" or arg.startswith("--api_key=") for arg in sys.argv):
        print("bumblecore serve: note: --api_key is visible to every user of this machine (ps, /proc); "
              "set BUMBLECORE_API_KEY in the environment instead.", file=sys.stderr, flush=True)
    api_key = api_key or os.environ.get("BUMBLECORE_API_KEY") or None
    if not (0 <= temperature <= 100 and 0 < top_p <= 1 and top_k >= 0 and MIN_REPETITION_PENALTY <= repetition_penalty <= 10):
        raise ValueError(f"expected 0 <= temperature <= 100, 0 < top_p <= 1, top_k >= 0 and "
                         f"{MIN_REPETITION_PENALTY} <= repetition_penalty <= 10")
    settings = ServeSettings(
        model_path, model_name=model_name, api_key=api_key, training_stage=training_stage, system_prompt=system_prompt,
        max_batch_size=max_batch_size, max_model_len=max_model_len, max_request_bytes=max_request_bytes, dtype=dtype,
        device_map=device_map, trust_remote_code=trust_remote_code, max_new_tokens=max_new_tokens, do_sample=do_sample, temperature=temperature, top_k=top_k,
        top_p=top_p, repetition_penalty=repetition_penalty, host=host, allowed_hosts=tuple(allowed_hosts or ()),
        allowed_origins=tuple(allowed_origins or ()))
    context_length(model_path, max_model_len)  # a wrong path fails here, in one line, before any process starts
    check_tokenizer_fits(model_path, trust_remote_code)  # as would every request, later, in the worker
    server = BumbleServer(settings)
    shown = "localhost" if host in ("127.0.0.1", "::1") else host
    print(f"bumblecore serve: http://{shown}:{port}/ (chat page), http://{shown}:{port}/v1 (OpenAI API, model "
          f"{model_name!r}{', API key required' if api_key else ''})", flush=True)
    # SIGTERM (docker stop, kill, systemd) shuts down like Ctrl+C does: LitServe then stops the worker
    # process too, instead of leaving it orphaned.
    signal.signal(signal.SIGTERM, stop_like_ctrl_c)
    server.run(host=host, port=port, log_level=log_level, generate_client_file=False)


def check_tokenizer_fits(model_path: str, trust_remote_code: bool = False) -> None:
    """Raise ValueError when the tokenizer has ids the model has no embedding for (load_for_inference
    checks it too, in the worker; here it fails in one line, before any process starts)."""
    from bumblecore.tokenizer import check_fits_model, load_tokenizer

    config_dir, tokenizer_dir = model_dirs(model_path)
    check_fits_model(load_tokenizer(tokenizer_dir, trust_remote_code=trust_remote_code), config_dir, tokenizer_dir)


def stop_like_ctrl_c(signum, frame):
    raise KeyboardInterrupt
