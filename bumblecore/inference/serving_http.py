"""The HTTP side of `bumblecore serve`: OpenAI's routes as a LitSpec, in the server process. Each
request is checked (openai_request), its prompt rendered and tokenized with the model's chat template,
and handed to the inference worker (serving_worker); the reply comes back as text deltas and goes
out as one JSON reply or as server-sent events. Errors answer in OpenAI's shape.
"""

import asyncio
import json
import logging
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Optional

from fastapi import Request
from fastapi.responses import JSONResponse
from litserve.specs.base import LitSpec
from litserve.utils import LitAPIStatus
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import StreamingResponse

from bumblecore.inference.generate import SamplingParams
from bumblecore.inference.litserve_adapter import ReplyBuffer, StepFanOut, send_to_worker, worker_error_message
from bumblecore.inference.openai_reply import (
    ToolCallStream,
    chat_chunk,
    chat_completion,
    completion_id,
    merge_deltas,
    model_card,
    model_list,
    usage,
)
from bumblecore.inference.openai_request import APIError, ChatRequest, parse_chat_request
from bumblecore.inference.request_guard import read_json
from bumblecore.inference.serve_settings import ServeSettings, context_length, model_dirs
from bumblecore.inference.serving_worker import CANCEL

log = logging.getLogger("bumblecore.serve")


@dataclass
class Submission:
    """One request handed to the worker: its uid and the buffer LitServe fills with its deltas."""

    uid: str
    replies: ReplyBuffer
    prompt_tokens: int
    finished: bool = False


class ChatCompletionsSpec(LitSpec):
    """OpenAI's `/v1/chat/completions` (streaming and not) and `/v1/models`, on our own checks.
    LitServe calls `setup()` in this process with the server, which connects the spec to its request
    queue and reply buffers; the endpoints are added to LitServe's app as they are."""

    def __init__(self, settings: ServeSettings):
        super().__init__()
        self.settings = settings
        self.api_path = "/v1/chat/completions"
        self.tokenizer = None
        self.tokenizing = None  # one thread: a fast tokenizer is not safe to call from several at once
        self.max_len = context_length(settings.model_path, settings.max_model_len, settings.base_model_path)
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
        from bumblecore.chat.templates import use_chat_template
        from bumblecore.tokenizer import load_tokenizer

        super().setup(server)
        StepFanOut.install(self)  # the worker's one message per step, handed out to each request's buffer
        self.tokenizer = load_tokenizer(
            model_dirs(self.settings.model_path, self.settings.base_model_path)[1],
            trust_remote_code=self.settings.trust_remote_code,
        )
        use_chat_template(self.tokenizer, self.settings.chat_template, self.settings.model_path)
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
            raise APIError(
                404,
                f"The model {name!r} does not exist; this server serves {self.settings.model_name!r}.",
                param="model",
                code="model_not_found",
            )

    # -- a chat completion

    async def chat_completions(self, request: Request):
        chat = parse_chat_request(await read_json(request, self.settings.max_request_bytes, self.settings.body_timeout))
        if chat.model:
            self.check_model(chat.model)
        # Off the event loop (a 1 MB prompt takes ~1 s): the other clients' streams keep flowing.
        prompt = await asyncio.get_running_loop().run_in_executor(self.tokenizing, self.prompt_ids, chat)
        if len(prompt) >= self.max_len:
            raise APIError(
                400,
                f"The prompt is {len(prompt)} tokens; this server's context is {self.max_len} tokens "
                f"for prompt and reply together.",
                param="messages",
                code="context_length_exceeded",
            )
        submission = self.submit(prompt, sampling_params(chat, self.settings, self.max_len))
        if chat.stream:
            return CleanupStreamingResponse(
                self.stream_chunks(chat, submission),
                on_close=lambda: self.release(submission),
                media_type="text/event-stream",
                headers={"Cache-Control": "no-cache"},
            )
        try:
            replies = ReplyDeltas(chat)
            deltas, finish_reason, tokens = [], None, 0
            async for piece in self.pieces(submission, request):
                deltas += replies.push(piece["text"])
                if piece["finish_reason"]:
                    deltas += replies.finish()
                    finish_reason = replies.finish_reason(piece["finish_reason"])
                tokens = piece["completion_tokens"]
            return chat_completion(
                completion_id(),
                self.settings.model_name,
                merge_deltas(deltas),
                finish_reason,
                usage(submission.prompt_tokens, tokens),
            )
        finally:
            self.release(submission)

    def prompt_ids(self, chat: ChatRequest) -> list[int]:
        """The same prompt `bumblecore generate` and `chat` build."""
        from bumblecore.chat.format import ChatFormatError, chat_format
        from bumblecore.inference.commands import build_prompt_ids, continues_raw_text

        stage = self.settings.training_stage
        if continues_raw_text(stage):
            # A base model continues raw text: the messages' contents, one after another.
            text = "\n".join(m["content"] for m in chat.messages if m["content"])
            if not text:  # checked on the text: the tokenizer's BOS alone is no prompt either
                raise APIError(400, "The prompt is empty.", param="messages", code="invalid_value")
            return build_prompt_ids(self.tokenizer, text, stage)
        try:
            return build_prompt_ids(self.tokenizer, chat.messages, stage, self.settings.system_prompt, chat.tools)
        except ChatFormatError as err:
            # The conversation, not the server: tools the template has no place for, or a role order its
            # raise_exception refuses.
            tools_refused = bool(chat.tools) and not chat_format(self.tokenizer).supports_tools
            raise APIError(
                400, str(err), param="tools" if tools_refused else "messages", code="invalid_value"
            ) from None

    def submit(self, prompt: list[int], params: SamplingParams) -> Submission:
        uid = str(uuid.uuid4())
        replies = ReplyBuffer(self, uid)
        send_to_worker(self, uid, {"prompt_ids": prompt, "params": params})
        return Submission(uid, replies, len(prompt))

    def release(self, submission: Submission) -> None:
        """However a request ends: forget its buffer, and stop it in the worker if it is still running."""
        submission.replies.close()
        if not submission.finished:
            submission.finished = True
            send_to_worker(self, submission.uid, CANCEL)

    async def pieces(self, submission: Submission, request: Optional[Request] = None):
        """The worker's messages for one request, one at a time: {"text", "finish_reason",
        "completion_tokens"}."""
        async for batch in self.piece_batches(submission, request):
            for piece in batch:
                yield piece

    async def piece_batches(self, submission: Submission, request: Optional[Request] = None):
        """The worker's messages for one request, as lists of those that arrived together (a stream
        sends each list as one chunk). With `request` (non-streaming replies), a client that hangs
        up is noticed within a second; a stream notices through Starlette, which cancels it."""
        replies, last_check = submission.replies, time.monotonic()
        while True:
            await replies.wait(timeout=1.0)
            if request is not None and time.monotonic() - last_check >= 1.0:
                last_check = time.monotonic()
                if await request.is_disconnected():
                    return
            batch = []
            while (message := replies.next()) is not None:
                data, status = message
                if status == LitAPIStatus.FINISH_STREAMING:
                    submission.finished = True
                    if batch:
                        yield batch
                    return
                if status == LitAPIStatus.ERROR:
                    submission.finished = True
                    if batch:
                        yield batch
                    raise APIError(500, f"generation failed: {worker_error_message(data)}", error_type="server_error")
                if data["finish_reason"]:
                    submission.finished = True
                batch.append(data)
            replies.clear()
            if batch:
                yield batch

    async def stream_chunks(self, chat: ChatRequest, submission: Submission):
        request_id, created, model = completion_id(), int(time.time()), self.settings.model_name
        yield sse(chat_chunk(request_id, model, {"role": "assistant", "content": ""}, created=created))
        content = ContentFrame(request_id, model, created)
        replies = ReplyDeltas(chat)
        try:
            async for batch in self.piece_batches(submission):
                # Tokens that waited for this stream go out as one delta (OpenAI's deltas may hold
                # several tokens): a stream that lags catches up in one chunk, not one per token.
                piece = batch[-1]  # only a batch's last piece can finish the reply
                text = piece["text"] if len(batch) == 1 else "".join(p["text"] for p in batch)
                deltas = replies.push(text) + (replies.finish() if piece["finish_reason"] else [])
                events = [content(delta) for delta in deltas]
                if piece["finish_reason"]:
                    reason = replies.finish_reason(piece["finish_reason"])
                    events.append(sse(chat_chunk(request_id, model, {}, reason, created=created)))
                    if chat.include_usage:
                        counts = usage(submission.prompt_tokens, piece["completion_tokens"])
                        events.append(sse(chat_chunk(request_id, model, {}, usage_counts=counts, created=created)))
                    events.append(DONE)
                    yield "".join(events)  # one write for the reply's end
                    return
                if events:
                    yield events[0] if len(events) == 1 else "".join(events)
        except APIError as err:  # the status line is sent already: report in the stream, as OpenAI does
            yield sse(err.body())
        yield DONE


DONE = "data: [DONE]\n\n"


class ContentFrame:
    """The SSE event of a stream's chunk, filled in from a template made once per stream: a plain
    `{"content": text}` delta costs one json.dumps of the text instead of one of the whole chunk
    (the same bytes as sse(chat_chunk(...)))."""

    MARK = "\x00bumblecore\x00"

    def __init__(self, request_id: str, model: str, created: int):
        self.request_id, self.model, self.created = request_id, model, created
        whole = sse(chat_chunk(request_id, model, {"content": self.MARK}, created=created))
        self.head, self.tail = whole.split(json.dumps(self.MARK, ensure_ascii=False))

    def __call__(self, delta: dict) -> str:
        if len(delta) == 1 and isinstance(delta.get("content"), str):
            return f"{self.head}{json.dumps(delta['content'], ensure_ascii=False)}{self.tail}"
        return sse(chat_chunk(self.request_id, self.model, delta, created=self.created))


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
        return (
            "tool_calls"
            if self.tool_calls is not None and self.tool_calls.calls and engine_reason == "stop"
            else engine_reason
        )


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


def sampling_params(chat: ChatRequest, settings: ServeSettings, max_len: int) -> SamplingParams:
    """The request's values, else the server's defaults. A request's temperature 0 is greedy; without
    any max_tokens a reply may run to the end of the context."""

    def pick(value, default):
        return default if value is None else value

    defaults = settings.sampling
    if chat.temperature is None:
        do_sample, temperature = defaults.do_sample and defaults.temperature > 0, defaults.temperature
    else:
        do_sample, temperature = chat.temperature > 0, chat.temperature
    return SamplingParams(
        max_new_tokens=chat.max_tokens or defaults.max_new_tokens or max_len,
        do_sample=do_sample,
        temperature=temperature if temperature > 0 else 1.0,
        top_k=pick(chat.top_k, defaults.top_k),
        top_p=pick(chat.top_p, defaults.top_p),
        repetition_penalty=pick(chat.repetition_penalty, defaults.repetition_penalty),
        stop=chat.stop,
        ignore_eos=chat.ignore_eos,
        seed=chat.seed,
    )


# ---------------------------------------------------------------------------- error replies


async def api_error_response(request, err: APIError):
    return JSONResponse(err.body(), status_code=err.status)


async def server_error_response(request, err: Exception):
    # Anything unforeseen still answers in OpenAI's shape, not Starlette's plain-text 500.
    log.error("error serving %s %s: %r", request.method, request.url.path, err)
    return JSONResponse(
        APIError(
            500,
            "The server failed to handle this request; see its log.",
            error_type="server_error",
            code="internal_error",
        ).body(),
        status_code=500,
    )


async def http_error_response(request, err: StarletteHTTPException):
    code = {404: "not_found", 405: "method_not_allowed"}.get(err.status_code)
    return JSONResponse(
        APIError(err.status_code, str(err.detail), code=code).body(),
        status_code=err.status_code,
        headers=getattr(err, "headers", None),
    )
