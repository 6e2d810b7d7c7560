"""OpenAI's text completions (`/v1/completions`) and vLLM's `/tokenize` and `/detokenize`, added to the
chat spec (serving_http) on the same engine, request queue and reply buffers.

A completions request holds one prompt or several (texts or token ids), each sampled `n` times: every
(prompt, sample) pair is its own engine request and the reply's choice `index` is
prompt_index * n + sample_index, as OpenAI numbers them. Text prompts are raw text (the tokenizer's
BOS first, special-token strings kept as text), whatever the model's stage. `echo` puts the prompt
before the generated text, and with `logprobs` the prompt's tokens before the generated ones, the
first with a null logprob; `max_tokens: 0` with both only scores the prompt (what lm-eval's
loglikelihood requests need).
"""

import asyncio
import time
from dataclasses import dataclass
from typing import Optional

from fastapi import Request

from bumblecore.inference.openai_completion_request import (
    CompletionRequest,
    parse_completion_request,
    parse_detokenize_request,
    parse_tokenize_request,
)
from bumblecore.inference.openai_reply import CompletionLogprobs, completion_id, text_choice, text_completion, usage
from bumblecore.inference.openai_request import APIError, ChatRequest, seeds
from bumblecore.inference.request_guard import read_json
from bumblecore.inference.serving_http import DONE, ChatCompletionsSpec, Submission, sampling_params, sse


@dataclass
class Prompt:
    """A completions prompt, tokenized: its ids and the text `echo` returns."""

    ids: list[int]
    text: str


class CompletionChoice:
    """One choice of a text completion, from its pieces: the text and (with logprobs) its tokens."""

    def __init__(self, prompt: Prompt, completion: CompletionRequest, logprobs: Optional[CompletionLogprobs]):
        self.prompt, self.logprobs = prompt, logprobs
        self.echo = completion.echo
        self.pending_text = prompt.text if completion.echo else ""  # echo: the first chunk starts with the prompt
        self.text, self.finish_reason, self.tokens = "", None, 0

    def push(self, piece: dict) -> None:
        if self.logprobs is not None:
            if self.echo and "prompt_logprobs" in piece:
                self.logprobs.add_prompt(self.prompt.ids, piece["prompt_logprobs"])
            if "logprobs" in piece:
                self.logprobs.add(*piece["logprobs"])
        self.pending_text += piece["text"]
        self.finish_reason = piece["finish_reason"] or self.finish_reason
        self.tokens = piece["completion_tokens"]

    def take(self, index: int) -> dict:
        """What arrived since the last take, as a choice (a whole reply takes once, a stream each batch)."""
        text, self.pending_text = self.pending_text, ""
        self.text += text
        return text_choice(index, text, self.logprobs.take() if self.logprobs else None, self.finish_reason)


class CompletionsSpec(ChatCompletionsSpec):
    """The chat spec plus `/v1/completions`, `/tokenize` and `/detokenize`."""

    def pre_setup(self, lit_api):
        super().pre_setup(lit_api)
        self.add_endpoint("/v1/completions", self.completions, ["POST"])
        self.add_endpoint("/tokenize", self.tokenize, ["POST"])
        self.add_endpoint("/detokenize", self.detokenize, ["POST"])

    async def in_tokenizer_thread(self, work, *args):
        """Off the event loop, on the tokenizer's one thread (as chat prompts are)."""
        return await asyncio.get_running_loop().run_in_executor(self.tokenizing, work, *args)

    async def completions(self, request: Request):
        completion = parse_completion_request(
            await read_json(request, self.settings.max_request_bytes, self.settings.body_timeout)
        )
        if completion.model:
            self.check_model(completion.model)
        prompts = await self.in_tokenizer_thread(self.completion_prompts, completion)
        if completion.logprobs is not None:
            await self.load_token_texts()
        prompt_logprobs = completion.logprobs if completion.echo else None
        submissions, choices = [], []
        for prompt in prompts:
            for seed in seeds(completion.seed, completion.n):
                params = sampling_params(
                    completion, self.settings, self.max_len, seed, completion.logprobs, prompt_logprobs
                )
                submissions.append(self.submit(prompt.ids, params))
                logprobs = self.token_texts.completion_logprobs() if completion.logprobs is not None else None
                choices.append(CompletionChoice(prompt, completion, logprobs))
        prompt_tokens = sum(len(p.ids) for p in prompts)
        if completion.stream:
            return self.streaming_response(
                self.stream_completion(completion, submissions, choices, prompt_tokens), submissions
            )
        try:
            async for index, batch in self.choice_batches(submissions, request):
                for piece in batch:
                    choices[index].push(piece)
            return text_completion(
                completion_id("cmpl"),
                self.settings.model_name,
                [choice.take(index) for index, choice in enumerate(choices)],
                usage(prompt_tokens, sum(choice.tokens for choice in choices)),
            )
        finally:
            self.release_all(submissions)

    async def stream_completion(self, completion, submissions: list[Submission], choices, prompt_tokens: int):
        request_id, created, model = completion_id("cmpl"), int(time.time()), self.settings.model_name
        running = len(choices)
        try:
            async for index, batch in self.choice_batches(submissions):
                for piece in batch:
                    choices[index].push(piece)
                events = [sse(text_completion(request_id, model, [choices[index].take(index)], None, created))]
                if choices[index].finish_reason:
                    running -= 1
                    if not running:
                        if completion.include_usage:
                            counts = usage(prompt_tokens, sum(choice.tokens for choice in choices))
                            events.append(sse(text_completion(request_id, model, [], counts, created)))
                        yield "".join(events) + DONE
                        return
                yield "".join(events)
        except APIError as err:  # the status line is sent already: report in the stream, as OpenAI does
            yield sse(err.body())
        yield DONE

    def completion_prompts(self, completion: CompletionRequest) -> list[Prompt]:
        """Each prompt's ids (text: as a raw-text prompt, the tokenizer's BOS first) and echo text;
        token ids checked against the tokenizer, and every prompt against the context."""
        from bumblecore.chat.format import encode_raw_prompt

        prompts, vocab = [], len(self.tokenizer)
        for i, prompt in enumerate(completion.prompts):
            where = f"prompt[{i}]" if len(completion.prompts) > 1 else "prompt"
            if isinstance(prompt, str):
                ids, text = encode_raw_prompt(self.tokenizer, prompt), prompt
            else:
                bad = next((t for t in prompt if t >= vocab), None)
                if bad is not None:
                    raise APIError(
                        400,
                        f"{where}: token id {bad} is outside this tokenizer's [0, {vocab})",
                        "prompt",
                        "invalid_value",
                    )
                ids, text = prompt, self.tokenizer.decode(prompt)
            if not ids:
                raise APIError(400, f"{where}: the prompt is empty", param="prompt", code="invalid_value")
            self.check_context(len(ids), where, "prompt")
            prompts.append(Prompt(ids, text))
        return prompts

    # -- vLLM's tokenizer routes

    async def tokenize(self, request: Request):
        """`{prompt}` or `{messages}` -> `{count, max_model_len, tokens}` (and `token_strs` when asked):
        the ids the server feeds the model for that prompt (completions) or conversation (chat)."""
        body = parse_tokenize_request(
            await read_json(request, self.settings.max_request_bytes, self.settings.body_timeout)
        )
        if body.model:
            self.check_model(body.model)
        ids = await self.in_tokenizer_thread(self.tokenize_ids, body)
        reply = {"count": len(ids), "max_model_len": self.max_len, "tokens": ids}
        if body.return_token_strs:
            reply["token_strs"] = self.tokenizer.convert_ids_to_tokens(ids)
        return reply

    def tokenize_ids(self, body) -> list[int]:
        from bumblecore.chat.format import encode_raw_prompt

        if body.prompt is not None:
            if body.add_special_tokens:
                return encode_raw_prompt(self.tokenizer, body.prompt)
            return self.tokenizer(body.prompt, add_special_tokens=False, split_special_tokens=True)["input_ids"]
        chat = ChatRequest(messages=[m.template_form() for m in body.messages])
        return self.prompt_ids(chat, add_generation_prompt=body.add_generation_prompt)

    async def detokenize(self, request: Request):
        """`{tokens}` -> `{prompt}`: the text of those ids."""
        body = parse_detokenize_request(
            await read_json(request, self.settings.max_request_bytes, self.settings.body_timeout)
        )
        if body.model:
            self.check_model(body.model)
        vocab = len(self.tokenizer)
        bad = next((i for i, t in enumerate(body.tokens) if t >= vocab), None)
        if bad is not None:
            raise APIError(
                400,
                f"tokens[{bad}]: {body.tokens[bad]} is outside this tokenizer's [0, {vocab})",
                "tokens",
                "invalid_value",
            )
        return {"prompt": await self.in_tokenizer_thread(self.tokenizer.decode, body.tokens)}
