"""The HTTP side of `bumblecore serve`: OpenAI's routes as a LitSpec, in the server process. Each
request is checked (openai_request), its prompt rendered and tokenized with the model's chat template,
and handed to the inference worker (serving_worker); the reply comes back as text deltas and goes
out as one JSON reply or as server-sent events. Errors answer in OpenAI's shape.
"""

import asyncio
import json
import logging
import math
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
    ChatChoice,
    ReplyDeltas,
    TokenTexts,
    chat_chunk,
    chat_completion,
    completion_id,
    model_card,
    model_list,
    usage,
)
from bumblecore.inference.openai_request import APIError, ChatRequest, parse_chat_request, seeds
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
        self.token_texts: Optional[TokenTexts] = None

    def __getstate__(self):
        state = super().__getstate__()
        state["tokenizer"] = state["tokenizing"] = state["token_texts"] = None  # the worker loads its own
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

    def check_context(self, tokens: int, what: str, param: str) -> None:
        """A prompt leaves room for at least one generated token in this server's context, else a 400."""
        if tokens >= self.max_len:
            raise APIError(
                400,
                f"{what} is {tokens} tokens; this server's context is {self.max_len} tokens "
                f"for prompt and reply together.",
                param=param,
                code="context_length_exceeded",
            )

    async def chat_completions(self, request: Request):
        chat = parse_chat_request(await read_json(request, self.settings.max_request_bytes, self.settings.body_timeout))
        if chat.model:
            self.check_model(chat.model)
        # Off the event loop (a 1 MB prompt takes ~1 s): the other clients' streams keep flowing.
        prompt = await asyncio.get_running_loop().run_in_executor(self.tokenizing, self.prompt_ids, chat)
        self.check_context(len(prompt), "The prompt", "messages")
        if chat.logprobs:
            await self.load_token_texts()
        logprobs = chat.top_logprobs if chat.logprobs else None
        submissions = [
            self.submit(prompt, sampling_params(chat, self.settings, self.max_len, seed, logprobs))
            for seed in seeds(chat.seed, chat.n)
        ]
        if chat.stream:
            return self.streaming_response(self.stream_chunks(chat, submissions), submissions)
        try:
            choices = [ChatChoice(chat) for _ in submissions]
            async for index, batch in self.choice_batches(submissions, request):
                for piece in batch:
                    choices[index].push(piece)
            return chat_completion(
                completion_id(),
                self.settings.model_name,
                [choice.reply(index, self.token_texts) for index, choice in enumerate(choices)],
                usage(len(prompt), sum(choice.tokens for choice in choices)),
            )
        finally:
            self.release_all(submissions)

    async def load_token_texts(self) -> None:
        """Each token id's text, for logprobs (tokens named by their text), decoded once, on the
        tokenizer's thread: a server never asked for logprobs never pays for it."""
        if self.token_texts is None:
            tokenizer = self.tokenizer
            texts = await asyncio.get_running_loop().run_in_executor(
                self.tokenizing, lambda: tokenizer.batch_decode([[i] for i in range(len(tokenizer))])
            )
            self.token_texts = TokenTexts(texts)

    def prompt_ids(self, chat: ChatRequest, add_generation_prompt: bool = True) -> list[int]:
        """The same prompt `bumblecore generate` and `chat` build."""
        from bumblecore.chat.format import ChatFormatError, chat_format
        from bumblecore.inference.commands import build_prompt_ids, continues_raw_text
        from bumblecore.inference.tool_choice import ToolChoiceError, constrain_tool_calls

        stage = self.settings.training_stage
        if continues_raw_text(stage):
            if chat.tool_choice is not None and chat.tool_choice.forces_a_call:
                raise APIError(
                    400, "tool_choice: a base model continues raw text, it has no tools", param="tool_choice"
                )
            # A base model continues raw text: the messages' contents, one after another.
            text = "\n".join(m["content"] for m in chat.messages if m["content"])
            if not text:  # checked on the text: the tokenizer's BOS alone is no prompt either
                raise APIError(400, "The prompt is empty.", param="messages", code="invalid_value")
            return build_prompt_ids(self.tokenizer, text, stage)
        try:
            constrain_tool_calls(chat, self.tokenizer)
            return build_prompt_ids(
                self.tokenizer, chat.messages, stage, self.settings.system_prompt, chat.tools, add_generation_prompt
            )
        except ToolChoiceError as err:
            raise APIError(400, str(err), param=err.param, code="invalid_value") from None
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

    def release_all(self, submissions: list[Submission]) -> None:
        for submission in submissions:
            self.release(submission)

    def streaming_response(self, chunks, submissions: list[Submission]) -> StreamingResponse:
        return CleanupStreamingResponse(
            chunks,
            on_close=lambda: self.release_all(submissions),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache"},
        )

    def release(self, submission: Submission) -> None:
        """However a request ends: forget its buffer, and stop it in the worker if it is still running."""
        submission.replies.close()
        if not submission.finished:
            submission.finished = True
            send_to_worker(self, submission.uid, CANCEL)

    async def choice_batches(self, submissions: list[Submission], request: Optional[Request] = None):
        """(index, batch) as each submission's batches arrive (piece_batches), until all have ended:
        the n choices of a request (or of several prompts), interleaved as they come."""
        if len(submissions) == 1:
            async for batch in self.piece_batches(submissions[0], request):
                yield 0, batch
            return
        arrived: asyncio.Queue = asyncio.Queue()

        async def forward(index: int, submission: Submission) -> None:
            try:
                async for batch in self.piece_batches(submission, request):
                    arrived.put_nowait((index, batch, None))
                arrived.put_nowait((index, None, None))
            except APIError as err:
                arrived.put_nowait((index, None, err))

        tasks = [asyncio.create_task(forward(i, s)) for i, s in enumerate(submissions)]
        try:
            running = len(tasks)
            while running:
                index, batch, err = await arrived.get()
                if err is not None:
                    raise err
                if batch is None:
                    running -= 1
                else:
                    yield index, batch
        finally:
            for task in tasks:
                task.cancel()

    async def piece_batches(self, submission: Submission, request: Optional[Request] = None):
        """The worker's messages for one request, as lists of those that arrived together (a stream
        sends each list as one chunk). A list follows the one before it after at least
        `stream_interval` seconds (the last at once): the tokens of decode steps faster than that go
        out together, one write and one wake-up instead of one per step. With `request` (non-streaming replies), a
        client that hangs up is noticed within a second; a stream notices through Starlette, which
        cancels it."""
        replies, last_check = submission.replies, time.monotonic()
        interval, last_batch = self.settings.stream_interval, -math.inf
        while True:
            await replies.wait(timeout=None if request is None else 1.0)
            if request is not None and time.monotonic() - last_check >= 1.0:
                last_check = time.monotonic()
                if await request.is_disconnected():
                    return
            pause = last_batch + interval - time.monotonic()
            if pause > 0:  # cut short by the reply's end: its last tokens never wait
                await replies.pause(pause)
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
                last_batch = time.monotonic()
                yield batch

    async def stream_chunks(self, chat: ChatRequest, submissions: list[Submission]):
        request_id, created, model = completion_id(), int(time.time()), self.settings.model_name
        n = len(submissions)
        yield "".join(
            sse(chat_chunk(request_id, model, {"role": "assistant", "content": ""}, created=created, index=i))
            for i in range(n)
        )
        frames = [ContentFrame(request_id, model, created, i) for i in range(n)]
        replies = [ReplyDeltas(chat) for _ in range(n)]
        tokens, running = [0] * n, n
        try:
            async for index, batch in self.choice_batches(submissions):
                # Tokens that waited for this stream go out as one delta (OpenAI's deltas may hold
                # several tokens): a stream that lags catches up in one chunk, not one per token.
                piece = batch[-1]  # only a batch's last piece can finish the reply
                text = piece["text"] if len(batch) == 1 else "".join(p["text"] for p in batch)
                deltas = replies[index].push(text) + (replies[index].finish() if piece["finish_reason"] else [])
                if chat.logprobs:  # the batch's tokens ride on its first chunk
                    entries = [self.token_texts.chat_entry(p["logprobs"]) for p in batch if "logprobs" in p]
                    delta = deltas[0] if deltas else {"content": ""}
                    first = chat_chunk(request_id, model, delta, created=created, index=index)
                    first["choices"][0]["logprobs"] = {"content": entries}
                    events = [sse(first)] + [frames[index](d) for d in deltas[1:]]
                else:
                    events = [frames[index](delta) for delta in deltas]
                if piece["finish_reason"]:
                    reason = replies[index].finish_reason(piece["finish_reason"])
                    events.append(sse(chat_chunk(request_id, model, {}, reason, created=created, index=index)))
                    tokens[index], running = piece["completion_tokens"], running - 1
                    if not running:
                        if chat.include_usage:
                            counts = usage(submissions[0].prompt_tokens, sum(tokens))
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

    def __init__(self, request_id: str, model: str, created: int, index: int = 0):
        self.request_id, self.model, self.created, self.index = request_id, model, created, index
        whole = sse(chat_chunk(request_id, model, {"content": self.MARK}, created=created, index=index))
        self.head, self.tail = whole.split(json.dumps(self.MARK, ensure_ascii=False))

    def __call__(self, delta: dict) -> str:
        if len(delta) == 1 and isinstance(delta.get("content"), str):
            return f"{self.head}{json.dumps(delta['content'], ensure_ascii=False)}{self.tail}"
        return sse(chat_chunk(self.request_id, self.model, delta, created=self.created, index=self.index))


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


def sampling_params(
    chat,
    settings: ServeSettings,
    max_len: int,
    seed: Optional[int] = None,
    logprobs: Optional[int] = None,
    prompt_logprobs: Optional[int] = None,
) -> SamplingParams:
    """The request's values (a ChatRequest or CompletionRequest), else the server's defaults. A
    request's temperature 0 is greedy; without any max_tokens a reply may run to the end of the
    context. `seed` is this sample's (openai_request.seeds)."""

    def pick(value, default):
        return default if value is None else value

    defaults = settings.sampling
    if chat.temperature is None:
        do_sample, temperature = defaults.do_sample and defaults.temperature > 0, defaults.temperature
    else:
        do_sample, temperature = chat.temperature > 0, chat.temperature
    return SamplingParams(
        max_new_tokens=(defaults.max_new_tokens or max_len) if chat.max_tokens is None else chat.max_tokens,
        do_sample=do_sample,
        temperature=temperature if temperature > 0 else 1.0,
        top_k=pick(chat.top_k, defaults.top_k),
        top_p=pick(chat.top_p, defaults.top_p),
        repetition_penalty=pick(chat.repetition_penalty, defaults.repetition_penalty),
        stop=chat.stop,
        ignore_eos=chat.ignore_eos,
        seed=seed,
        logprobs=logprobs,
        prompt_logprobs=prompt_logprobs,
        response_format=chat.response_format,
        tool_calls=chat.tool_calls,
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
